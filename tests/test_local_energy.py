"""Local energy (MATH.md §1) against its closed form for a linear classifier and hand-written references."""
import copy
import math
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flatcli import parallel
from flatcli.errors import FlatcliError
from flatcli.losses import evaluate, tensor_batches
from flatcli.measure import local_energy, parse_sigmas
from flatcli.measure._perturb import draw_noise
from problems import noisy_linear_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def _normal_cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(t / math.sqrt(2)))


@pytest.fixture(scope="module")
def linear_problem():
    """A two-class linear classifier that makes some mistakes on its own Gaussian data."""
    return noisy_linear_classifier(d=5, label_noise=0.7)


def _expected_error(model, x, y, sigma, noise):
    """MATH.md §1: m = (w1 − w0)·x + (b1 − b0) is Gaussian; error = mean of Φ(m/sd) (y=0) or 1 − Φ(m/sd) (y=1)."""
    w, b = model.weight.detach(), model.bias.detach()
    m = x @ (w[1] - w[0]) + (b[1] - b[0])
    if noise == "multiplicative":
        var = sigma**2 * ((x**2) @ (w[0]**2 + w[1]**2) + b[0]**2 + b[1]**2)
    else:
        var = sigma**2 * (2 * (x**2).sum(1) + 2)
    p1 = _normal_cdf(m / var.sqrt())
    return float(torch.where(y == 1, 1 - p1, p1).mean())


def _true_error_std(model, x, y, sigma, noise, draws=4000):
    """Std over draws of the per-draw error, by direct Monte Carlo on the perturbed weights (independent noise)."""
    g = torch.Generator().manual_seed(123)
    w, b = model.weight.detach(), model.bias.detach()
    zw = torch.randn(draws, *w.shape, generator=g, dtype=torch.float64)
    zb = torch.randn(draws, *b.shape, generator=g, dtype=torch.float64)
    wp, bp = (w * (1 + sigma * zw), b * (1 + sigma * zb)) if noise == "multiplicative" else (w + sigma * zw,
                                                                                          b + sigma * zb)
    logits = torch.einsum("kcd,nd->knc", wp, x) + bp[:, None, :]  # (K, n, 2)
    return float((logits.argmax(-1) != y).double().mean(1).std())


@pytest.mark.parametrize("noise,sigmas", [("multiplicative", [0.0, 0.1, 0.3, 1.0]),
                                          ("additive", [0.0, 0.05, 0.2, 0.5])])
def test_closed_form_linear_classifier(linear_problem, noise, sigmas):
    model, x, y = linear_problem
    m = 200
    result = local_energy(model, (x, y), sigmas, samples=m, noise=noise, seed=7, batch_size=128)
    base = float((model(x).argmax(1) != y).double().mean())
    assert 0.05 < base < 0.5 and result.error == pytest.approx(base, abs=1e-12)
    for point, sigma in zip(result, sigmas):
        expected = _expected_error(model, x, y, sigma, noise)
        if sigma == 0:
            assert point.error_mean == base and point.samples == 0
            continue
        assert point.samples == m
        assert abs(point.error_mean - expected) < 4 * point.error_sem, (sigma, point, expected)
        true_sem = _true_error_std(model, x, y, sigma, noise) / math.sqrt(m)
        assert 0.7 < point.error_sem / true_sem < 1.4, (sigma, point.error_sem, true_sem)
        assert point.delta_error == pytest.approx(point.error_mean - base, abs=1e-15)
    assert abs(expected - base) > 10 * point.error_sem  # at the largest σ, "no effect" would fail


def test_per_draw_values_match_hand_perturbation(linear_problem):
    """Draw k is z_k = draw_noise(params, seed, k), the same at every σ (common random numbers)."""
    model, x, y = linear_problem
    sigmas, seed = [0.2, 0.0, 0.5], 3
    result = local_energy(model, (x, y), sigmas, samples=4, seed=seed)
    params = list(model.parameters())
    for k in range(4):
        z = draw_noise(params, seed, k)
        for j, sigma in enumerate(sigmas):
            w, b = (p.detach() * (1 + sigma * zp) for p, zp in zip(params, z))
            logits = x @ w.T + b
            assert result.draw_losses[k, j] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)  # float32 loss
            assert result.draw_errors[k, j] == pytest.approx(float((logits.argmax(1) != y).double().mean()))


