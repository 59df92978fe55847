"""Extreme eigenpairs of a symmetric operator by Lanczos, and Hessian-vector products of a model's mean loss.

``lanczos`` runs the Lanczos recurrence with full reorthogonalization (classical Gram–Schmidt, twice, against
every earlier basis vector), so the basis stays orthonormal to working precision and no spurious copies of
converged eigenvalues appear (Golub & Van Loan, Matrix Computations, §10.3). After each step it takes the Ritz
pairs (θ_i, y_i = Q s_i) of the tridiagonal T_m = Qᵀ A Q; the residual of a pair is known without a product,

    ‖A y_i − θ_i y_i‖ = |β_m · s_{m,i}|,

and a pair is converged when that residual is at most ``tol · max(|θ_i|, eps32^(2/3) · max_j |θ_j|)``: then
an eigenvalue of A lies within that distance of θ_i (Bauer–Fike for symmetric A), i.e. θ_i is exact to ``tol``
relative (the floor, as in ARPACK, lets eigenvalues near 0 converge). Limitation shared by every single-vector
Krylov method: of an eigenvalue repeated exactly, only one copy is found.

``hvp_function`` gives v ↦ H v for H the Hessian of the MEAN loss over all examples, w.r.t. all parameters
flattened in ``model.parameters()`` order: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``)
or double backward (whichever a timed trial finds faster, double backward if torch.func cannot run the
model), one data chunk at a time (memory: one chunk's graph; a process with a single chunk keeps its
gradient's graph and reuses it for every product).
Chunks are summed in float64. Under a team (``flatcli.parallel``) process r computes the chunks c ≡ r (mod
world) and the partial sums are added over processes: the product equals one process's up to float64 sum order.
"""
import time
from typing import Callable

import torch
import torch.nn as nn

from flatcli import parallel
from flatcli.errors import FlatcliError
from flatcli.losses import per_example_loss

EPS23 = torch.finfo(torch.float32).eps ** (2 / 3)  # ARPACK's floor on the relative tolerance scale


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, k, which: str = "LA", tol: float = 1e-6,
            max_iters: int | None = None, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64, device=None):
    """The k extreme eigenpairs of the symmetric operator ``matvec`` on vectors of length ``dim``.

    which: "LA" the k largest (algebraic), largest first; "SA" the k smallest, most negative first; "both":
    k may be an int or a pair (k_largest, k_smallest); the largest come first (largest first), then the
    smallest (most negative first). tol: relative residual tolerance (module docstring). max_iters: Krylov
    dimension at most (default min(dim, 500)); the run stops early once every wanted pair has converged.
    generator: draws the start vector (its device is the default ``device``, where the basis is kept, in
    ``dtype``; a CPU generator gives the same start vector on every device).

    Returns (eigenvalues (K,), eigenvectors (dim, K) with unit columns, iterations = products made, converged).
    """
    top, bottom = _wanted(k, which, dim)
    device = torch.device(device) if device is not None else (generator.device if generator else torch.device("cpu"))
    m_max = min(dim, 500) if max_iters is None else min(dim, max_iters)
    if m_max < 1:
        raise FlatcliError(f"max_iters={max_iters!r} allows no Lanczos step", "give max_iters an integer >= 1")
    Q = torch.zeros(dim, m_max, dtype=dtype, device=device)  # (N, m) the orthonormal Krylov basis
    alpha, beta = [], []  # T's diagonal and off-diagonal
    q = _randn(dim, generator, device, dtype)
    Q[:, 0] = q / q.norm()
    for j in range(m_max):
        w = matvec(Q[:, j]).to(dtype)
        alpha.append(float(Q[:, j] @ w))
        for _ in range(2):  # full reorthogonalization against Q[:, :j+1] (which also removes α q_j, β q_{j-1})
            w -= Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        b = float(w.norm())
        theta, S = _ritz(alpha, beta)
        if j + 1 >= top + bottom and _converged(theta, S, b, top, bottom, tol):
            return _pairs(Q[:, :j + 1], theta, S, top, bottom, j + 1, True)
        if j + 1 == m_max:
            break
        if b <= 1e-10 * max(abs(float(theta[0])), abs(float(theta[-1])), 1e-300):  # an invariant subspace:
            w = _fresh(Q[:, :j + 1], generator, device, dtype)  # restart orthogonally (T gets a zero β)
            b_next, b = 0.0, float(w.norm())
        else:
            b_next = b
        beta.append(b_next)
        Q[:, j + 1] = w / b
    exhausted = m_max == dim  # the whole space: the Ritz values are the eigenvalues
    return _pairs(Q[:, :len(alpha)], theta, S, top, bottom, len(alpha), exhausted)


