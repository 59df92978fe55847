"""Normalized local entropy s(w; γ) by thermodynamic integration over γ (MATH.md §2).

    s(γ) = (Φ(γ) − Φ_flat(γ)) / N = −∫_γ^∞ ∂s/∂γ' dγ'
    γ ∂s/∂γ = (β / 2N) ⟨(w' − w) · ∇L(w')⟩_γ        (Stein form of (γ/2)[1/γ − (β/N)⟨|w' − w|²⟩_γ])

with ⟨·⟩_γ under p_γ(w') ∝ exp(−β L(w') − (βγ/2)|w' − w|²), L the mean loss over the examples in use.
The slope g(t) = γ ∂s/∂γ is measured by Langevin chains (flatcli.measure._langevin) on a ladder uniform
in t = log γ, from γ_max = max(largest asked γ, 100 × the top Hessian eigenvalue) down to the smallest asked
γ, each γ warm-started from the previous one. s(t) = −∫_t^{t_max} g dt − g(t_max): piecewise-cubic quadrature
in t, plus the tail beyond γ_max where g ≈ c/γ. Each chain gives a whole curve s(γ); the reported value is
the mean over chains; its standard error is the MCSE of the per-step series whose mean s(γ) is (see
_summarize), from its bulk ESS, so autocorrelation within chains counts, and R̂ and ESS of that series (with
the distance's at γ) say whether the chains converged (flatcli.measure.diagnostics: R̂ ≤ 1.01, ESS ≥ 100). Chain c draws its noise from a generator
seeded with draw_seed(seed, c) and the curvature estimate from one seeded with seed; chains run in passes of
fixed composition, so the processes of a team (flatcli.parallel) can share the passes out and reassemble the
one-process result.

Default step (lr parameterization δ ← δ − η∇U + sqrt(2η/β) ξ): η_γ = c/(h + γ), h the curvature estimate;
c starts at min(1, 2 N^(-1/3)) and each chain tunes its own toward 60% acceptance during burn-in
(MALA, full batch), or c is fixed at 0.02 (SGLD, minibatches: discretization bias ≈ c/2 ≈ 1%, plus the
usual minibatch-noise bias). With precondition = k > 0, h is the k-th Hessian eigenvalue and the top k
eigen-directions get η_i = c/(h_i + γ) through the preconditioner of _langevin.Langevin (MALA stays exact).
"""
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from flatcli import parallel
from flatcli.errors import FlatcliError
from flatcli.choices import check_loss
from flatcli.measure import diagnostics
from flatcli.measure._guard import check_finite_parameters, check_finite_value
from flatcli.measure._lanczos import lanczos
from flatcli.measure._langevin import FlatEnergy, Langevin
from flatcli.measure._perturb import draw_seed
from flatcli.checks import FLOAT32_MAX, check_float, check_positive_int, check_seed

TAIL_FACTOR = 100.0  # γ_max ≥ TAIL_FACTOR × curvature: the c/γ tail is then exact to ~0.5%
SGLD_SCALE = 0.02  # η (h + γ) for SGLD
BATCH_STREAM = -1  # draw_seed(seed, -1) orders the SGLD minibatches; chain c uses draw_seed(seed, c)
STATS = ("dot", "sq", "loss", "error", "accept", "lr")  # per chain and γ: Langevin.run's means, then η


@dataclass(frozen=True)
class LocalEntropyRow:
    gamma: float
    local_entropy: float  # s(γ), per parameter
    local_entropy_sem: float  # Monte Carlo standard error, autocorrelation included (from the ESS)
    distance: float  # ⟨|w' − w|²⟩_γ / N
    loss_mean: float  # ⟨L(w')⟩_γ
    error_mean: float  # ⟨ε(w')⟩_γ, NaN for regression and custom losses
    rhat: float  # the worse R̂ of s(γ)'s per-step series and of the distance at γ (NaN with one chain)
    ess: float  # the smaller bulk ESS of the two
    converged: bool  # rhat ≤ 1.01 and ess ≥ 100


