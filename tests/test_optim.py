"""EntropySGD and ReplicatedSGD against hand-written Algorithms 1 and 2 (MATH.md §3-4), closed-form noise
sizes, torch.optim.SGD in the degenerate cases, resume from state_dict, and a plain training loop."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatcli.optim import EntropySGD, ReplicatedSGD

TOL = dict(rtol=1e-5, atol=1e-6)
SGD_OPTIONS = [(0.0, False, 0.0), (0.9, False, 0.01), (0.8, True, 0.0)]  # momentum, nesterov, weight_decay


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))  # params: W1 (5,3), b1, W2 (2,5), b2


def make_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def reference_grad(ws, x, y):
    """∇ of mean((tanh(x W1ᵀ + b1) W2ᵀ + b2 − y)²) on plain tensors, the same net written by hand."""
    ws = [w.detach().clone().requires_grad_() for w in ws]
    w1, b1, w2, b2 = ws
    loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
    return list(torch.autograd.grad(loss, ws)), loss.item()


def closure_over(model, opt, batches, start=0):
    """A closure that takes the next batch each call, zeroes, backprops and returns the loss."""
    it = iter(batches[start:])

    def closure():
        opt.zero_grad()
        x, y = next(it)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    return closure


def assert_params_equal(params, expected, **tol):
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, **(tol or TOL))


# ---------------------------------------------------------------- Algorithm 1, step by step

def esgd_reference(w, batches, steps, *, lr, langevin_lr, L, gamma, gamma_growth, noise, alpha, gen):
    """Seed Algorithm 1 (MATH.md §3) on plain tensors; yields (w, mean inner loss) after each outer step."""
    it = iter(batches)
    for t in range(steps):
        gamma_t = gamma * (1 + gamma_growth) ** t
        wp, mu, losses = [x.clone() for x in w], [x.clone() for x in w], []
        for _ in range(L):
            grads, loss = reference_grad(wp, *next(it))
            losses.append(loss)
            for i in range(len(w)):
                dw = grads[i] + gamma_t * (wp[i] - w[i])
                xi = torch.randn(w[i].shape, generator=gen) if noise else 0.0
                wp[i] = wp[i] - langevin_lr * dw + math.sqrt(langevin_lr) * noise * xi
                mu[i] = alpha * mu[i] + (1 - alpha) * wp[i]
        w = [w[i] - lr * (w[i] - mu[i]) for i in range(len(w))]
        yield w, sum(losses) / L


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_esgd_matches_algorithm_1(noise):
    hp = dict(lr=0.7, langevin_lr=0.2, gamma=0.5, gamma_growth=0.3, noise=noise, alpha=0.6)
    steps, L = 4, 3
    model, batches = make_model(1), make_batches(steps * L)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = EntropySGD(model.parameters(), langevin_steps=L, generator=torch.Generator().manual_seed(5), **hp)
    ref = esgd_reference(w0, batches, steps, L=L, gen=torch.Generator().manual_seed(5), **hp)
    closure = closure_over(model, opt, batches)
    for t, (w_ref, loss_ref) in enumerate(ref):
        loss = opt.step(closure)
        assert_params_equal(model.parameters(), w_ref)
        assert loss.item() == pytest.approx(loss_ref, rel=1e-5)   # the mean of the L closure losses
        assert opt.current_gamma == pytest.approx(0.5 * 1.3 ** (t + 1))
    assert not torch.equal(w0[0], model[0].weight)


@pytest.mark.parametrize("L", [1, 4])
def test_esgd_noise_size_matches_closed_form(L):
    """Zero loss, γ = 0: after l Langevin steps w' − w = c Σ_{k≤l} ξ_k with c = sqrt(η') ε, so
    μ − w = (1 − α) Σ_l α^{L−l} (w'_l − w) = c Σ_k (1 − α^{L−k+1}) ξ_k, and the move η (μ − w) has
    std η sqrt(η') ε sqrt(Σ_{j=1..L} (1 − α^j)²); for L = 1 that is η (1 − α) sqrt(η') ε."""
    lr, langevin_lr, noise, alpha, n = 0.5, 0.04, 0.1, 0.6, 200_000
    p = nn.Parameter(torch.zeros(n))
    opt = EntropySGD([p], lr=lr, langevin_lr=langevin_lr, langevin_steps=L, gamma=0.0, noise=noise,
                     alpha=alpha, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = (p * 0).sum()
        loss.backward()
        return loss
    opt.step(closure)
    expected = lr * math.sqrt(langevin_lr) * noise * math.sqrt(sum((1 - alpha**j) ** 2 for j in range(1, L + 1)))
    if L == 1:
        assert expected == pytest.approx(lr * (1 - alpha) * math.sqrt(langevin_lr) * noise)
    move = p.detach()
    assert move.std().item() == pytest.approx(expected, rel=0.01)   # std error of the std: 1/sqrt(2n) = 0.16%
    assert abs(move.mean().item()) < 5 * expected / math.sqrt(n)


@pytest.mark.parametrize("momentum,nesterov,weight_decay", SGD_OPTIONS)
def test_esgd_with_one_step_no_averaging_is_sgd(momentum, nesterov, weight_decay):
    """L = 1, α = 0, η = 1, ε = 0: w' = w − η' ∇L(w), μ = w', w ← μ — torch.optim.SGD with lr η'."""
    opts = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    model, batches = make_model(2), make_batches(6)
    twin = copy.deepcopy(model)
    esgd = EntropySGD(model.parameters(), lr=1.0, langevin_lr=0.1, langevin_steps=1, gamma=0.7, noise=0.0,
                      alpha=0.0, **opts)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, **opts)
    c1, c2 = closure_over(model, esgd, batches), closure_over(twin, sgd, batches)
    for _ in batches:
        esgd.step(c1)
        sgd.step(c2)
        assert_params_equal(model.parameters(), [p.detach() for p in twin.parameters()])
    assert not torch.equal(model[0].weight, make_model(2)[0].weight)


# ---------------------------------------------------------------- Algorithm 2, step by step

def rsgd_reference(replicas, batches, steps, *, lr, coupling, K, gamma_growth):
    """Seed Algorithm 2 (MATH.md §4) on plain tensors; batches[t][a] is replica a's minibatch at step t."""
    ws = [[w.clone() for w in r] for r in replicas]
    y = len(ws)
    for t in range(1, steps + 1):
        gamma_t = coupling * (1 + gamma_growth) ** (t - 1)  # exponent: steps already completed (MATH.md §4)
        center = [sum(ws[a][i] for a in range(y)) / y for i in range(len(ws[0]))]
        for a in range(y):
            grads, _ = reference_grad(ws[a], *batches[t - 1][a])
            if t % K == 0:
                grads = [g + K * gamma_t * (w - c) for g, w, c in zip(grads, ws[a], center)]
            ws[a] = [w - lr * g for w, g in zip(ws[a], grads)]
        yield ws


def backward_each(models, batch_per_replica):
    for m, (x, y) in zip(models, batch_per_replica):
        F.mse_loss(m(x), y).backward()


@pytest.mark.parametrize("K", [1, 3])
def test_rsgd_matches_algorithm_2(K):
    steps, y = 7, 3
    hp = dict(lr=0.1, coupling=0.5, gamma_growth=0.1)
    models = [make_model(10 + a) for a in range(y)]
    batches = [make_batches(y, seed=100 + t) for t in range(steps)]
    start = [[p.detach().clone() for p in m.parameters()] for m in models]
    opt = ReplicatedSGD([m.parameters() for m in models], coupling_every=K, **hp)
    ref = rsgd_reference(start, batches, steps, K=K, **hp)
    uncoupled = rsgd_reference(start, batches, steps, K=K, **{**hp, "coupling": 0.0})
    for t, (ws, free) in enumerate(zip(ref, uncoupled), start=1):
        assert opt.will_couple() == (t % K == 0)
        center = opt.center()                                  # w̄ of the replicas as they are now
        torch.testing.assert_close(center[2], sum(m[2].weight.detach() for m in models) / y)
        opt.zero_grad()
        backward_each(models, batches[t - 1])
        opt.step()
        for m, w in zip(models, ws):
            assert_params_equal(m.parameters(), w)
        # the coupling really acts at t ≡ 0 (mod K) and only there
        assert torch.allclose(ws[0][0], free[0][0]) == (t < K)


@pytest.mark.parametrize("momentum,nesterov,weight_decay", SGD_OPTIONS)
def test_rsgd_without_coupling_is_independent_sgd(momentum, nesterov, weight_decay):
    opts = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    models = [make_model(20 + a) for a in range(3)]
    twins = [copy.deepcopy(m) for m in models]
    rsgd = ReplicatedSGD([m.parameters() for m in models], lr=0.1, coupling=0.0, coupling_every=2, **opts)
    sgds = [torch.optim.SGD(m.parameters(), lr=0.1, **opts) for m in twins]
    for t in range(5):
        batch = make_batches(3, seed=200 + t)
        rsgd.zero_grad()
        backward_each(models, batch)
        rsgd.step()
        for twin, sgd, (x, y) in zip(twins, sgds, batch):
            sgd.zero_grad()
            F.mse_loss(twin(x), y).backward()
            sgd.step()
        for m, twin in zip(models, twins):
            assert_params_equal(m.parameters(), [p.detach() for p in twin.parameters()])
    assert not torch.equal(models[0][0].weight, make_model(20)[0].weight)


# ---------------------------------------------------------------- γ scoping and resume

def test_gamma_scoping_over_steps():
    """One formula for both: γ_t = γ_0 (1 + γ_1)^t with t = the steps already completed (γ_0 at the first step)."""
    p = nn.Parameter(torch.ones(3))
    esgd = EntropySGD([p], langevin_steps=2, gamma=0.03, gamma_growth=0.1, noise=0.0)
    replicas = [[nn.Parameter(torch.full((3,), float(a)))] for a in range(2)]
    rsgd = ReplicatedSGD(replicas, coupling=0.2, gamma_growth=0.5)

    def closure():
        esgd.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss
    for t in range(5):
        assert esgd.current_gamma == pytest.approx(0.03 * 1.1**t, rel=1e-12)
        assert rsgd.current_gamma == pytest.approx(0.2 * 1.5 ** t, rel=1e-12)
        esgd.step(closure)
        for (q,) in replicas:
            q.grad = torch.zeros_like(q)
        rsgd.step()


def roundtrip(state: dict) -> dict:
    """Through bytes and back, loaded the way a checkpoint is: no code execution."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_esgd_state_dict_resume_continues_identically():
    hp = dict(lr=0.8, langevin_steps=2, gamma=0.3, gamma_growth=0.2, noise=0.05, momentum=0.9, weight_decay=1e-3)
    batches = make_batches(12)
    model, gen = make_model(3), torch.Generator().manual_seed(7)
    opt = EntropySGD(model.parameters(), generator=gen, **hp)
    closure = closure_over(model, opt, batches)
    for _ in range(3):
        opt.step(closure)
    saved = roundtrip({"opt": opt.state_dict(), "model": model.state_dict(), "gen": gen.get_state()})
    for _ in range(3):
        opt.step(closure)

    model2, gen2 = make_model(4), torch.Generator().manual_seed(8)   # fresh run, different init and seed
    opt2 = EntropySGD(model2.parameters(), generator=gen2, **hp)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    gen2.set_state(saved["gen"])                                     # the caller saves the generator
    assert opt2.current_gamma == pytest.approx(0.3 * 1.2**3)
    closure2 = closure_over(model2, opt2, batches, start=6)
    for _ in range(3):
        opt2.step(closure2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rsgd_state_dict_resume_continues_identically():
    hp = dict(lr=0.1, coupling=0.4, coupling_every=2, gamma_growth=0.3, momentum=0.9, nesterov=True)
    batches = [make_batches(2, seed=300 + t) for t in range(6)]

    def run(models, opt, steps):
        for batch in steps:
            opt.zero_grad()
            backward_each(models, batch)
            opt.step()
    models = [make_model(30 + a) for a in range(2)]
    opt = ReplicatedSGD([m.parameters() for m in models], **hp)
    run(models, opt, batches[:3])
    saved = roundtrip({"opt": opt.state_dict(), "models": [m.state_dict() for m in models]})
    run(models, opt, batches[3:])

    models2 = [make_model(40 + a) for a in range(2)]
    opt2 = ReplicatedSGD([m.parameters() for m in models2], **hp)
    for m, s in zip(models2, saved["models"]):
        m.load_state_dict(s)
    opt2.load_state_dict(saved["opt"])
    assert opt2.will_couple() and opt2.current_gamma == pytest.approx(0.4 * 1.3**3)
    run(models2, opt2, batches[3:])
    for m, m2 in zip(models, models2):
        for p, q in zip(m.parameters(), m2.parameters()):
            assert torch.equal(p, q)


# ---------------------------------------------------------------- in a user's training loop

def toy_regression(seed: int = 0, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g) / math.sqrt(8))
    return x, y


def minibatches(x, y, batch_size, generator):
    while True:
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            yield x[idx], y[idx]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def test_esgd_in_a_training_loop_with_default_hyper_parameters():
    x, y = toy_regression()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp()
    initial = F.mse_loss(model(x), y).item()

    opt = EntropySGD(model.parameters(), generator=gen)
    batches = minibatches(x, y, 32, gen)
    for _ in range(60):
        def closure():
            opt.zero_grad()
            xb, yb = next(batches)
            loss = F.mse_loss(model(xb), yb)
            loss.backward()
            return loss
        opt.step(closure)

    assert F.mse_loss(model(x), y).item() < 0.2 * initial


def test_rsgd_in_a_training_loop_center_learns():
    x, y = toy_regression()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    replicas = [mlp() for _ in range(3)]
    center_model = mlp()
    loss_of_center = lambda: F.mse_loss(center_model(x), y).item()  # noqa: E731
    opt = ReplicatedSGD([m.parameters() for m in replicas], coupling=1.0)
    with torch.no_grad():
        torch._foreach_copy_(list(center_model.parameters()), opt.center())
    initial = loss_of_center()

    batches = minibatches(x, y, 32, gen)
    for _ in range(300):
        opt.zero_grad()
        for m in replicas:                              # each replica draws its own minibatch
            xb, yb = next(batches)
            F.mse_loss(m(xb), yb).backward()
        opt.step()

    with torch.no_grad():
        torch._foreach_copy_(list(center_model.parameters()), opt.center())
    assert loss_of_center() < 0.1 * initial


# ---------------------------------------------------------------- bad hyper-parameters

@pytest.mark.parametrize("kwargs,named", [
    (dict(lr=-1.0), "lr"), (dict(langevin_lr=-0.1), "langevin_lr"), (dict(langevin_steps=0), "langevin_steps"),
    (dict(langevin_steps=2.5), "langevin_steps"), (dict(gamma=-1.0), "gamma"),
    (dict(gamma_growth=-0.1), "gamma_growth"), (dict(noise=-1e-4), "noise"), (dict(alpha=1.0), "alpha"),
    (dict(alpha=-0.1), "alpha"), (dict(momentum=-0.5), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(nesterov=True), "nesterov"),
])
def test_esgd_rejects_bad_hyper_parameters(kwargs, named):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=rf"{named}.*: {value!r}"):
        EntropySGD(make_model(0).parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,named", [
    (dict(lr=-1.0), "lr"), (dict(coupling=-0.1), "coupling"), (dict(coupling_every=0), "coupling_every"),
    (dict(coupling_every=1.5), "coupling_every"), (dict(gamma_growth=-0.1), "gamma_growth"),
    (dict(momentum=-0.5), "momentum"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(nesterov=True), "nesterov"),
])
def test_rsgd_rejects_bad_hyper_parameters(kwargs, named):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=rf"{named}.*: {value!r}"):
        ReplicatedSGD([make_model(0).parameters(), make_model(1).parameters()], **kwargs)


def test_rsgd_rejects_one_replica_and_mismatched_shapes():
    with pytest.raises(ValueError, match="number of replicas: 1"):
        ReplicatedSGD([make_model(0).parameters()])
    other = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"shapes of replica 1.*\(6, 3\)"):
        ReplicatedSGD([make_model(0).parameters(), other.parameters()])


def test_esgd_step_needs_a_closure():
    with pytest.raises(ValueError, match="closure"):
        EntropySGD(make_model(0).parameters()).step(None)


def test_the_optimizers_defaults_are_the_cli_defaults():
    """`ReplicatedSGD(params)` in a notebook and `flatcli train --algo rsgd` step with the same η (eSGD too)."""
    import inspect

    from flatcli.training.config import DEFAULT_LR, TrainConfig
    for cls, algo in ((ReplicatedSGD, "rsgd"), (EntropySGD, "esgd")):
        assert inspect.signature(cls).parameters["lr"].default == DEFAULT_LR[algo]
        assert TrainConfig(algo=algo).validate().lr == DEFAULT_LR[algo]
    assert inspect.signature(ReplicatedSGD).parameters["coupling"].default == TrainConfig().gamma
