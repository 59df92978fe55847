"""PAC-Bayes flatness (MATH.md §6) against the closed form of a two-class linear classifier under Gaussian weight
noise: the decision variable is Gaussian, so the expected error is an average of normal CDFs (MATH.md §1)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from scipy.optimize import brentq

from flatcli.errors import FlatcliError
from flatcli.measure.pac_bayes import pac_bayes_sigma
from test_local_energy import run_team
from problems import noisy_linear_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def linear_problem():
    """A two-class linear classifier on Gaussian data that makes some mistakes; weights of mixed sizes. With 40
    inputs the noise moves the examples' margins nearly independently, so a few hundred draws pin σ* down."""
    return noisy_linear_classifier(d=40, label_noise=2)


def expected_error(model, x, y, sigma, noise, epsilon=1e-3, variance_bug=False):
    """E_u[ε(w + u)]: m = (w1 − w0)·x + (b1 − b0) is Gaussian with variance Σ_i (s_1i² + s_0i²) x_i² + s_b1² + s_b0²,
    s the per-weight noise std: σ (plain) or sqrt(σ² w² + ε²) (magnitude-aware; with ``variance_bug`` the
    variance σ² w² + ε² is used as the std, the mistake the issue describes)."""
    w, b = model.weight.detach(), model.bias.detach()
    if noise == "plain":
        sw, sb = torch.full_like(w, sigma), torch.full_like(b, sigma)
    else:
        vw, vb = sigma**2 * w**2 + epsilon**2, sigma**2 * b**2 + epsilon**2
        sw, sb = (vw, vb) if variance_bug else (vw.sqrt(), vb.sqrt())
    m = x @ (w[1] - w[0]) + (b[1] - b[0])
    var = (x**2) @ (sw[0]**2 + sw[1]**2) + sb[0]**2 + sb[1]**2
    p1 = 0.5 * (1 + torch.erf(m / (2 * var).sqrt()))
    return float(torch.where(y == 1, 1 - p1, p1).mean())


def sigma_star(model, x, y, noise, target=0.1, **kw):
    base = float((model(x).argmax(1) != y).double().mean())
    return brentq(lambda s: expected_error(model, x, y, s, noise, **kw) - base - target, 1e-6, 50, xtol=1e-10)


@pytest.mark.parametrize("noise,epsilon", [("magnitude-aware", 1e-3), ("plain", 1e-3), ("magnitude-aware", 0.15)])
def test_sigma_meets_the_closed_form(linear_problem, noise, epsilon):
    model, x, y = linear_problem
    exact = sigma_star(model, x, y, noise, epsilon=epsilon)
    r = pac_bayes_sigma(model, (x, y), noise=noise, epsilon=epsilon, samples=300, max_sigma=4.0, seed=3,
                        tolerance=1e-3)
    assert 0.08 < r.error < 0.4 and not r.at_max
    assert r.sigma == pytest.approx(exact, rel=0.05), (r.sigma, exact)
    assert r.flatness == pytest.approx(1 / r.sigma**2) and r.deviation <= 0.1 < dict(r.trace)[r.sigma_high]
    assert r.sigma_high - r.sigma <= 1e-3 * r.sigma_high and r.probes == len(r.trace) <= 40


@pytest.mark.parametrize("epsilon", [1e-3, 0.15])
def test_a_variance_passed_as_a_std_would_be_caught(linear_problem, epsilon):
    """The wrong noise std σ² w² + ε² gives a σ* that the test above would reject (outside twice its 5%)."""
    model, x, y = linear_problem
    right = sigma_star(model, x, y, "magnitude-aware", epsilon=epsilon)
    wrong = sigma_star(model, x, y, "magnitude-aware", epsilon=epsilon, variance_bug=True)
    assert abs(wrong / right - 1) > 0.1, (right, wrong)


def test_stops_at_max_sigma_and_at_zero(linear_problem):
    model, x, y = linear_problem
    r = pac_bayes_sigma(model, (x, y), max_sigma=1e-4, samples=5)
    assert r.at_max and r.sigma == 1e-4 and r.probes == 1
    r = pac_bayes_sigma(model, (x, y), epsilon=10.0, samples=5)  # the ε₀ noise alone ruins the classifier
    assert r.sigma == 0 and r.flatness == math.inf and r.probes == 2


def test_common_random_numbers_and_seed(linear_problem):
    model, x, y = linear_problem
    a = pac_bayes_sigma(model, (x, y), samples=10, seed=1)
    b = pac_bayes_sigma(model, (x, y), samples=10, seed=1, batch_size=37)
    c = pac_bayes_sigma(model, (x, y), samples=10, seed=2)
    assert [d for _, d in a.trace] == pytest.approx([d for _, d in b.trace], abs=1e-12)
    assert [s for s, _ in a.trace] == [s for s, _ in b.trace] and a.trace != c.trace


def test_shared_among_processes_gives_the_one_process_result(linear_problem):
    model, x, y = linear_problem
    run = lambda: pac_bayes_sigma(copy.deepcopy(model), (x, y), samples=7, seed=4)
    whole = run()
    for world in (2, 3):
        results, _ = run_team(world, run)
        assert all(r == whole for r in results)


def test_model_state_comes_back_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model(torch.randn(32, 4))
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    for bn in ("eval", "recompute"):
        pac_bayes_sigma(model, (x, y), bn=bn, samples=3, tolerance=0.1)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training


def test_records_columns(linear_problem):
    model, x, y = linear_problem
    (row,) = pac_bayes_sigma(model, (x, y), samples=3, tolerance=0.1).records()
    assert list(row)[:4] == ["noise", "target", "sigma", "flatness"]


@pytest.mark.parametrize("kw,fragment", [({"target": 0}, "target=0"), ({"noise": "gauss"}, "noise='gauss'"),
                                         ({"samples": 0}, "samples=0"), ({"max_sigma": -1.0}, "max_sigma=-1"),
                                         ({"tolerance": 2.0}, "tolerance=2")])
def test_bad_settings_are_named(linear_problem, kw, fragment):
    model, x, y = linear_problem
    with pytest.raises(FlatcliError, match=fragment):
        pac_bayes_sigma(model, (x, y), **kw)


def test_regression_targets_are_refused():
    with pytest.raises(FlatcliError, match="class labels"):
        pac_bayes_sigma(nn.Linear(3, 1), (torch.randn(8, 3), torch.randn(8, 1)), loss="mse")
