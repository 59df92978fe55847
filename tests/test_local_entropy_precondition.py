"""Preconditioned Langevin steps (--precondition K): linear regression with Hessian eigenvalues over 0.01…10
(condition number 1e3) against MATH.md §2's closed forms at every γ in 0.01…10 through the CLI, the same run
without the preconditioner missing the distance at small γ, and the sharing of chains kept bit for bit."""
import copy
import csv
import io
import math

import numpy as np
import pytest
import torch

from clitools import invoke
from flatcli.measure.local_entropy import local_entropy
from test_local_entropy import exact_distance, exact_s, quadratic, run_sharded

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def regression16(tmp_path, monkeypatch):
    """y = X w*, nn.Linear(16, 1) at w*, (2/n) XᵀX with eigenvalues log-spaced over 0.01…10 (n = 32)."""
    g = torch.Generator().manual_seed(4)
    d, n = 16, 32
    h = np.geomspace(0.01, 10, d)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = ((math.sqrt(n / 2) * u * torch.as_tensor(np.sqrt(h))) @ v.T).float()
    w = torch.randn(1, d, generator=g)
    torch.save({"weight": w}, tmp_path / "W.pt")
    np.savez(tmp_path / "reg.npz", x=x.numpy(), y=(x @ w[0]).numpy())
    (tmp_path / "le_pre.py").write_text(f"from torch import nn\n\ndef linear():\n    return nn.Linear({d}, 1, bias=False)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return np.linalg.eigvalsh((2 / n) * (x.double().T @ x.double()).numpy()), n


def run_cli(*args):
    result = invoke("local-entropy", "W.pt", "--model", "le_pre:linear", "--data", "reg.npz", "--loss", "mse",
                    "--gammas", "0.01:10:4", "--device", "cpu", "--csv", "-", *args)
    assert result.exit_code == 0, result.stderr
    return [{k: float(v) if k in ("gamma", "local_entropy", "distance") else v for k, v in r.items()}
            for r in csv.DictReader(io.StringIO(result.stdout))]


def test_preconditioned_chains_meet_the_closed_form_at_every_gamma(regression16):
    h, n = regression16
    assert h.min() < 0.0101 and h.max() > 9.9
    rows = run_cli("--precondition", 16, "--steps", 300, "--burn-in", 60, "--chains", 8, "--chains-per-pass", 8)
    assert [r["gamma"] for r in rows] == pytest.approx([0.01, 0.1, 1, 10], rel=1e-12)
    for r in rows:
        s, dist = exact_s(h, r["gamma"]), exact_distance(h, r["gamma"], n)
        assert abs(r["local_entropy"] - s) < max(0.05 * abs(s), 0.005), r
        assert r["distance"] == pytest.approx(dist, rel=0.10), r


def test_without_the_preconditioner_the_soft_directions_lag():
    """The same budget, one step c/(h_max + γ): at γ = 0.01 the distance is far off (+130% at seed 0); with
    the top 16 eigenpairs it is within 10% (the issue's 59% at 0.01 was this)."""
    h = np.geomspace(0.01, 10, 16)
    model, energy = quadratic(h)
    run = lambda k: local_entropy(model, None, [0.01], beta=32.0, loss=energy, precondition=k).rows[0]
    plain, pre = run(0), run(16)
    exact = exact_distance(h, 0.01, 32.0)
    assert plain.distance > 1.3 * exact and not plain.converged
    assert pre.distance == pytest.approx(exact, rel=0.15)


def test_preconditioned_sharing_is_bit_for_bit():
    model, energy = quadratic(np.geomspace(0.1, 10, 6))
    run = lambda: local_entropy(copy.deepcopy(model), None, [1.0, 10.0], beta=10.0, loss=energy, steps=8,
                                burn_in=3, chains=4, seed=7, precondition=3)
    one = run()
    results, calls = run_sharded(3, run)
    assert calls == [3] * 3  # the curvature, the eigenpairs, the per-chain statistics
    assert all(repr(r) == repr(one) for r in results)
    assert repr(local_entropy(copy.deepcopy(model), None, [1.0, 10.0], beta=10.0, loss=energy, steps=8,
                              burn_in=3, chains=4, seed=7)) != repr(one)
