"""Local entropy (MATH.md §2) against its closed form for quadratic losses:

    s(γ) = −(1/(2N)) Σ_i log(1 + h_i/γ),    ⟨|w' − w|²⟩_γ = Σ_i 1/(β (h_i + γ)).
"""
import copy
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from flatcli import parallel
from flatcli.errors import FlatcliError
from flatcli.measure.local_entropy import gamma_ladder, integration_matrix, local_entropy, parse_gammas


pytestmark = pytest.mark.usefixtures("one_thread")


def exact_s(h, gamma):
    return -np.log1p(np.asarray(h, dtype=np.float64) / gamma).sum() / (2 * len(h))


def exact_distance(h, gamma, beta):  # per parameter
    return (1 / (beta * (np.asarray(h, dtype=np.float64) + gamma))).sum() / len(h)


def quadratic(h, seed=0):
    """A model (its weight is w) and the energy L(w') = 1/10 + ½ (w' − w)ᵀ H (w' − w), H = Q diag(h) Qᵀ."""
    g = torch.Generator().manual_seed(seed)
    n = len(h)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    hess = ((q * torch.as_tensor(h, dtype=torch.float64)) @ q.T).float()
    model = nn.Linear(n, 1, bias=False)
    w = model.weight.detach().clone().reshape(-1)

    def energy(params):
        d = params["weight"].reshape(-1) - w
        return 0.1 + 0.5 * d @ (hess @ d)

    return model, energy


def check_closed_form(result, h, tol=0.05):
    for row in result.rows:
        s, dist = exact_s(h, row.gamma), exact_distance(h, row.gamma, result.beta)
        assert row.local_entropy == pytest.approx(s, rel=tol), row
        assert row.distance == pytest.approx(dist, rel=tol), row


def test_quadrature_of_the_exact_slope_is_well_under_one_percent():
    """The integration alone (no sampling): exact γ ∂s/∂γ = (1/2N) Σ h/(h + γ) on the ladder."""
    for h in (np.geomspace(0.01, 10, 40), np.array([1.0]), np.geomspace(0.01, 100, 30)):
        ladder = gamma_ladder([0.3, 1, 3, 30, 300], max(300, 100 * h.max()), points_per_decade=3)
        slope = (h[None, :] / (h[None, :] + ladder[:, None])).sum(1) / (2 * len(h))
        s = -integration_matrix(np.log(ladder)) @ slope
        exact = np.array([exact_s(h, g) for g in ladder])
        np.testing.assert_allclose(s, exact, rtol=0.01)
        assert all(np.isclose(ladder, g).any() for g in (0.3, 1, 3, 30, 300))


def test_quadratic_energy_matches_closed_form_over_three_decades():
    h = np.geomspace(0.01, 10, 40)  # three decades of curvature
    model, energy = quadratic(h)
    gammas = [1, 3, 10, 30, 100, 300, 1000]  # three decades of γ
    r = local_entropy(model, None, gammas, beta=50.0, loss=energy, steps=400, burn_in=100, chains=32,
                      chains_per_pass=32)
    assert [row.gamma for row in r.rows] == gammas
    check_closed_form(r, h)
    assert r.curvature == pytest.approx(10, rel=0.2)
    assert r.ladder[-1].gamma >= 100 * r.curvature  # the tail starts well above the curvature
    assert r.sampler == "mala" and 0.4 < r.acceptance < 0.8
    assert all(math.isnan(row.error_mean) for row in r.rows)
    for row in r.rows:  # the loss of a quadratic: L_0 + ½ Σ h/(β(h + γ))
        assert row.loss_mean == pytest.approx(0.1 + 0.5 * (h / (50 * (h + row.gamma))).sum(), rel=0.05)


def test_linear_regression_mse_matches_closed_form():
    """y = X w*, model at w*: L(w') = mean((X w' − y)²) is the quadratic with H = (2/n) XᵀX."""
    g = torch.Generator().manual_seed(1)
    d, n = 24, 48
    h = np.geomspace(0.01, 10, d)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (math.sqrt(n / 2) * u * torch.as_tensor(np.sqrt(h))) @ v.T  # (2/n) XᵀX = V diag(h) Vᵀ
    model = nn.Linear(d, 1, bias=False)
    y = model(x.float()).detach()
    eig = np.linalg.eigvalsh((2 / n) * (x.T @ x).numpy())
    r = local_entropy(model, (x.float(), y), [1, 10, 100, 1000], loss="mse", steps=400, burn_in=100, chains=32,
                      chains_per_pass=32)
    assert r.beta == n and r.n_examples == n and r.n_params == d
    check_closed_form(r, eig)
    assert all(math.isnan(row.error_mean) for row in r.rows)  # regression: no 0-1 error