@dataclass(frozen=True)
class LadderPoint:
    gamma: float
    langevin_lr: float  # η at this γ (after burn-in adaptation), mean over chains
    acceptance: float  # mean MALA acceptance probability; NaN for SGLD
    slope: float  # γ ∂s/∂γ, Stein form (the one integrated)
    slope_sem: float
    slope_direct: float  # (1/2)[1 − (βγ/N)⟨|w' − w|²⟩], for comparison
    rhat: float  # the worse R̂ of the chains' (w' − w)·∇L and |w' − w|² at this γ
    ess: float  # the smaller bulk ESS of the two
    converged: bool


@dataclass(frozen=True)
class LocalEntropyResult:
    rows: list[LocalEntropyRow]  # the asked γ values, ascending
    ladder: list[LadderPoint]  # the internal γ ladder, ascending
    beta: float  # the β used (settings.beta, or the number of examples)
    n_params: int
    n_examples: int  # 0 for an energy of the parameters
    curvature: float  # top |Hessian eigenvalue| estimate at w
    sampler: str  # "mala" or "sgld"
    acceptance: float  # mean over the ladder; NaN for SGLD
    loss: float  # L(w), the checkpoint's own loss: ⟨L(w')⟩ below it means the chains went downhill
    error: float  # ε(w); NaN for regression and custom losses
    settings: "EntropySettings"

    steps = property(lambda self: self.settings.steps)
    burn_in = property(lambda self: self.settings.burn_in)
    chains = property(lambda self: self.settings.chains)
    chains_per_pass = property(lambda self: self.settings.chains_per_pass)
    batch_size = property(lambda self: self.settings.batch_size)
    seed = property(lambda self: self.settings.seed)

    def rows_at(self) -> list[tuple[LocalEntropyRow, LadderPoint]]:
        """Each asked γ with the ladder point it sits on (the same γ)."""
        at = {p.gamma: p for p in self.ladder}
        return [(r, at[min(at, key=lambda g: abs(math.log(g / r.gamma)))]) for r in self.rows]

    def records(self) -> list[dict]:
        """One tidy row per asked γ: the row's fields, then what was resolved (β, sampler, step size...)."""
        s = self.settings
        return [{**vars(r), "beta": self.beta, "chains": s.chains, "steps": s.steps, "burn_in": s.burn_in,
                 "sampler": self.sampler, "acceptance": p.acceptance, "langevin_lr": p.langevin_lr,
                 "curvature": self.curvature, "checkpoint_loss": self.loss, "checkpoint_error": self.error,
                 "examples": self.n_examples, "parameters": self.n_params,
                 "loss_function": s.loss if isinstance(s.loss, str) else "custom", "seed": s.seed}
                for r, p in self.rows_at()]


def parse_gammas(text: str) -> list[float]:
    """"1,10,100" -> [1, 10, 100]; "start:stop:num" -> num values geometrically spaced, ends included."""
    fix = 'write a comma list like "1,10,100" or "start:stop:num" like "0.1:100:7", all values > 0'
    try:
        parts = text.split(":")
        vals = [float(v) for v in (parts[:2] if len(parts) == 3 else text.split(","))]
        num = int(parts[2]) if len(parts) == 3 else len(vals)
    except ValueError:
        raise FlatcliError(f"cannot parse γ values {text!r}", fix) from None
    if len(parts) not in (1, 3) or num < 1 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise FlatcliError(f"bad γ values {text!r}: they must be finite and positive", fix)
    if len(parts) == 3 and num == 1 and vals[0] != vals[1]:  # 1:100:1 would silently give γ = 1 only
        raise FlatcliError(f"gammas={text!r} is start:stop:num with num 1: only γ = {vals[0]:g}, never {vals[1]:g}",
                           f"give num, e.g. {parts[0]}:{parts[1]}:5 (geometrically spaced, both ends included)")
    if len(parts) == 3:
        a, b = vals
        vals = [a] if num == 1 else [a * (b / a) ** (i / (num - 1)) for i in range(num - 1)] + [b]
    return vals


