"""Adaptive sharpness (MATH.md §6) against the closed forms of linear regression at its minimum, and the
average case against local energy's δL with the same draws."""
import copy

import pytest
import torch
import torch.nn as nn

from flatcli.errors import FlatcliError
from flatcli.measure import local_energy
from flatcli.measure.sharpness import checkpoints, sharpness
from test_local_energy import run_team

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def regression():
    """nn.Linear(d, 1) at the least-squares minimum of mean((Xw + b − y)²); H = (2/n) X̃ᵀX̃ over (w, b)."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 + 0.1 * torch.randn(n, generator=g,
                                                                                       dtype=torch.float64)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)  # (n, d + 1)
    theta = torch.linalg.lstsq(xt, y[:, None]).solution[:, 0]  # (d + 1,): the minimum
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d][None])
        model.bias.copy_(theta[d:])
    H = 2 / n * xt.T @ xt
    return model, x, y[:, None], H, theta


def _quadratic_max(H, theta, rho, adaptive):
    D = torch.diag(theta.abs()) if adaptive else torch.eye(len(theta), dtype=H.dtype)
    return rho**2 / 2 * float(torch.linalg.eigvalsh(D @ H @ D)[-1])


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_worst_case_l2_meets_the_closed_form(regression, adaptive, rho):
    model, x, y, H, theta = regression
    exact = _quadratic_max(H, theta, rho, adaptive)
    for seed in range(3):
        r = sharpness(model, (x, y), rho, loss="mse", adaptive=adaptive, seed=seed)  # default 20 steps
        (p,) = r.points
        assert p.kind == "worst" and p.norm == "l2" and p.m == 200 and r.batches == 1
        assert 0.98 * exact <= p.sharpness <= exact * (1 + 1e-5) + 1e-7, (seed, p.sharpness, exact)


def test_worst_case_is_not_the_gradient_free_random_start(regression):
    """One step from a random start is far from the maximum: the test above needs the ascent to work."""
    model, x, y, H, theta = regression
    exact = _quadratic_max(H, theta, 0.5, True)
    one = sharpness(model, (x, y), 0.5, loss="mse", steps=1, seed=0).points[0].sharpness
    assert one < 0.98 * exact


def test_linf_worst_case_between_the_l2_ball_inside_and_the_cube_bound(regression):
    """‖u‖_∞ ≤ ρ contains the l2 ball of radius ρ and lies in the one of radius ρ√N: max between the two."""
    model, x, y, H, theta = regression
    rho, N = 0.05, len(theta)
    value = sharpness(model, (x, y), rho, norm="linf", loss="mse", restarts=2).points[0].sharpness
    assert _quadratic_max(H, theta, rho, True) <= value <= _quadratic_max(H, theta, rho * N**0.5, True) * (1 + 1e-5)


def test_m_sharpness_is_the_mean_over_batches(regression):
    model, x, y, H, theta = regression
    r = sharpness(model, (x, y), [0.0, 0.3], loss="mse", m=64, seed=1)
    assert r.batches == 3 and r.examples == 192 and r.worst.shape == (2, 3)
    zero, p = r.points
    assert zero.sharpness == 0 and zero.sem == 0
    assert p.m == 64 and p.sharpness == pytest.approx(float(r.worst[1].mean()))
    assert p.sem == pytest.approx(float(r.worst[1].std()) / 3**0.5)
    # each batch alone is the one-batch measurement on its slice (same start: batch index, restart 0 seeds)
    alone = sharpness(model, (x[64:128], y[64:128]), 0.3, loss="mse", seed=1).points[0].sharpness
    assert alone > 0 and alone == pytest.approx(float(r.worst[1, 1]), rel=0.02)


@pytest.mark.parametrize("adaptive,noise", [(True, "multiplicative"), (False, "additive")])
def test_average_case_equals_local_energy_delta_loss(regression, adaptive, noise):
    """Same seed, same draws, same examples: equal to float tolerance (in fact bit for bit)."""
    model, x, y, H, theta = regression
    rhos = [0.0, 0.1, 0.4]
    r = sharpness(model, (x, y), rhos, kind="average", adaptive=adaptive, loss="mse", samples=30, seed=5,
                  batch_size=64)
    e = local_energy(model, (x, y), rhos, samples=30, noise=noise, loss="mse", seed=5, batch_size=64)
    for p, q in zip(r.points, e.points):
        assert p.kind == "average" and p.norm is None
        assert p.sharpness == pytest.approx(q.delta_loss, rel=1e-12, abs=1e-15) and p.sem == q.loss_sem


@pytest.mark.parametrize("adaptive", [True, False])
def test_average_case_meets_half_the_trace(regression, adaptive):
    """An independent check: E[½ δᵀHδ] = ρ²/2 · tr(D H D) at a minimum of the quadratic."""
    model, x, y, H, theta = regression
    D = torch.diag(theta.abs()) if adaptive else torch.eye(len(theta), dtype=H.dtype)
    rho = 0.3
    p = sharpness(model, (x, y), rho, kind="average", adaptive=adaptive, loss="mse", samples=400).points[0]
    exact = rho**2 / 2 * float(torch.trace(D @ H @ D))
    assert abs(p.sharpness - exact) < 4 * p.sem and p.sem < 0.2 * exact


def test_both_kinds_records_and_columns(regression):
    model, x, y, H, theta = regression
    r = sharpness(model, (x, y), [0.1, 0.2], kind="both", loss="mse", samples=5)
    rows = r.records()
    assert [row["kind"] for row in rows] == ["worst", "worst", "average", "average"]
    assert list(rows[0])[:7] == ["kind", "norm", "adaptive", "rho", "m", "sharpness", "sem"]
    assert all(row["sharpness"] >= 0 for row in rows[:2])


def test_model_state_comes_back_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model(torch.randn(32, 4))  # non-trivial running statistics
    model[3].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    for bn in ("eval", "recompute"):
        r = sharpness(model, (x, y), 0.2, kind="both", bn=bn, samples=3, steps=4, m=20)
        assert all(p.sharpness >= 0 for p in r.points if p.kind == "worst")
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.training and not model[3].weight.requires_grad and model[0].weight.requires_grad


def test_units_shared_among_processes_give_the_one_process_result():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(48, 5), torch.randint(0, 2, (48,))
    run = lambda: sharpness(copy.deepcopy(model), (x, y), [0.1, 0.3], m=16, restarts=2, steps=5, seed=3)
    whole = run()
    for world in (2, 4):
        results, _ = run_team(world, run)
        for r in results:
            assert torch.equal(r.worst, whole.worst) and r.points == whole.points


def test_checkpoints_follow_croce_and_hein():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]


@pytest.mark.parametrize("kw,fragment", [({"rho": -0.1}, "rho=-0.1"), ({"kind": "max"}, "kind='max'"),
                                         ({"norm": "l1"}, "norm='l1'"), ({"m": 0}, "m=0"),
                                         ({"steps": 0}, "steps=0"), ({"rho": []}, "rho=[]")])
def test_bad_settings_are_named(regression, kw, fragment):
    model, x, y, *_ = regression
    with pytest.raises(FlatcliError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        sharpness(model, (x, y), **{"rho": 0.1, **kw})


@pytest.mark.parametrize("adaptive,rho", [(False, 0.8), (True, 0.6)])
def test_worst_case_of_a_nonlinear_two_parameter_net_meets_a_grid_search(adaptive, rho):
    """tanh(w x + b) with the mse loss, away from a minimum: the exact max over the disk by a polar grid."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(1.5 * x - 0.2) + 0.1 * torch.randn(50, 1, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh()).double()
    with torch.no_grad():
        model[0].weight.fill_(0.9)
        model[0].bias.fill_(0.3)
    w0 = torch.tensor([0.9, 0.3], dtype=torch.float64)
    c = w0.abs() if adaptive else torch.ones(2, dtype=torch.float64)
    r = torch.linspace(0, rho, 201, dtype=torch.float64)[:, None]
    t = torch.linspace(0, 2 * torch.pi, 1441, dtype=torch.float64)[None]
    w, b = w0[0] + c[0] * r * torch.cos(t), w0[1] + c[1] * r * torch.sin(t)  # (201, 1441)
    losses = ((torch.tanh(w[..., None] * x[:, 0] + b[..., None]) - y[:, 0]) ** 2).mean(-1)
    exact = float(losses.max() - losses[0, 0])
    got = sharpness(model, (x, y), rho, adaptive=adaptive, loss="mse", restarts=2).points[0].sharpness
    assert 0.99 * exact <= got <= exact * (1 + 1e-4) + 1e-6, (got, exact)
