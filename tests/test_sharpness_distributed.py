"""flatcli compare (and so sharpness, pac-bayes and local energy) under real torchrun with 2 CPU processes: the
same CSV, byte for byte, as one process. (The sharing of sharpness's (batch, restart) units over more processes
is checked in-process, with threads as team members, in test_sharpness.py.)"""
import pytest

from clitools import invoke
from test_distributed import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_under_torchrun_is_the_one_process_csv(runs, tmp_path):
    args = ["compare", runs / "sgd", runs / "rsgd", "--max-examples", "100", "--steps", "4", "--energy-samples", "5",
            "--pac-samples", "5", "--measures", "local-energy,sharpness,pac-bayes", "--device", "cpu"]
    one = invoke(*args, "--csv", tmp_path / "one.csv")
    assert one.exit_code == 0, one.stderr
    two = torchrun("-m", "flatcli", *args, "--csv", tmp_path / "two.csv")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert two.stderr.count("rank agreement with generalization") == 1  # rank 0 alone speaks
    assert "ranks 2" in two.stderr