def gamma_ladder(gammas: Sequence[float], gamma_max: float, points_per_decade: int) -> np.ndarray:
    """Ascending γ values: a grid uniform in log γ from gamma_max down past min(gammas), plus gammas."""
    dt, top = math.log(10) / points_per_decade, math.log(gamma_max)
    asked = np.log(np.unique(gammas))
    grid = top - dt * np.arange(int(math.ceil((top - asked[0]) / dt)) + 1)
    grid = grid[grid > asked[0]]
    grid = grid[np.abs(grid[:, None] - asked[None, :]).min(1) > 0.3 * dt]  # no near-duplicate nodes
    return np.exp(np.unique(np.concatenate([grid, asked])))


def integration_matrix(t: np.ndarray) -> np.ndarray:
    """M with (M g)_i = ∫_{t_i}^{t_max} g dt + g(t_max): each interval integrates the cubic through its
    four nearest nodes (fewer if the ladder is shorter); the last term is the tail ∫ c e^{-t} dt."""
    m = len(t)
    per_interval = np.zeros((m, m))
    for k in range(m - 1):
        j0 = min(max(k - 1, 0), max(m - 4, 0))
        nodes = np.arange(j0, min(j0 + 4, m))
        u, du = t[nodes] - t[k], t[k + 1] - t[k]
        powers = np.arange(len(nodes))
        moments = du ** (powers + 1) / (powers + 1)  # ∫_0^du u^p du
        per_interval[k, nodes] = np.linalg.solve(u[None, :] ** powers[:, None], moments)
    M = np.cumsum(per_interval[::-1], axis=0)[::-1].copy()
    M[:, -1] += 1.0
    return M


