"""examples/committee.py: its interpolation and correlations, and a tiny protocol end to end through flatcli."""
import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("committee_example", ROOT / "examples" / "committee.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def test_interpolation_and_rank_correlation():
    assert example.at(["0.3", "0.1", "0.2"], ["-3", "-1", "-2"], 0.15) == pytest.approx(-1.5)
    assert math.isnan(example.at([0.1, 0.2], [1, 2], 0.5))
    rho, p, n = example.spearman([1, 2, 3, math.nan, 5], [2, 4, 5, 0, 9])
    assert (rho, n) == (1.0, 4) and p < 0.1
    assert math.isnan(example.spearman([1, 1, 1], [1, 2, 3])[0])


def in_process(args, cwd):
    """The script's ``python -m flatcli ARGS`` subprocess, run in this process (no torch import per step)."""
    import os
    import subprocess

    from clitools import invoke
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = invoke(*args)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_tiny_protocol_on_a_separable_task(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(example, "flatcli", in_process)
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=20), rng.normal(size=(90, 20)).astype(np.float32)
    y = (x @ w > 0).astype(np.int64)
    np.savez(tmp_path / "lin.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    out = tmp_path / "report"
    assert example.main(["--data", str(tmp_path / "lin.npz"), "--hidden", "1", "--algos", "sgd,rsgd", "--seeds", "0",
                         "--epochs", "30", "--samples", "3", "--sigmas", "0,0.2", "--sigma-star", "0.2",
                         "--couplings", "0.5,2,8", "--d-star", "0.02", "--out", str(out)]) == 0
    runs = list(csv.DictReader(open(out / "runs.csv")))
    entropy = list(csv.DictReader(open(out / "bp_local_entropy.csv")))
    assert [r["run"] for r in runs] == ["sgd-s0", "rsgd-s0"]
    measured = [r for r in runs if float(r["train_error"]) == 0]
    assert measured, runs  # lr 1, batch 8: both reach zero training error on this task
    for r in measured:
        mine = [e for e in entropy if Path(e["checkpoint"]).name == r["run"]]
        assert len(mine) == 3
        want = np.interp(0.02, *zip(*sorted((float(e["distance"]), float(e["local_entropy"])) for e in mine)))
        assert math.isfinite(want) and float(r["entropy"]) == pytest.approx(want)
    text = (out / "README.md").read_text()
    assert "| sgd-s0 |" in text and "entropy vs test_error" in text
