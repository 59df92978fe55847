"""Langevin sampling of p_γ(w') ∝ exp(−β U(w')), U(w') = L(w') + (γ/2)|w' − w|² (MATH.md §2).

The state of C independent chains is the displacement δ = w' − w, a (C, N) tensor (w itself is never
touched). One step, in the "lr" parameterization used everywhere in flatcli:

    δ* = δ − η ∇U(δ) + sqrt(2η/β) ξ,    ξ ~ N(0, I_N)

Unadjusted (SGLD, with a minibatch gradient when the batch is smaller than the data), or followed by a
Metropolis–Hastings accept/reject (MALA, full batch), which makes p_γ exactly stationary for any η.
With a preconditioner D = V diag(d) Vᵀ + (I − V Vᵀ) (V orthonormal Hessian eigenvectors) the step is
δ* = δ − η D ∇U + sqrt(2η/β) D^(1/2) ξ, and MALA's proposal density uses the D⁻¹ norm, so it stays exact.
"""
from typing import Callable

import torch
from torch.func import functional_call, vmap

from flatcli.losses import per_example_error, per_example_loss

CHUNK = 4096  # examples per forward pass; a full batch is accumulated over chunks


class FlatEnergy:
    """Mean loss L(w + δ) of a model for C stacked displacements δ, its 0-1 error and ∇L.

    ``loss`` is a name from flatcli.losses, a callable ``loss(outputs, targets) -> mean scalar``,
    or, with ``data=None``, a callable ``energy(params: dict[str, Tensor]) -> scalar`` (then n = 1).
    """

    def __init__(self, model: torch.nn.Module, data, loss: str | Callable):
        named = list(model.named_parameters())
        self.model, self.loss = model, loss
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.dtypes = [p.dtype for _, p in named]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.w = flat.to(torch.promote_types(flat.dtype, torch.float32)).clone()  # (N,), at least float32
        self.x, self.y = (None, None) if data is None else (t.to(self.w.device) for t in data)
        self.n = 1 if data is None else len(self.x)
        # vmap over chains pays off on accelerators and for small problems; on CPU a big network's batched
        # matmuls (bmm) were measured slower than a plain loop over the chains
        self._vmap = self.w.device.type != "cpu" or self.n * self.w.numel() < 2 ** 20

    def unflatten(self, flat: torch.Tensor) -> dict:
        """(..., N) -> {name: (..., *shape)}."""
        parts = flat.split([s.numel() for s in self.shapes], dim=-1)
        return {k: p.reshape(*flat.shape[:-1], *s).to(dt)
                for k, p, s, dt in zip(self.names, parts, self.shapes, self.dtypes)}

    def _one(self, params: dict, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of losses, sum of errors) of one parameter set over one chunk."""
        if x is None:
            return self.loss(params).float(), torch.tensor(float("nan"), device=self.w.device)
        out = functional_call(self.model, params, (x,))
        if callable(self.loss):
            return self.loss(out, y).float() * len(x), torch.tensor(float("nan"), device=self.w.device)
        return per_example_loss(out, y, self.loss).sum(), per_example_error(out, y).sum()

    def _batched(self, flat: torch.Tensor, x, y):
        """_one for each row of flat (C, N): vmap over the chains, or a loop if the model refuses vmap."""
        if self._vmap:
            try:
                return vmap(lambda p: self._one(p, x, y))(self.unflatten(flat))
            except Exception:  # a model or loss vmap cannot trace; the loop below gives the same numbers
                self._vmap = False
        pairs = [self._one(self.unflatten(row), x, y) for row in flat]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _chunks(self, idx):
        if self.x is None:
            return [(None, None)], 1
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return [(x[i:i + CHUNK], y[i:i + CHUNK]) for i in range(0, len(x), CHUNK)], len(x)

    def __call__(self, delta: torch.Tensor, idx: torch.Tensor | None = None):
        """L, ε (each (C,)) and ∇L ((C, N)) at w + δ, over the examples idx (None: all)."""
        chunks, n = self._chunks(idx)
        loss = err = grad = 0.0
        with torch.enable_grad():
            d = delta.detach().requires_grad_(True)
            for x, y in chunks:
                l, e = self._batched(self.w + d, x, y)
                grad = grad + torch.autograd.grad(l.sum(), d)[0]
                loss, err = loss + l.detach(), err + e.detach()
        return loss / n, err / n, grad / n

    def _gradient_graph(self, gen: torch.Generator):
        """(∇L at w with its graph, the displacement it is taken at), on at most CHUNK examples."""
        chunks, n = self._chunks(None if self.n <= CHUNK else
                                 torch.randperm(self.n, generator=gen, device=gen.device)[:CHUNK])
        with torch.enable_grad():
            d = torch.zeros_like(self.w, requires_grad=True)
            return torch.autograd.grad(self._one(self.unflatten(self.w + d), *chunks[0])[0] / n, d,
                                       create_graph=True)[0], d

    def hvp(self, gen: torch.Generator):
        """v ↦ H v, H the Hessian of L at w on at most CHUNK examples (float64 in, float64 out)."""
        g, d = self._gradient_graph(gen)

        def matvec(v):
            if not g.requires_grad:
                return torch.zeros_like(v)
            with torch.enable_grad():
                hv = torch.autograd.grad(g, d, v.to(g.dtype), retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(v) if hv is None else hv.detach().to(v.dtype)
        return matvec

    def curvature(self, gen: torch.Generator, iters: int = 20) -> float:
        """Largest |eigenvalue| of the Hessian of L at w: power iteration on Hessian-vector products,
        on at most CHUNK examples (a scale for the Langevin step and the top of the γ ladder)."""
        g, d = self._gradient_graph(gen)
        with torch.enable_grad():
            v, lam = torch.randn(self.w.shape, generator=gen, device=gen.device), 0.0
            for _ in range(iters):
                if not g.requires_grad or float(v.norm()) == 0.0:
                    return abs(lam)
                v = v / v.norm()
                hv = torch.autograd.grad(g, d, v, retain_graph=True, allow_unused=True)[0]
                hv = torch.zeros_like(v) if hv is None else hv.detach()
                lam, v = float(v @ hv), hv
        return abs(lam)


class Langevin:
    """C chains of (MALA or SGLD) Langevin dynamics at one γ at a time; statistics per chain.

    Chain c draws all its randomness (its noise ξ and, for MALA, its accept/reject uniforms) from its own
    generator ``gens[c]``, and adapts its own step size, so what a chain does depends on nothing but its
    generator: the same chain gives the same numbers whether it runs alone or next to others.
    SGLD minibatches come from ``batch_gen`` and are shared by all chains.
    """

    TARGET_ACCEPT = 0.6  # MALA step adaptation during burn-in aims here

    def __init__(self, energy: FlatEnergy, beta: float, gens: list[torch.Generator], batch_size: int | None,
                 batch_gen: torch.Generator):
        self.energy, self.beta, self.gens, self.batch_gen = energy, beta, gens, batch_gen
        self.mala = self.is_mala(energy, batch_size)
        self.batch_size = batch_size
        self._perm, self._pos = None, 0
        self.precond = None  # (V (N, k), d (k,), V in float64): the step is η D, D = V diag(d) Vᵀ + (I − V Vᵀ)

    def _D(self, x, power=1.0):
        """D^power x for x (C, N) (x itself without a preconditioner)."""
        if self.precond is None:
            return x
        V, d, _ = self.precond
        return x + ((x @ V) * (d ** power - 1)) @ V.T

    def _norm_inv(self, r):
        """rᵀ D⁻¹ r per row of r (C, N), in float64."""
        r = r.double()
        out = (r ** 2).sum(1)
        if self.precond is not None:
            _, d, V64 = self.precond
            out = out + ((r @ V64) ** 2 * (1 / d.double() - 1)).sum(1)
        return out

    @staticmethod
    def is_mala(energy: FlatEnergy, batch_size: int | None) -> bool:
        """Full batch (no batch size, or one covering the data, or an energy of the parameters): MALA."""
        return batch_size is None or batch_size >= energy.n or energy.x is None

    def _minibatch(self) -> torch.Tensor:
        """Indices of the next minibatch, walking through fresh random permutations."""
        if self._perm is None or self._pos + self.batch_size > self.energy.n:
            self._perm = torch.randperm(self.energy.n, generator=self.batch_gen, device=self.batch_gen.device)
            self._pos = 0
        self._pos += self.batch_size
        return self._perm[self._pos - self.batch_size:self._pos]

    def randn(self) -> torch.Tensor:
        """ξ ~ N(0, I_N) for each chain, from the chain's own generator: (C, N) float32."""
        device = self.energy.w.device
        return torch.stack([torch.randn(self.energy.w.shape, generator=g, device=device) for g in self.gens])

    def _noise(self, lr):
        """sqrt(2η/β) D^(1/2) ξ with each chain's own η: (C, N)."""
        return (2 * lr / self.beta).sqrt().float()[:, None] * self._D(self.randn(), 0.5)

    @torch.no_grad()
    def run(self, delta, gamma, lr, steps, burn_in, adapt=False, tick=None):
        """steps transitions from δ (C, N) at coupling γ with step sizes lr (C,) float64, the first burn_in
        discarded (and, with adapt, used to tune each chain's lr toward TARGET_ACCEPT).
        Returns (δ, lr, {stat: (C,) mean over kept steps, and "trace": (C, steps − burn_in, 2) dot and sq
        at every kept step, for the convergence diagnostics})."""
        names = ("dot", "sq", "loss", "error", "accept")  # dot = δ·∇L(w+δ), sq = |δ|²
        sums = {k: torch.zeros(len(delta), dtype=torch.float64, device=delta.device) for k in names}
        trace = []
        cur = self.energy(delta) if self.mala else None
        for step in range(steps):
            if self.mala:
                delta, cur, acc = self._mala(delta, cur, gamma, lr)
                L, E, gL = cur
                if adapt and step < burn_in:  # Robbins–Monro on log lr, per chain, frozen after burn-in
                    lr = lr * torch.exp(0.05 * (acc - self.TARGET_ACCEPT))
            else:
                L, E, gL = self.energy(delta, self._minibatch())
                acc = torch.ones_like(L)
                kept = delta
                delta = delta - lr.float()[:, None] * self._D(gL + gamma * delta) + self._noise(lr)
            if step >= burn_in:
                x = delta if self.mala else kept
                values = ((x * gL).sum(1), (x * x).sum(1), L, E, acc)
                for k, v in zip(names, values):
                    sums[k] += v
                trace.append(torch.stack(values[:2], 1).double())
            if tick:
                tick()
        return delta, lr, {**{k: v / (steps - burn_in) for k, v in sums.items()}, "trace": torch.stack(trace, 1)}

    def _mala(self, delta, cur, gamma, lr):
        """One Metropolis-adjusted step; returns (δ, (L, ε, ∇L) at δ, acceptance probability (C,))."""
        b, eta = self.beta, lr.float()[:, None]
        L, _, gL = cur
        gU = gL + gamma * delta
        prop = delta - eta * self._D(gU) + self._noise(lr)
        L2, E2, gL2 = self.energy(prop)
        gU2 = gL2 + gamma * prop
        U = L.double() + gamma / 2 * (delta.double() ** 2).sum(1)
        U2 = L2.double() + gamma / 2 * (prop.double() ** 2).sum(1)
        if self.precond is None:
            fwd = ((prop - delta + eta * gU).double() ** 2).sum(1)  # −log q(δ*|δ), times 4η/β
            bwd = ((delta - prop + eta * gU2).double() ** 2).sum(1)
        else:  # q(δ*|δ) = N(δ − η D ∇U, (2η/β) D): the D⁻¹ norm (det D cancels)
            fwd = self._norm_inv(prop - delta + eta * self._D(gU))
            bwd = self._norm_inv(delta - prop + eta * self._D(gU2))
        log_a = -b * (U2 - U) - b * (bwd - fwd) / (4 * lr)  # NaN (a diverged proposal) rejects
        u = torch.stack([torch.rand((), generator=g, device=log_a.device, dtype=log_a.dtype) for g in self.gens])
        ok = torch.log(u) < log_a
        pick = lambda new, old: torch.where(ok.view(-1, *[1] * (new.dim() - 1)), new, old)
        delta = pick(prop, delta)
        cur = tuple(pick(n, o) for n, o in zip((L2, E2, gL2), cur))
        return delta, cur, torch.exp(log_a.clamp(max=0)).nan_to_num(0.0)