def test_common_random_numbers_without_knowing_the_draws():
    """Additive noise on a zero net with mse to 0: loss_k(σ) = σ² u_k², so loss_k(σ)/σ² is the same at every σ."""
    model = nn.Linear(3, 1)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    x, y = torch.tensor([[1.0, 2.0, -1.0]]), torch.zeros(1, 1)
    sigmas = torch.tensor([0.01, 0.1, 0.7])
    result = local_energy(model, (x, y), sigmas.tolist(), samples=6, noise="additive", loss="mse", seed=11)
    ratio = result.draw_losses / sigmas.double() ** 2  # (M, S)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5, atol=0)
    assert ratio[:, 0].std() > 0.1 * ratio[:, 0].mean()  # and the draws differ from each other
    assert math.isnan(result.points[0].error_mean)  # no 0-1 error for regression targets


def _bn_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    net.train()
    with torch.no_grad():
        for _ in range(5):  # running statistics that differ from the defaults
            net(torch.randn(32, 4) * 2 + 1)
    return net


def _data(n=300, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_reproducible_bit_for_bit_and_seed_sensitive():
    net, (x, y) = _bn_net(), _data()
    run = lambda **kw: local_energy(net, (x, y), [0.05, 0.2], samples=5, **kw)
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert torch.equal(a.draw_losses, b.draw_losses) and torch.equal(a.draw_errors, b.draw_errors)
    assert not torch.equal(a.draw_losses, c.draw_losses)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(run(seed=g1).draw_losses, run(seed=g2).draw_losses)
    fewer = local_energy(net, (x, y), [0.05, 0.2], samples=3, seed=1)  # draw k does not depend on M
    assert torch.equal(fewer.draw_losses, a.draw_losses[:3])


@pytest.mark.parametrize("bn", ["eval", "recompute"])
def test_exact_restoration(bn):
    net, (x, y) = _bn_net(), _data()
    net[3].eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    net.eval()
    loss_before = evaluate(net, tensor_batches(x, y, 100))
    net.train(), net[3].eval()
    local_energy(net, (x, y), [0.0, 0.1, 0.5], samples=3, bn=bn)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes and net[1].momentum == 0.1
    net.eval()
    assert evaluate(net, tensor_batches(x, y, 100)) == loss_before
    F.cross_entropy(net(x), y).backward()  # the model still trains: no inference tensors left behind
    assert all(p.grad is not None for p in net.parameters())


def test_sigma_zero_is_the_unperturbed_value_and_costs_no_draws():
    net, (x, y) = _bn_net(), _data()
    calls = []
    result = local_energy(net, (x, y), [0.0, 0.1, 0.3], samples=4, callback=lambda d, t: calls.append((d, t)))
    net.eval()
    loss, err = evaluate(net, tensor_batches(x, y, 1000))
    p0 = result.points[0]
    assert (p0.samples, p0.delta_error, p0.delta_loss, p0.error_sem, p0.loss_sem) == (0, 0.0, 0.0, 0.0, 0.0)
    assert p0.error_mean == pytest.approx(err, abs=1e-12) and p0.loss_mean == pytest.approx(loss, rel=1e-6)
    assert calls == [(1, 8)] * 8  # increments, σ > 0 only: 4 draws × 2 σ
    only_zero = local_energy(net, (x, y), [0.0], samples=4, callback=lambda d, t: calls.append("no"))
    assert calls[-1] != "no" and only_zero.points[0].delta_error == 0.0


def test_bn_recompute_matches_a_hand_computation():
    net, (x, y) = _bn_net(), _data()
    xb, yb = _data(n=400, seed=5)
    sigmas, seed = [0.1, 0.4], 4
    result = local_energy(net, (x, y), sigmas, samples=2, bn="recompute", bn_data=(xb, yb), batch_size=50,
                          bn_batches=3, seed=seed)
    stored = local_energy(net, (x, y), sigmas, samples=2, bn="eval", batch_size=50, seed=seed)
    assert not torch.allclose(result.draw_losses, stored.draw_losses, rtol=1e-3)  # the test can tell them apart
    for k in range(2):
        z = draw_noise(list(net.parameters()), seed, k)
        for j, sigma in enumerate(sigmas):
            ref = copy.deepcopy(net)
            with torch.no_grad():
                for p, zp in zip(ref.parameters(), z):
                    p.add_(p * zp, alpha=sigma)
                bn = ref[1]
                bn.reset_running_stats()
                bn.momentum = None
                ref.eval(), bn.train()
                for i in range(3):
                    ref(xb[50 * i:50 * (i + 1)])
                ref.eval()
                logits = ref(x)
            assert result.draw_losses[k, j] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
            assert result.draw_errors[k, j] == pytest.approx(float((logits.argmax(1) != y).float().mean()))


def test_bn_recompute_without_batchnorm_equals_eval(linear_problem):
    model, x, y = linear_problem
    a = local_energy(model, (x, y), [0.3], samples=3, bn="recompute")
    b = local_energy(model, (x, y), [0.3], samples=3, bn="eval")
    assert torch.equal(a.draw_losses, b.draw_losses)


def test_dataloader_and_iterator_equal_tensor_input():
    net, (x, y) = _bn_net(), _data()
    ref = local_energy(net, (x, y), [0.0, 0.2], samples=3, batch_size=100)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    for data in (loader, iter(list(tensor_batches(x, y, 70)))):
        got = local_energy(net, data, [0.0, 0.2], samples=3)
        assert got.examples == 300
        torch.testing.assert_close(got.draw_losses, ref.draw_losses, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.draw_errors, ref.draw_errors, rtol=0, atol=1e-9)


class _Branchy(nn.Module):
    """A net vmap cannot run (a Python branch on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(x)
        return out if out.sum().item() > -1e9 else -out


@pytest.mark.parametrize("make", [_bn_net, _Branchy])
def test_vectorized_equals_loop(make):
    net, (x, y) = make(), _data()
    loop = local_energy(net, (x, y), [0.0, 0.1, 0.5], samples=5, vectorize=False)
    calls = []
    vec = local_energy(net, (x, y), [0.0, 0.1, 0.5], samples=5, vectorize=True, draws_per_forward=2,
                       callback=lambda d, t: calls.append((d, t)))
    assert not loop.vectorized and vec.vectorized == (make is _bn_net)
    assert sum(c[0] for c in calls) == 10 and {c[1] for c in calls} == {10}  # increments of 2 draws
    torch.testing.assert_close(vec.draw_losses, loop.draw_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vec.draw_errors, loop.draw_errors, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs", [dict(sigmas=[0.1, -0.01]), dict(sigmas=[float("nan")]), dict(sigmas=[]),
                                    dict(samples=0), dict(samples=2.5), dict(noise="gaussian"),
                                    dict(bn="train"), dict(loss="hinge"), dict(batch_size=0),
                                    dict(vectorize="yes"), dict(data=(torch.zeros(0, 4), torch.zeros(0).long())),
                                    dict(data=[]), dict(data=5),
                                    dict(data=(torch.zeros(3, 4), torch.zeros(2).long()))])
def test_bad_arguments_raise_flatcli_error(kwargs):
    net, data = _bn_net(), _data(n=20)
    args = dict(model=net, data=data, sigmas=[0.1]) | kwargs
    with pytest.raises(FlatcliError):
        local_energy(args.pop("model"), args.pop("data"), args.pop("sigmas"), **args)


def test_parse_sigmas():
    assert parse_sigmas("0,0.01,0.05") == [0.0, 0.01, 0.05]
    assert parse_sigmas(" 0.05, 0 ,0.05") == [0.0, 0.05]  # sorted, duplicates removed
    assert parse_sigmas("0:0.1:11") == pytest.approx([i / 100 for i in range(11)], abs=1e-15)
    assert parse_sigmas("0:0.1:11")[3] == 0.03  # printed cleanly
    assert parse_sigmas("0.2:0.2:1") == [0.2]
    for bad in ["", "abc", "0,,0.1", "0:1", "0:1:2:3", "0:1:0", "0:1:2.5", "-0.1,0.2", "0:-1:3", "nan", "inf,1"]:
        with pytest.raises(FlatcliError):
            parse_sigmas(bad)


def test_draws_shared_among_processes_give_the_one_process_result_exactly():
    """Under a team each process computes its draws k ≡ rank (mod world); the gathered result is bit-identical."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    sigmas = [0.0, 0.1, 0.3]
    whole = local_energy(model, (x, y), sigmas, samples=5, seed=9, batch_size=16)
    for world in (2, 3, 7):  # 7 > samples: some processes hold no draw at all
        results, calls = run_team(world, lambda: local_energy(copy.deepcopy(model), (x, y), sigmas, samples=5,
                                                              seed=9, batch_size=16))
        assert calls == [1] * world  # one gather of the draws
        for r in results:
            assert torch.equal(r.draw_errors, whole.draw_errors) and torch.equal(r.draw_losses, whole.draw_losses)
            assert r.points == whole.points


def run_team(world, measure):
    """``measure()`` in ``world`` threads, each a member of a team whose all-gather is a real meeting (a
    barrier), as torchrun processes would be. Returns each member's result (or exception) and gather counts."""
    box, out, calls = [None] * world, [None] * world, [0] * world
    barrier = threading.Barrier(world, timeout=120)

    def all_gather(rank):
        def gather(obj):
            calls[rank] += 1
            box[rank] = obj
            barrier.wait()
            everyone = list(box)
            barrier.wait()
            return everyone
        return gather

    def member(rank):
        try:
            with parallel.sharing(parallel.Team(rank, world, all_gather(rank))):
                out[rank] = measure()
        except Exception as e:  # reported to the test
            out[rank] = e

    threads = [threading.Thread(target=member, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, calls