@dataclass(frozen=True)
class EntropySettings:
    """Every option of a local-entropy measurement, validated once when made (``loss`` may be a callable)."""
    gammas: tuple[float, ...]
    beta: float | None = None
    steps: int = 120
    burn_in: int = 30
    chains: int = 4
    chains_per_pass: int = 4
    langevin_lr: float | None = None
    batch_size: int | None = None
    loss: str | Callable = "cross-entropy"
    points_per_decade: int = 3
    seed: int = 0
    precondition: int = 0  # top Hessian eigenpairs in the step's preconditioner (0: none)

    def __post_init__(self):
        try:
            g = sorted({float(v) for v in self.gammas})
        except (TypeError, ValueError):
            raise FlatcliError(f"gammas={self.gammas!r} are not numbers", "pass values > 0") from None
        if not g or not all(math.isfinite(v) and 0 < v <= FLOAT32_MAX for v in g):
            raise FlatcliError(f"gammas={list(self.gammas)} must be finite and positive", "pass values > 0")
        object.__setattr__(self, "gammas", tuple(g))
        for name in ("steps", "chains", "points_per_decade", "chains_per_pass"):
            check_positive_int(name, getattr(self, name))
        if not _is_count(self.burn_in) or not 0 <= self.burn_in < self.steps:
            raise FlatcliError(f"burn_in={self.burn_in!r} is not smaller than steps={self.steps}" if
                               _is_count(self.burn_in) and self.burn_in >= self.steps else
                               f"burn_in={self.burn_in!r} is not an integer >= 0",
                               "use fewer burn-in steps or more steps, e.g. steps=120 with burn_in=30")
        for name in ("beta", "langevin_lr"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name))
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        if not callable(self.loss):
            check_loss(self.loss)
        check_seed("seed", self.seed)
        if not _is_count(self.precondition) or self.precondition < 0:
            raise FlatcliError(f"precondition={self.precondition!r} is not an integer >= 0",
                               "pass the number of Hessian eigenpairs, or 0 for none")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {**d, "gammas": list(self.gammas), "loss": self.loss if isinstance(self.loss, str) else repr(self.loss)}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def local_entropy(model: torch.nn.Module, data, gammas: Sequence[float], *, beta: float | None = None,
                  steps: int = 120, burn_in: int = 30, chains: int = 4, langevin_lr: float | None = None,
                  batch_size: int | None = None, loss: str | Callable = "cross-entropy",
                  points_per_decade: int = 3, seed: int = 0,
                  callback: Callable[[int, int], None] | None = None,
                  chains_per_pass: int = 4, precondition: int = 0) -> LocalEntropyResult:
    """Normalized local entropy s(γ) of the model's current weights w at each γ in gammas.

    data: (inputs, targets) tensors, or None with ``loss`` a callable energy(params: dict) -> scalar.
    loss: "cross-entropy", "mse", a callable loss(outputs, targets) -> mean scalar, or the energy above.
    beta: inverse temperature (default: the number of examples). steps/burn_in: Langevin steps per ladder γ,
    total and discarded. batch_size None or ≥ n: full-batch MALA (exact); smaller: SGLD on minibatches.
    langevin_lr: a fixed η at every γ instead of the adapted c/(h + γ). The model runs in eval mode
    (BatchNorm uses its stored statistics); its parameters and buffers are never changed.
    The defaults (120 steps with 30 burn-in, 4 chains, 3 ladder points per decade) take about a minute
    for a 20k-parameter MLP on 4000 examples on 2 CPU cores: one forward-backward pass per chain and step.
    callback(increment, total): after each Langevin step of a pass, total = (ladder length) × steps × passes
    (this process's passes under a team).

    chains_per_pass: the chains run in passes of this many (the last may hold fewer), each pass one
    vectorized (vmap) evaluation per step; chain c is in pass c // chains_per_pass. Chain c draws its
    randomness from its own generator, seeded from (seed, c), and tunes its own step, and a pass computes
    exactly the same way wherever it runs: the result depends on seed, chains and chains_per_pass, not on
    how the passes are shared out among the processes of a team (``flatcli.parallel``), which take the
    passes p ≡ rank (mod world); the curvature is rank 0's everywhere, so every process builds the same γ
    ladder, and the result equals the one-process result bit for bit.

    precondition: k > 0 preconditions every step by the top k Hessian eigenpairs (h_i, v_i) at w (Lanczos on
    Hessian-vector products, rank 0's): direction v_i steps η_i = c/(h_i⁺ + γ), every other direction
    c/(h_k⁺ + γ), so stiff and soft directions relax alike; MALA stays exact (the same D in the proposal and
    in its density). k = N preconditions every direction. Cost: about k + 10 Hessian-vector products once,
    and O(C N k) per step.
    """
    settings = EntropySettings(tuple(gammas), beta, steps, burn_in, chains, chains_per_pass, langevin_lr,
                               batch_size, loss, points_per_decade, seed, precondition)
    return measure(model, data, settings, callback=callback)


