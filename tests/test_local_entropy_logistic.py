"""Local entropy of a 2-parameter logistic regression (synthetic 2-D data, a non-quadratic loss) against
quadrature of its integral on a fine grid, at the minimum and away from it, with β = n and β = 5:

    s(γ) = (1/2) [ log ∫ exp(−β (L(w') − L(w)) − (βγ/2) |w' − w|²) dw' − log(2π/(βγ)) ]     (MATH.md §2, N = 2)
"""
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn
from torch.nn import functional as F

from flatcli.measure.local_entropy import local_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMAS = [0.1, 1.0, 10.0]


def data(n=30):
    g = np.random.default_rng(3)
    x = g.standard_normal((n, 2))
    y = (g.random(n) < 1 / (1 + np.exp(-x @ np.array([1.5, -1.0])))).astype(np.float64)
    return x, y


def loss_np(W, x, y):
    """Mean logistic loss at each row of W (M, 2)."""
    z = W @ x.T  # (M, n)
    return (np.logaddexp(0, z) - y * z).mean(1)


def minimum(x, y):
    w = np.zeros(2)
    for _ in range(50):  # Newton
        p = 1 / (1 + np.exp(-x @ w))
        grad, hess = x.T @ (p - y) / len(y), (x.T * (p * (1 - p))) @ x / len(y)
        w -= np.linalg.solve(hess, grad)
    return w


def quadrature(w, x, y, beta, gammas, half=12.0, step=0.025):
    """s(γ) by the uniform-grid rule (spectrally accurate for this smooth, fast-decaying integrand)."""
    u = np.arange(-half, half + step / 2, step)
    L0 = loss_np(w[None], x, y)[0]
    logs = {g: [] for g in gammas}
    for a in u:  # one grid row at a time
        W = w + np.stack([np.full_like(u, a), u], 1)
        dL, r2 = loss_np(W, x, y) - L0, a ** 2 + u ** 2
        for g in gammas:
            logs[g].append(-beta * dL - beta * g / 2 * r2)
    return {g: 0.5 * (logsumexp(np.concatenate(logs[g])) + 2 * np.log(step) - np.log(2 * np.pi / (beta * g)))
            for g in gammas}


def bce(out, target):
    return F.binary_cross_entropy_with_logits(out[:, 0], target)


@pytest.mark.parametrize("beta", [None, 5.0])  # None: β = n
@pytest.mark.parametrize("away", [False, True])
def test_matches_quadrature_within_three_standard_errors(beta, away):
    x, y = data()
    w = minimum(x, y) + (np.array([0.6, 0.4]) if away else 0)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w[None], dtype=torch.float32))
    w32 = model.weight.detach().double().numpy()[0]  # the weights the chains start from
    r = local_entropy(model, (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)),
                      GAMMAS, beta=beta, loss=bce, steps=400, burn_in=80, chains=8, chains_per_pass=8)
    exact = quadrature(w32, x, y, r.beta, GAMMAS)
    for row in r.rows:
        assert abs(row.local_entropy - exact[row.gamma]) < 3 * row.local_entropy_sem, (row, exact[row.gamma])
    assert max(abs(v) for v in exact.values()) > 0.04  # far from a flat landscape: a real test
    if away:  # really away: the loss there is well above the minimum's
        assert r.loss > loss_np(minimum(x, y)[None], x, y)[0] + 0.02
