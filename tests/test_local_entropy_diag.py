"""Local entropy's convergence diagnostics (R̂, ESS, converged) and its autocorrelation-aware standard error,
in the library and through the CLI (columns, the ? mark, the warning line)."""
import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from clitools import invoke
from flatcli.measure.local_entropy import local_entropy
from test_local_entropy import exact_s, quadratic

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chains_too_short_are_flagged():
    """Stiff and soft directions (h over 0.01…10) with 12 steps per γ: the soft ones have not relaxed."""
    h = np.geomspace(0.01, 10, 16)
    model, energy = quadratic(h)
    r = local_entropy(model, None, [0.01, 1.0], beta=32.0, loss=energy, steps=12, burn_in=4, chains=4)
    for row in r.rows:
        assert not row.converged and row.rhat > 1.01, row
    assert all(not p.converged for p in r.ladder if p.gamma <= 1.0)
    assert {"rhat", "ess", "converged"} <= set(r.records()[0])


def test_long_chains_on_an_easy_quadratic_converge():
    """h over 1…3 at γ ≥ 3: one step size suits every direction; R̂ ≤ 1.01 and ESS ≥ 100, and s within 4 MCSE
    of the closed form (test_local_entropy's test_standard_error_is_honest_over_seeds checks the MCSE itself).
    Stationary chains with autocorrelation time τ have R̂ ≈ 1 + (τ − 1)/S (S draws per chain) on top of
    the noise: with τ ≈ 3 a chain needs several hundred kept steps for R̂ ≤ 1.01 (350 gave 1.005…1.013)."""
    h = np.geomspace(1, 3, 6)
    model, energy = quadratic(h, seed=1)
    for seed in range(2):
        r = local_entropy(model, None, [3.0, 30.0], beta=20.0, loss=energy, steps=1000, burn_in=100, chains=4,
                          seed=seed)
        for row in r.rows:
            assert row.converged and row.rhat <= 1.01 and row.ess >= 100, row
            assert row.local_entropy == pytest.approx(exact_s(h, row.gamma), abs=4 * row.local_entropy_sem)


def test_cli_columns_mark_and_warning(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    d, n = 8, 32
    x = torch.randn(n, d, generator=g) * torch.as_tensor(np.geomspace(0.05, 3, d)).float()
    w = torch.randn(1, d, generator=g)
    torch.save({"weight": w}, tmp_path / "W.pt")
    np.savez(tmp_path / "reg.npz", x=x.numpy(), y=(x @ w[0]).numpy())
    (tmp_path / "le_diag.py").write_text(f"from torch import nn\n\ndef linear():\n    return nn.Linear({d}, 1, bias=False)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["W.pt", "--model", "le_diag:linear", "--data", "reg.npz", "--loss", "mse", "--gammas", "0.01,1",
            "--steps", 10, "--burn-in", 2, "--device", "cpu"]
    result = invoke("local-entropy", *args, "--csv", "-")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["converged"] for r in rows] == ["False", "False"]
    assert all(float(r["rhat"]) > 1.01 and float(r["ess"]) > 0 for r in rows)
    text = " ".join(result.stderr.split())
    assert text.count("not converged (R̂ > 1.01 or ESS < 100; worst R̂") == 1  # one warning line
    assert "W.pt at γ 0.01, 1" in text and "--steps" in text and " ?" in text
    report = json.loads(invoke("local-entropy", *args, "--json", "-").stdout)
    assert [r["converged"] for r in report["rows"]] == [False, False]
    ladder = report["settings"]["per_checkpoint"][0]["ladder"]
    assert all({"rhat", "ess", "converged"} <= set(p) for p in ladder)
