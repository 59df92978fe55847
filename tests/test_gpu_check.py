"""benchmarks/gpu_check.py runs on the CPU, so it is known to work before a GPU is at hand."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_check_passes_on_the_cpu(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    for check in ("train-sgd", "train-esgd", "train-rsgd", "train-amp", "local-energy", "local-entropy", "hessian"):
        assert f"pass  {check}" in out, out
    assert "all checks passed" in out and out.count("ratio ") == 3