def _wanted(k, which: str, dim: int) -> tuple[int, int]:
    if which not in ("LA", "SA", "both"):
        raise FlatcliError(f"which={which!r} is not one of LA, SA, both", "use which='LA'")
    if which == "both" and isinstance(k, (tuple, list)):
        top, bottom = k
    else:
        top, bottom = (k, 0) if which == "LA" else (0, k) if which == "SA" else (k, k)
    for name, v in (("k", top), ("k", bottom)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FlatcliError(f"{name}={k!r} is not a non-negative integer", "give k an integer >= 1")
    if top + bottom < 1 or max(top, bottom) > dim:
        raise FlatcliError(f"k={k!r} asks for more eigenvalues than the {dim} there are, or none",
                           f"give k an integer in 1..{dim}")
    return top, bottom


def _ritz(alpha: list[float], beta: list[float]):
    """Eigenpairs of the tridiagonal T (ascending), in float64 on the CPU: it is tiny."""
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(T)


def _selected(m: int, top: int, bottom: int) -> list[int]:
    """Indices into the ascending Ritz values: the ``top`` largest (largest first), then the ``bottom`` smallest."""
    return list(range(m - 1, m - 1 - top, -1)) + list(range(bottom))


def _converged(theta, S, b: float, top: int, bottom: int, tol: float) -> bool:
    scale = max(abs(float(theta[0])), abs(float(theta[-1])))
    for i in _selected(len(theta), top, bottom):
        if abs(b * float(S[-1, i])) > tol * max(abs(float(theta[i])), EPS23 * scale):
            return False
    return True


def _pairs(Q, theta, S, top, bottom, iterations, converged):
    m = len(theta)
    idx = _selected(m, top, bottom)
    if len(idx) > m:  # fewer Ritz values than asked for (max_iters too small): what there is
        idx = idx[:m]
    vectors = Q @ S[:, idx].to(Q.dtype).to(Q.device)  # (N, K)
    return theta[idx].to(Q.dtype), vectors, iterations, converged


def lanczos_quadrature(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int):
    """Gauss quadrature of the spectral measure of A seen from ``start``: (nodes (m,), weights (m,)), m ≤ steps.

    vᵀ f(A) v / vᵀv ≈ Σ_j τ_j f(θ_j) with θ_j the eigenvalues of the m-step Lanczos tridiagonal T_m and τ_j
    the squared first components of its eigenvectors (Golub & Meurant 2010); exact for polynomials f of
    degree < 2m, and the weights sum to 1. Stops early at an invariant subspace (then exact for every f).
    Full reorthogonalization in ``start``'s dtype. Used by stochastic Lanczos quadrature (Lin et al. 2016).
    """
    dim = start.numel()
    m_max = min(steps, dim)
    Q = torch.zeros(dim, m_max, dtype=start.dtype, device=start.device)  # (N, m)
    Q[:, 0] = start / start.norm()
    alpha, beta = [], []
    for j in range(m_max):
        w = matvec(Q[:, j]).to(start.dtype)
        alpha.append(float(Q[:, j] @ w))
        for _ in range(2):
            w -= Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        b = float(w.norm())
        if j + 1 == m_max or b <= 1e-10 * max(abs(a) for a in alpha + [1e-300]):
            break
        beta.append(b)
        Q[:, j + 1] = w / b
    theta, S = _ritz(alpha, beta)
    return theta, S[0] ** 2


def _randn(dim, generator, device, dtype):
    """N(0, I) drawn where the generator lives (so a CPU generator gives the same start on any device)."""
    at = generator.device if generator is not None else device
    return torch.randn(dim, generator=generator, device=at, dtype=dtype).to(device)


def _fresh(Q, generator, device, dtype):
    """A random vector orthogonal to the columns of Q."""
    w = _randn(Q.shape[0], generator, device, dtype)
    for _ in range(2):
        w -= Q @ (Q.T @ w)
    return w


def hvp_function(model: nn.Module, data, loss: str, batch_size: int, method: str = "auto"):
    """(matvec, dim): matvec(v) = H v, H the Hessian of the mean ``loss`` of ``model`` over ``data``.

    data: an (x, y) tensor pair on the model's device, or an iterable of (x, y) batches. v: a flat vector of
    length dim = number of parameters (any float dtype; the product comes back in v's dtype and device).
    The model runs in its current train/eval mode (callers set eval for BatchNorm) through
    ``torch.func.functional_call`` on detached copies of the parameters, so the model itself is never changed.
    method: "func" (forward-over-reverse), "double-backward", or "auto": the faster of the two on a timed
    trial on the first chunk (four chunk products; double backward when torch.func cannot run the model).
    Forward-over-reverse needs less memory and wins on accelerators; on CPUs, and for tiny models where
    torch.func's per-call overhead dominates, double backward is often faster.
    """
    from flatcli.measure._sweep import DataSource
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    if not params:
        raise FlatcliError("the model has no parameters", "pass a model with weights")
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    chunks = list(DataSource(data, batch_size, params[0].device))
    n = sum(len(x) for x, _ in chunks)
    if n == 0:
        raise FlatcliError("the data hold no examples", "check the data set and max_examples")
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def chunk_loss(ps, x, y):  # Σ_{i in chunk} ℓ_i / n: the chunk's share of the mean loss
        out = torch.func.functional_call(model, ({**dict(zip(names, ps)), **buffers}), (x,))
        return per_example_loss(out, y, loss).sum() / n

    team = parallel.current()
    one_chunk = len(team.mine(len(chunks))) == 1
    products = {"func": _func_hvp(chunk_loss), "double-backward": _autograd_hvp(chunk_loss, keep_graph=one_chunk)}
    if method == "auto":  # rank 0's choice everywhere: every process computes its chunks the same way
        method = team.first(_fastest(products, params, chunks[0]))
    product = products[method]

    def matvec(v: torch.Tensor) -> torch.Tensor:
        vs = [t.view(s).to(p.dtype) for t, s, p in zip(v.to(params[0].device).split(sizes), shapes, params)]
        total = torch.zeros(sum(sizes), dtype=torch.float64, device=params[0].device)
        for c in team.mine(len(chunks)):
            x, y = chunks[c]
            total += torch.cat([h.reshape(-1) for h in product(params, vs, x, y)]).double()
        team.sum_([total])
        return total.to(device=v.device, dtype=v.dtype)

    matvec.method = method
    return matvec, sum(sizes)


def _func_hvp(chunk_loss):
    grad = torch.func.grad(chunk_loss)

    def product(params, vs, x, y):  # forward-mode derivative of the gradient along v: H v
        return torch.func.jvp(lambda *ps: grad(ps, x, y), tuple(params), tuple(vs))[1]
    return product


def _autograd_hvp(chunk_loss, keep_graph: bool = False):
    """H v = ∇(∇L · v). keep_graph (when a process has one chunk): the gradient's graph is built once and
    reused by every product, each then one backward pass through it (no forward pass), as PyHessian does."""
    kept = {}

    def gradient(params, x, y):
        if id(x) in kept:
            return kept[id(x)]
        ps = [p.detach().requires_grad_(True) for p in params]
        g = torch.autograd.grad(chunk_loss(ps, x, y), ps, create_graph=True, allow_unused=True)
        used = [(gi, i) for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        if keep_graph:
            kept.clear()
            kept[id(x)] = ps, used
        return ps, used

    def product(params, vs, x, y):
        with torch.enable_grad():
            ps, used = gradient(params, x, y)
            if not used:  # the loss is (locally) linear in every parameter: H = 0
                return [torch.zeros_like(p) for p in params]
            hv = torch.autograd.grad([gi for gi, _ in used], ps, grad_outputs=[vs[i] for _, i in used],
                                     retain_graph=keep_graph, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]
    return product


def _fastest(products: dict, params, chunk) -> str:
    """The faster method on the first chunk (each timed on its second run, the first one warms up); "func"
    only if it runs at all (an op without forward-mode AD, a model torch.func cannot trace: double backward)."""
    x, y = chunk
    zeros = [torch.zeros_like(p) for p in params]
    times = {}
    for name, product in products.items():
        try:
            with torch.enable_grad():
                for _ in range(2):
                    start = time.perf_counter()
                    product(params, zeros, x, y)
            times[name] = time.perf_counter() - start
        except Exception:
            if name != "func":  # double backward must work: a real error
                raise
    return min(times, key=times.get)
