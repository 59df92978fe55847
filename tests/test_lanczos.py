"""Lanczos and Hessian-vector products against dense oracles: torch.linalg.eigh, torch.autograd.functional.hessian."""
import pytest
import torch
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.measure._lanczos import hvp_function, lanczos

pytestmark = pytest.mark.usefixtures("one_thread")


def symmetric(n=60, seed=0):
    """A symmetric matrix with a spread spectrum of both signs (distinct eigenvalues)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.linspace(-3, 10, n, dtype=torch.float64) ** 3 / 100
    return q @ torch.diag(values) @ q.T


@pytest.mark.parametrize("which", ["LA", "SA", "both"])
def test_extreme_eigenpairs_of_an_explicit_matrix(which):
    A = symmetric()
    exact = torch.linalg.eigvalsh(A)  # ascending
    values, vectors, iters, converged = lanczos(lambda v: A @ v, 60, 3, which=which, tol=1e-10,
                                                generator=torch.Generator().manual_seed(1))
    want = {"LA": exact.flip(0)[:3], "SA": exact[:3], "both": torch.cat([exact.flip(0)[:3], exact[:3]])}[which]
    torch.testing.assert_close(values, want, rtol=1e-9, atol=1e-12)
    residual = A @ vectors - vectors * values  # (N, K)
    assert float(residual.norm(dim=0).max()) <= 1e-8 * float(exact.abs().max())
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(len(values), dtype=torch.float64), atol=1e-10, rtol=0)
    assert converged and iters < 60  # stopped early, before the whole space


def test_both_takes_a_different_number_at_each_end():
    A = symmetric()
    exact = torch.linalg.eigvalsh(A)
    values, _, _, _ = lanczos(lambda v: A @ v, 60, (2, 1), which="both", tol=1e-10,
                              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(values, torch.stack([exact[-1], exact[-2], exact[0]]), rtol=1e-9, atol=1e-12)


def test_too_few_iterations_report_not_converged():
    A = symmetric()
    _, _, iters, converged = lanczos(lambda v: A @ v, 60, 1, tol=1e-12, max_iters=4,
                                     generator=torch.Generator().manual_seed(0))
    assert iters == 4 and not converged


def test_a_matrix_smaller_than_the_basis_is_solved_exactly():
    A = symmetric(n=5)
    values, _, iters, converged = lanczos(lambda v: A @ v, 5, 5, tol=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(A).flip(0), rtol=1e-9, atol=1e-12)
    assert converged and iters == 5


@pytest.mark.parametrize("k, which", [(0, "LA"), (61, "SA"), (1, "LM")])
def test_bad_requests_are_user_errors(k, which):
    with pytest.raises(FlatcliError):
        lanczos(lambda v: v, 60, k, which=which)


def mlp_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(37, 4), torch.randint(0, 3, (37,))
    return model, x, y


def exact_hessian(model, x, y, loss_fn):
    """The dense Hessian of the mean loss over all parameters (model.parameters() order), float64."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def f(w):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = w[i:i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(torch.func.functional_call(model.double(), ps, (x.double(),)), y)
    H = torch.autograd.functional.hessian(f, flat)
    model.float()
    return H


@pytest.mark.parametrize("method", ["func", "double-backward"])
def test_hvp_equals_the_exact_hessian_times_v_summed_over_chunks(method):
    model, x, y = mlp_and_data()
    H = exact_hessian(model, x, y, nn.functional.cross_entropy)
    matvec, dim = hvp_function(model, (x, y), "cross-entropy", batch_size=10, method=method)  # 4 chunks
    assert dim == H.shape[0] == sum(p.numel() for p in model.parameters())
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(matvec(v), H @ v, rtol=1e-5, atol=1e-6)
    assert matvec(v.float()).dtype == torch.float32


class OwnTanh(torch.autograd.Function):
    """tanh with a hand-written backward and no forward-mode rule: torch.func.jvp cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)  # differentiable again: double backward works


class OwnTanhNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net[2](OwnTanh.apply(self.net[0](x)))


def test_auto_falls_back_to_double_backward_when_torch_func_cannot_run_the_model():
    model, x, y = mlp_and_data()
    H = exact_hessian(model, x, y, nn.functional.cross_entropy)
    matvec, dim = hvp_function(OwnTanhNet(model), (x, y), "cross-entropy", batch_size=16)
    assert matvec.method == "double-backward"
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(matvec(v), H @ v, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception):
        hvp_function(OwnTanhNet(model), (x, y), "cross-entropy", batch_size=16, method="func")[0](v)


def test_lanczos_on_hvp_finds_the_exact_hessian_extremes():
    model, x, y = mlp_and_data(seed=1)
    H = exact_hessian(model, x, y, nn.functional.cross_entropy)
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < -1e-4  # a random net is not at a minimum: a clearly negative direction exists
    matvec, dim = hvp_function(model, (x, y), "cross-entropy", batch_size=16)
    values, _, _, converged = lanczos(matvec, dim, (3, 1), which="both", tol=1e-6,
                                      generator=torch.Generator().manual_seed(0))
    assert converged
    torch.testing.assert_close(values, torch.stack([exact[-1], exact[-2], exact[-3], exact[0]]), rtol=1e-4, atol=0)