def measure(model: torch.nn.Module, data, settings: EntropySettings, *, callback=None) -> LocalEntropyResult:
    """``local_entropy`` with its options already validated in ``settings``."""
    if data is None and not callable(settings.loss):
        raise FlatcliError("data=None needs an energy", "pass (inputs, targets), or loss=energy(params) callable")
    if data is None and settings.beta is None:
        raise FlatcliError("beta=None has no default for an energy of the parameters", "pass beta explicitly")
    check_finite_parameters(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        energy = FlatEnergy(model, data, settings.loss)
        return _measure(energy, settings, callback)
    finally:
        for m, mode in modes:
            m.training = mode


def _measure(energy, s: EntropySettings, callback):
    N, device, team = energy.w.numel(), energy.w.device, parallel.current()
    beta = float(energy.n if s.beta is None else s.beta)
    passes = [list(range(c, min(c + s.chains_per_pass, s.chains))) for c in range(0, s.chains, s.chains_per_pass)]
    h = team.first(energy.curvature(torch.Generator(device=device).manual_seed(s.seed)))  # one ladder for all
    eig = team.first(_eigenpairs(energy, s.precondition, s.seed)) if s.precondition else None
    ladder = gamma_ladder(s.gammas, max(s.gammas[-1], TAIL_FACTOR * h), s.points_per_decade)
    at_w = [float(v[0]) for v in energy(torch.zeros(1, N, device=device))[:2]]  # L(w), ε(w)
    check_finite_value("loss", at_w[0])
    mine = [passes[p] for p in team.mine(len(passes))]
    total = len(ladder) * s.steps * len(mine)
    tick = (lambda: callback(1, total)) if callback else None

    def sampler(chains):  # every pass walks the same minibatch sequence (SGLD)
        gens = [torch.Generator(device=device).manual_seed(draw_seed(s.seed, c)) for c in chains]
        return Langevin(energy, beta, gens, s.batch_size, torch.Generator(device=device).manual_seed(
            draw_seed(s.seed, BATCH_STREAM)))

    runs = [_run_ladder(sampler(chains), ladder, h, s.steps, s.burn_in, s.langevin_lr, tick, eig)
            for chains in mine]
    per_chain = torch.cat(team.gather_units(runs, len(passes))).numpy()  # (chains, ladder, stats + trace)
    return _summarize(per_chain[..., :len(STATS)], per_chain[..., len(STATS):].reshape(
        *per_chain.shape[:2], -1, 2), s, ladder, beta, N, energy, h, Langevin.is_mala(energy, s.batch_size), at_w)


def _worse(*ds: diagnostics.Diagnostics) -> tuple[float, float, bool]:
    """The largest R̂, the smallest ESS and whether all converged."""
    return max(d.rhat for d in ds), min(d.ess for d in ds), all(d.converged for d in ds)


def _summarize(per_chain, traces, s: EntropySettings, ladder, beta, N, energy, h, mala, at_w):
    """(chains, ladder, stats) per-chain means and (chains, ladder, kept steps, 2) traces of (dot, sq) ->
    the rows at the asked γ, the ladder, the whole result.

    s(γ_i) = Σ_j A_ij mean(dot_j), A = −(β/2N) M, is also the mean of the per-step series
    s_t = Σ_j A_ij dot_j[t] (step t of every ladder γ), so R̂, ESS and the MCSE of that series are those of
    s(γ_i) itself: a chain that has not equilibrated at any γ_j ≥ γ_i shows up, weighted by its share."""
    _check_finite(per_chain, ladder)
    col = dict(zip(STATS, np.moveaxis(per_chain, 2, 0)))  # name -> (chains, ladder)
    slope = beta / (2 * N) * col["dot"]  # γ ∂s/∂γ, Stein form
    A = -beta / (2 * N) * integration_matrix(np.log(ladder))  # (ladder, ladder)
    s_series = np.einsum("ij,cjt->ict", A, traces[..., 0])  # (ladder, chains, kept)
    s_diag = [diagnostics.summary(x) for x in s_series]
    point_diag = [_worse(diagnostics.summary(traces[:, j, :, 0]), diagnostics.summary(traces[:, j, :, 1]))
                  for j in range(len(ladder))]
    sq_diag = [diagnostics.summary(traces[:, j, :, 1]) for j in range(len(ladder))]
    ent = s_series.mean((1, 2))
    slope_sem = np.array([diagnostics.mcse(beta / (2 * N) * traces[:, j, :, 0]) for j in range(len(ladder))])
    sq, loss_mean, err_mean, lrs = (col[k].mean(0) for k in ("sq", "loss", "error", "lr"))
    acc = col["accept"].mean(0) if mala else np.full(len(ladder), np.nan)
    idx = [int(np.argmin(np.abs(np.log(ladder) - math.log(g)))) for g in s.gammas]  # asked γ are on the ladder
    rows = [LocalEntropyRow(g, float(ent[i]), s_diag[i].mcse, float(sq[i] / N), float(loss_mean[i]),
                            float(err_mean[i]), *_worse(s_diag[i], sq_diag[i])) for g, i in zip(s.gammas, idx)]
    points = [LadderPoint(float(g), float(lr), float(a), float(m), float(e), float(0.5 * (1 - beta * g * q / N)), *d)
              for g, lr, a, m, e, q, d in zip(ladder, lrs, acc, slope.mean(0), slope_sem, sq, point_diag)]
    return LocalEntropyResult(rows, points, beta, N, 0 if energy.x is None else energy.n, h,
                              "mala" if mala else "sgld", float(acc.mean()), *at_w, settings=s)


def _check_finite(per_chain, ladder):
    """A chain that blew up (SGLD with too large a step) is reported after the gather, so every process
    raises the same error instead of one raising while the others wait."""
    bad = ~np.isfinite(per_chain[:, :, :2]).all(axis=(0, 2))  # (ladder,): dot and sq
    if bad.any():
        i = int(np.nonzero(bad)[0].max())  # the chains run from the largest γ down
        lr = per_chain[:, i, STATS.index("lr")].mean()
        raise FlatcliError(f"the Langevin chain diverged at γ = {ladder[i]:g} with lr {lr:g}",
                           "lower the Langevin lr, or leave it unset to choose it from the curvature")


def _eigenpairs(energy, k, seed):
    """The top min(k, N) Hessian eigenpairs at w, (values (k,) clamped at 0, vectors (N, k)), on the CPU."""
    N = energy.w.numel()
    k = min(k, N)
    gen = torch.Generator(device=energy.w.device).manual_seed(draw_seed(seed, -2))
    values, vectors, _, _ = lanczos(energy.hvp(gen), N, k, which="LA", tol=1e-3, max_iters=min(N, 2 * k + 10),
                                    generator=gen, device=energy.w.device)
    return values.clamp(min=0).cpu(), vectors.cpu()


def _run_ladder(sampler, ladder, h, steps, burn_in, langevin_lr, tick, eig=None) -> torch.Tensor:
    """Chains from the largest γ down, each γ warm-started from the previous one.
    Returns the per-chain means of STATS, then the kept steps' (dot, sq) traces, flattened:
    (chains, ladder, len(STATS) + 2 × kept) float64 on the CPU, in ascending γ;
    NaN from the γ where a chain diverged on. eig: (values, vectors) of the preconditioner, or None."""
    C, N, beta = len(sampler.gens), sampler.energy.w.numel(), sampler.beta
    device = sampler.energy.w.device
    if eig is not None:  # the base step serves the directions outside V: c/(h_k + γ)
        values, V = eig[0].to(device), eig[1].to(device, torch.float32)
        h = float(values[-1])
    c0 = min(1.0, 2 * N ** (-1 / 3)) if sampler.mala else SGLD_SCALE
    scale = torch.full((C,), c0, dtype=torch.float64, device=device)  # c = η (h + γ), per chain
    # start near equilibrium at γ_max ≫ h: p_γmax ≈ N(0, I/(β γ_max))
    delta = sampler.randn() / math.sqrt(beta * ladder[-1])
    kept = steps - burn_in
    out = torch.full((C, len(ladder), len(STATS) + 2 * kept), math.nan, dtype=torch.float64)
    prev = None
    for j in reversed(range(len(ladder))):
        gamma = float(ladder[j])
        if prev:  # flat directions (h ≪ γ) get their exact variance 1/(βγ) at once; stiff ones relax fast
            delta = delta * math.sqrt(prev / gamma)
        lr = torch.full_like(scale, langevin_lr) if langevin_lr else scale / (h + gamma)
        if eig is not None:  # direction v_i: η d_i = c/(h_i + γ)
            sampler.precond = (V, ((h + gamma) / (values + gamma)).float(), V.double())
        delta, lr, st = sampler.run(delta, gamma, lr, steps, burn_in,
                                    adapt=sampler.mala and langevin_lr is None, tick=tick)
        out[:, j, :len(STATS)] = torch.stack([*(st[k] for k in STATS[:-1]), lr], 1).cpu()
        out[:, j, len(STATS):] = st["trace"].reshape(C, -1).cpu()
        if not torch.isfinite(delta).all():  # stop here; marked for _check_finite
            out[:, j, :2] = math.nan
            break
        scale, prev = lr * (h + gamma), gamma
    return out
