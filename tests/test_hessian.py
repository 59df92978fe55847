"""flatcli hessian against exact Hessians: linear regression's (2/n) XᵀX and small nets' autograd Hessians;
the trace's standard error, the density's normalization and mean, untouched models, work shared by a team,
and the command line."""
import copy
import csv
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clitools import assert_user_error, invoke
from flatcli import parallel
from flatcli.errors import FlatcliError
from flatcli.measure.hessian import HessianSettings, hessian_spectrum

pytestmark = pytest.mark.usefixtures("one_thread")
HEADER = "checkpoint,quantity,index,value,sem,at,split"


@pytest.fixture(scope="module")
def regression():
    """Linear regression with MSE: mean((Xw − y)²) has Hessian H = (2/n) XᵀX, whatever w (float64 eigenvalues)."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 30
    x = torch.randn(n, d, generator=g) * torch.logspace(0.5, -0.5, d)  # eigenvalues from 0.18 to 21
    y = torch.randn(n, generator=g)
    model = nn.Linear(d, 1, bias=False)
    H = 2 / n * x.double().T @ x.double()
    return model, (x, y), torch.linalg.eigvalsh(H)


def mlp_at_random_init(seed=1):
    """A 5-12-3 tanh net (111 parameters) at its initialization: not a minimum, so H has negative eigenvalues."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    return model, (x, y)


def exact_hessian(model, x, y):
    """Dense Hessian of the mean cross-entropy over all parameters (model.parameters() order), float64."""
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    net = [m for m in model.double().modules()][0]

    def f(w):
        parts = dict(zip(names, (t.view(s) for t, s in zip(w.split([s.numel() for s in shapes]), shapes))))
        return nn.functional.cross_entropy(torch.func.functional_call(net, parts, (x.double(),)), y)
    H = torch.autograd.functional.hessian(f, flat)
    model.float()
    return H


def test_linear_regression_eigenvalues_match_the_closed_form(regression):
    model, data, exact = regression
    r = hessian_spectrum(model, data, top_k=5, bottom_k=2, trace=False, loss="mse", tol=1e-6, batch_size=64)
    torch.testing.assert_close(torch.tensor(r.eigenvalues, dtype=torch.float64), exact.flip(0)[:5], rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(r.bottom_eigenvalues, dtype=torch.float64), exact[:2], rtol=1e-4, atol=0)
    assert r.converged and r.iterations <= 30
    assert all(res <= 1e-4 * abs(v) for res, v in zip(r.residuals, r.eigenvalues + r.bottom_eigenvalues))


def test_linear_regression_trace_within_one_percent_and_three_standard_errors(regression):
    model, data, exact = regression
    true = float(exact.sum())
    r = hessian_spectrum(model, data, top_k=0, probes=60, loss="mse", batch_size=1000, seed=3)
    assert abs(r.trace - true) <= 0.01 * true
    assert 0 < r.trace_sem and abs(r.trace - true) <= 3 * r.trace_sem
    assert r.hvps == 60
    plain = hessian_spectrum(model, data, top_k=0, probes=200, trace_method="hutchinson", loss="mse", seed=3)
    assert abs(plain.trace - true) <= 3 * plain.trace_sem and plain.hvps == 200
    assert r.trace_sem < plain.trace_sem  # Hutch++ beats Hutchinson with 3x fewer products on a decaying spectrum


def test_hutchpp_standard_error_matches_the_spread_over_seeds(regression):
    """The reported sem is the actual spread of the estimate: std over 40 seeds within a factor 1.5 of it."""
    model, data, exact = regression
    runs = [hessian_spectrum(model, data, top_k=0, probes=15, loss="mse", seed=s) for s in range(40)]
    spread = float(np.std([r.trace for r in runs], ddof=1))
    sem = float(np.sqrt(np.mean([r.trace_sem ** 2 for r in runs])))
    assert spread / 1.5 < sem < spread * 1.5
    assert abs(np.mean([r.trace for r in runs]) - float(exact.sum())) < 3 * spread / np.sqrt(40)  # unbiased


def test_mlp_eigenvalues_match_the_exact_hessian_including_a_negative_one():
    model, (x, y) = mlp_at_random_init()
    exact = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    assert exact[0] < -0.01 * exact[-1]  # clearly indefinite
    r = hessian_spectrum(model, (x, y), top_k=3, bottom_k=1, trace=True, probes=90, tol=1e-5, max_iters=111,
                         batch_size=16)
    got = torch.tensor(r.eigenvalues + r.bottom_eigenvalues, dtype=torch.float64)
    torch.testing.assert_close(got, torch.stack([exact[-1], exact[-2], exact[-3], exact[0]]), rtol=1e-3, atol=0)
    assert r.bottom_eigenvalues[0] < 0
    assert abs(r.trace - float(exact.sum())) <= 3 * r.trace_sem
    assert r.parameters == 111 and r.examples == 64


def test_density_integrates_to_one_and_its_mean_is_the_trace_over_n(regression):
    model, data, exact = regression
    r = hessian_spectrum(model, data, top_k=0, trace=False, density=True, loss="mse", density_probes=10,
                         density_steps=20)
    t, phi = np.array(r.density_grid), np.array(r.density)
    assert len(t) == 500 and (phi >= 0).all()
    assert abs(np.trapezoid(phi, t) - 1) < 1e-5  # not renormalized: the grid is wide and fine enough
    mean = np.trapezoid(t * phi, t)
    assert abs(mean - float(exact.mean())) <= 0.02 * float(exact.mean())
    assert t[0] < float(exact[0]) and t[-1] > float(exact[-1])  # the grid covers the spectrum
    assert r.hvps == 10 * 20