def test_standard_error_is_honest_over_seeds():
    """Over independent seeds, the error against the closed form is consistent with the reported sem."""
    h = np.geomspace(0.1, 3, 8)
    model, energy = quadratic(h, seed=3)
    z = []
    for seed in range(10):
        r = local_entropy(model, None, [3.0, 30.0], beta=20.0, loss=energy, steps=120, burn_in=30, chains=16,
                          chains_per_pass=16, seed=seed)
        z += [(row.local_entropy - exact_s(h, row.gamma)) / row.local_entropy_sem for row in r.rows]
    z = np.array(z)
    # z ≈ Student t with 15 degrees of freedom, mean z² ≈ 1.15 (over 100 seeds: 1.0, max |z| 3.1,
    # every 10 consecutive seeds within 0.58-1.64);
    # a sem 2× too small (mean z² ≈ 4.6) or 2.5× too large (≈ 0.18) fails
    assert np.abs(z).max() < 5, z
    assert 0.25 < (z ** 2).mean() < 3.0, z


def classifier():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, :3]).argmax(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model(x)  # give BatchNorm non-trivial running statistics
    return model, (x, y)


def test_weights_unchanged_reproducible_and_progress_reported():
    model, data = classifier()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    run = lambda seed, **kw: local_entropy(model, data, [1.0, 10.0], steps=6, burn_in=2, chains=2, seed=seed, **kw)
    a = run(0, callback=lambda done, total: calls.append((done, total)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit for bit, buffers too
    assert model.training and all(m.training for m in model.modules())
    assert run(0).rows == a.rows
    assert run(1).rows != a.rows
    assert calls == [(1, len(a.ladder) * 6)] * (len(a.ladder) * 6)  # one increment per Langevin step
    for row in a.rows:
        assert 0 <= row.error_mean <= 1 and row.loss_mean > 0 and row.local_entropy_sem > 0


def test_loop_over_chains_gives_the_vmapped_numbers():
    h = np.geomspace(0.1, 10, 6)
    model, energy = quadratic(h)
    unvmappable = lambda params: energy(params) + 0 * float(params["weight"].detach().sum())  # float() defeats vmap
    kw = dict(beta=10.0, steps=20, burn_in=5, chains=3)
    a = local_entropy(model, None, [1.0, 10.0], loss=energy, **kw)
    b = local_entropy(model, None, [1.0, 10.0], loss=unvmappable, **kw)
    for ra, rb in zip(a.rows, b.rows):
        assert ra.local_entropy == pytest.approx(rb.local_entropy, rel=1e-4)


def test_sgld_on_minibatches_is_close_to_closed_form():
    """SGLD (batch smaller than the data) is biased by the step and the minibatch noise: a looser check."""
    g = torch.Generator().manual_seed(2)
    d, n = 8, 64
    x = torch.randn(n, d, generator=g)
    model = nn.Linear(d, 1, bias=False)
    y = model(x).detach()
    eig = np.linalg.eigvalsh((2 / n) * (x.T @ x).double().numpy())
    r = local_entropy(model, (x, y), [3.0, 30.0], loss="mse", batch_size=32, steps=600, burn_in=150, chains=64,
                      chains_per_pass=64)
    assert r.sampler == "sgld" and math.isnan(r.acceptance) and all(math.isnan(p.acceptance) for p in r.ladder)
    check_closed_form(r, eig, tol=0.10)


@pytest.mark.parametrize("kwargs", [
    dict(gammas=[0.0]), dict(gammas=[-1.0]), dict(gammas=[float("nan")]), dict(gammas=[float("inf")]),
    dict(gammas=[]), dict(steps=0), dict(steps=10, burn_in=10), dict(burn_in=-1), dict(chains=0),
    dict(beta=0.0), dict(beta=-2.0), dict(langevin_lr=0.0), dict(batch_size=0), dict(loss="hinge"),
    dict(chains_per_pass=0),
    dict(data=None), dict(data=None, loss=lambda params: params["0.weight"].sum()),  # an energy needs beta
])
def test_bad_arguments_raise_flatcli_error(kwargs):
    model, data = classifier()
    args = dict(data=data, gammas=[1.0], steps=4, burn_in=1, chains=2) | kwargs
    with pytest.raises(FlatcliError):
        local_entropy(model, args.pop("data"), args.pop("gammas"), **args)


def test_parse_gammas():
    assert parse_gammas("1,10,100") == [1.0, 10.0, 100.0]
    assert parse_gammas(" 0.5 ") == [0.5]
    geo = parse_gammas("0.1:1000:5")
    assert geo[0] == 0.1 and geo[-1] == 1000.0
    np.testing.assert_allclose(geo, [0.1, 1, 10, 100, 1000], rtol=1e-12)
    for bad in ("abc", "", "1:2", "1:10:0", "1:10:x", "0,1", "-1:10:3", "1,nan", "1,inf", "1,,2"):
        with pytest.raises(FlatcliError):
            parse_gammas(bad)


def run_sharded(world, measure):
    """``measure(model_copy)`` in ``world`` threads, each a member of a ``flatcli.parallel.Team`` whose
    all-gather is a real meeting (a barrier), as torchrun processes would be. Returns each member's result
    or exception, and the gather calls."""
    box, out, calls = [None] * world, [None] * world, [0] * world
    barrier = threading.Barrier(world, timeout=120)

    def gather(rank):
        def all_gather(obj):
            calls[rank] += 1
            box[rank] = obj
            barrier.wait()
            everyone = list(box)
            barrier.wait()
            return everyone
        return all_gather

    def rank_main(rank):
        try:
            with parallel.sharing(parallel.Team(rank, world, gather(rank))):
                out[rank] = measure()
        except Exception as e:  # reported to the test
            out[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, calls


def regression_problem(d=8, n=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    model = nn.Linear(d, 1, bias=False)
    return model, (x, model(x).detach())


@pytest.mark.parametrize("problem,chains,world", [
    ("classifier", 5, 2), ("classifier", 5, 3), ("classifier", 1, 2),  # uneven splits, a rank with no chain
    ("sgld", 3, 2), ("energy", 4, 3)])
def test_sharded_chains_give_the_one_process_result_bit_for_bit(problem, chains, world):
    """Chain c's randomness depends on (seed, c) only and the curvature is rank 0's: sharing the chains out and
    gathering them reproduces the one-process numbers exactly (every row and every ladder point)."""
    if problem == "energy":
        model, energy = quadratic(np.geomspace(0.1, 10, 6))
        kw = dict(data=None, loss=energy, beta=10.0)
    elif problem == "sgld":
        model, data = regression_problem()
        kw = dict(data=data, loss="mse", batch_size=16)
    else:
        model, data = classifier()
        kw = dict(data=data)
    run = lambda **more: local_entropy(copy.deepcopy(model), gammas=[1.0, 10.0], steps=8, burn_in=3,
                                       chains=chains, seed=7, **kw, **more)
    one = run()
    results, calls = run_sharded(world, run)
    assert calls == [2] * world  # the curvature, then the per-chain statistics
    for r in results:
        assert repr(r) == repr(one)  # bit for bit (repr: NaN fields compare equal)
    other = local_entropy(copy.deepcopy(model), gammas=[1.0, 10.0], steps=8, burn_in=3, chains=chains, seed=8, **kw)
    assert repr(other) != repr(one)


def test_passes_change_only_the_float_rounding():
    """chains_per_pass groups the same chains (same generators, same steps) into vmapped passes differently;
    only the rounding of the batched arithmetic differs. The progress total counts every pass."""
    model, data = classifier()
    totals = []
    run = lambda k: local_entropy(model, data, [1.0, 10.0], steps=6, burn_in=2, chains=5, chains_per_pass=k,
                                  callback=lambda done, total: totals.append(total))
    one, two, five = run(1), run(2), run(5)
    assert (one.chains_per_pass, two.chains_per_pass) == (1, 2)
    for r in (two, five):
        for a, b in zip(one.rows, r.rows):
            assert a.local_entropy == pytest.approx(b.local_entropy, rel=1e-4, abs=1e-9)
            assert a.distance == pytest.approx(b.distance, rel=1e-5)
    assert sorted(set(totals)) == [len(one.ladder) * 6 * k for k in (1, 3, 5)]  # passes: 1, 3 and 5


def test_a_diverged_chain_is_an_error_on_every_rank():
    """SGLD with a step far too large: every rank raises the same FlatcliError (none waits for the others)."""
    model, data = regression_problem()
    run = lambda **more: local_entropy(copy.deepcopy(model), data, [1.0], loss="mse", batch_size=16,
                                       langevin_lr=50.0, steps=60, burn_in=10, chains=3, **more)
    with pytest.raises(FlatcliError, match="diverged"):
        run()
    results, _ = run_sharded(2, run)
    assert all(isinstance(r, FlatcliError) and "diverged" in str(r) for r in results), results