def test_records_are_tidy_rows(regression):
    model, data, _ = regression
    r = hessian_spectrum(model, data, top_k=2, bottom_k=1, probes=9, density=True, loss="mse", density_probes=1,
                         density_steps=5, seed=4)
    rows = r.records()
    kinds = [(row["quantity"], row["index"]) for row in rows]
    assert kinds[:4] == [("eigenvalue", 1), ("eigenvalue", 2), ("bottom_eigenvalue", 1), ("trace", 0)]
    assert kinds[4:] == [("density", i) for i in range(500)]
    assert [row["value"] for row in rows[:3]] == r.eigenvalues + r.bottom_eigenvalues
    assert rows[3]["value"] == r.trace and rows[3]["sem"] == r.trace_sem
    assert [row["at"] for row in rows[4:]] == r.density_grid
    assert {row["seed"] for row in rows} == {4} and {row["examples"] for row in rows} == {200}


class Dropped(nn.Module):
    """BatchNorm and dropout: both must be in eval mode for the Hessian, and come back in train mode."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def test_model_state_comes_back_exactly_and_batchnorm_runs_in_eval_mode():
    torch.manual_seed(0)
    model = Dropped()
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    model.train()
    model(x)  # running statistics away from their initial values
    model.net[3].eval()  # a mixed mode, to be restored as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    r = hessian_spectrum(model, (x, y), top_k=1, probes=6, tol=1e-6, max_iters=90, batch_size=16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and [m.training for m in model.modules()] == modes
    model.eval()
    exact = torch.linalg.eigvalsh(exact_hessian(model, x, y))  # the eval-mode network's Hessian
    assert r.eigenvalues[0] == pytest.approx(float(exact[-1]), rel=1e-4)


def thread_team(world):
    """``world`` Teams whose collectives meet across threads: a torchrun job inside one process."""
    barrier, slots = threading.Barrier(world), [None] * world

    def member(rank):
        def all_reduce(tensors):
            slots[rank] = [t.clone() for t in tensors]
            barrier.wait()
            total = [sum(s[i] for s in slots) for i in range(len(tensors))]  # rank order, as Gloo's ring need not be
            barrier.wait()
            for t, s in zip(tensors, total):
                t.copy_(s)

        def all_gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return parallel.Team(rank, world, all_gather, all_reduce)
    return [member(r) for r in range(world)]


def test_a_team_shares_the_chunks_and_matches_one_process():
    model, data = mlp_at_random_init()
    kw = dict(top_k=2, bottom_k=1, probes=12, density=True, density_probes=2, density_steps=8, tol=1e-6,
              max_iters=80, batch_size=10)  # 7 chunks: rank 0 takes 4, rank 1 takes 3
    solo = hessian_spectrum(model, data, **kw)
    results = [None, None]

    def work(team):  # each "process" its own copy: functional_call swaps a module's tensors while it runs
        with parallel.sharing(team):
            results[team.rank] = hessian_spectrum(copy.deepcopy(model), data, **kw)
    threads = [threading.Thread(target=work, args=(t,)) for t in thread_team(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.hvps == solo.hvps and r.iterations == solo.iterations
        for a, b in ((r.eigenvalues + r.bottom_eigenvalues, solo.eigenvalues + solo.bottom_eigenvalues),
                     ([r.trace, r.trace_sem], [solo.trace, solo.trace_sem]), (r.density, solo.density)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(np.abs(b)))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(top_k=0, trace=False), "nothing to measure"),
    (dict(probes=2), "probes=2"),
    (dict(trace_method="exact"), "trace_method="),
    (dict(tol=0.0), "tol=0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_iters=2, top_k=3), "max_iters=2"),
    (dict(density_points=100), "density_points=100"),
])
def test_bad_settings_are_user_errors_naming_the_keyword(kwargs, fragment):
    with pytest.raises(FlatcliError, match=fragment):
        HessianSettings(**kwargs)


def test_cli_csv_to_stdout_is_pure_csv_with_the_tidy_header(runs):
    result = invoke("hessian", runs / "sgd", runs / "rsgd", "--top-k", "2", "--bottom-k", "1", "--probes", "9",
                    "--max-examples", "64", "--max-iters", "60", "--tol", "1e-4", "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(HEADER + ",")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(Path(r["checkpoint"]).name, r["quantity"], r["index"]) for r in rows] == [
        (c, q, i) for c in ("sgd", "rsgd") for q, i in (("eigenvalue", "1"), ("eigenvalue", "2"),
                                                        ("bottom_eigenvalue", "1"), ("trace", "0"))]
    values = [float(r["value"]) for r in rows]
    assert values[0] >= values[1] > values[2]
    assert "Hessian of the mean loss" in result.stderr and "eigenvalue" not in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--probes", "2"], "--probes 2"),
    (["--top-k", "0", "--no-trace"], "nothing to measure"),
    (["--max-iters", "1", "--top-k", "2"], "--max-iters 1"),
])
def test_cli_user_mistakes_give_one_line(runs, args, fragment):
    assert_user_error(invoke("hessian", runs / "sgd", *args, "--device", "cpu"), fragment)


def test_cli_plot_draws_the_density_and_needs_matplotlib(runs, tmp_path, monkeypatch):
    path = tmp_path / "density.png"
    args = ["hessian", runs / "sgd", "--no-trace", "--max-examples", "32", "--max-iters", "20", "--device", "cpu"]
    result = invoke(*args, "--plot", path, "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(r["quantity"] == "density" for r in csv.DictReader(io.StringIO(result.stdout))) == 500  # implied
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert_user_error(invoke(*args, "--plot", tmp_path / "other.png"), "--plot needs matplotlib")
    assert not (tmp_path / "other.png").exists()
