"""Local energy: how much the error and loss grow under random weight noise (MATH.md §1).

    δε(w, σ) = E_z[ε(w ⊙ (1 + σ z))] − ε(w)   (multiplicative)      δε_add(w, σ) = E_z[ε(w + σ z)] − ε(w)

and the same with the loss L. M draws z_1..z_M, the SAME draws at every σ (common random numbers); draw k
comes from ``draw_seed(seed, k)`` (see ``_perturb``), so it does not depend on M, on the σ values, nor on
which process computes it: under a team (``flatcli.parallel``) each process computes the draws
k ≡ rank (mod world) and the gathered result equals the one-process result bit for bit.

BatchNorm: ``bn="eval"`` runs every perturbed net with the stored statistics; ``bn="recompute"`` re-estimates
them for every perturbed net on the same training batches, and the reference ε(w), L(w) is then the
unperturbed net with statistics recomputed the same way, so δ measures the noise alone (the stored-statistics
values are reported as ``stored_error``/``stored_loss``). Cost: one (two with recompute) unperturbed pass,
then (number of σ > 0) × M forward passes (plus ``bn_batches`` batches each with recompute), nothing else.

A draw whose loss is not finite (the perturbed net overflowed) is counted per σ in ``nonfinite``; its loss is
left out of the loss statistics (its error, with non-finite outputs counted as mistakes, stays in).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from flatcli import parallel
from flatcli.devices import autocast
from flatcli.errors import FlatcliError
from flatcli.choices import check_loss
from flatcli.measure import _perturb
from flatcli.measure._guard import check_finite_value
from flatcli.measure._sweep import draw_sums, perturbation_setup, vmap_forward, vmap_works
from flatcli.checks import check_choice, check_positive_int, check_seed, check_sigmas

NOISES = ("multiplicative", "additive")
BN_POLICIES = ("eval", "recompute")


@dataclass(frozen=True)
class EnergySettings:
    """Every option of a local-energy measurement, validated once when made."""
    sigmas: tuple[float, ...]
    samples: int = 50
    noise: str = "multiplicative"
    bn: str = "eval"
    bn_batches: int = 4
    loss: str = "cross-entropy"
    batch_size: int = 1000
    seed: int = 0
    vectorize: bool | str = "auto"
    draws_per_forward: int = 8
    amp: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sigmas", tuple(check_sigmas(self.sigmas)))
        for name in ("samples", "bn_batches", "batch_size", "draws_per_forward"):
            check_positive_int(name, getattr(self, name))
        check_choice("noise", self.noise, NOISES)
        check_choice("bn", self.bn, BN_POLICIES)
        check_loss(self.loss)
        check_seed("seed", self.seed)
        if self.vectorize not in (True, False, "auto"):
            raise FlatcliError(f"vectorize={self.vectorize!r} is not True, False or 'auto'", "use vectorize='auto'")
        if not isinstance(self.amp, bool):
            raise FlatcliError(f"amp={self.amp!r} is not True or False", "use amp=True or amp=False")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EnergyPoint:
    """One σ. Errors are fractions; *_sem = std over draws (ddof=1) / sqrt(M); delta_* = mean − unperturbed.

    At σ = 0 no draws are made: samples = 0, the means are the unperturbed values, sem and delta are exactly 0.
    ``nonfinite``: draws whose loss was not finite (left out of loss_mean and loss_sem).
    """
    sigma: float
    samples: int
    error_mean: float
    error_sem: float
    delta_error: float
    loss_mean: float
    loss_sem: float
    delta_loss: float
    nonfinite: int = 0


@dataclass(frozen=True)
class LocalEnergy:
    """The curve over σ, the reference values, the per-draw values (M, S) and the settings that made them."""
    points: list[EnergyPoint]
    error: float  # ε(w): the reference of every delta (with bn="recompute": statistics recomputed)
    loss: float  # L(w)
    stored_error: float  # ε(w) with the stored BatchNorm statistics (= error unless bn="recompute")
    stored_loss: float
    examples: int
    draw_errors: torch.Tensor  # (M, S) float64: ε of draw k at sigmas[j]; the reference value where σ = 0
    draw_losses: torch.Tensor  # (M, S) float64
    vectorized: bool  # True when draws were batched with torch.func.vmap
    settings: EnergySettings

    def __iter__(self):
        return iter(self.points)

    def __len__(self):
        return len(self.points)

    @property
    def nonfinite(self) -> int:
        return sum(p.nonfinite for p in self.points)

    def records(self) -> list[dict]:
        """One tidy row per σ: the point's fields, then the settings that matter for comparing rows."""
        s = self.settings
        return [{**asdict(p), "noise": s.noise, "bn": s.bn, "loss_function": s.loss, "examples": self.examples,
                 "seed": s.seed} for p in self.points]


def parse_sigmas(text: str) -> list[float]:
    """``"0,0.01,0.05"`` or ``"start:stop:num"`` (num evenly spaced values, both ends included).

    Syntax only (the values are checked by ``EnergySettings``); sorted ascending, duplicates removed.
    """
    fix = "write a comma-separated list like 0,0.01,0.05 or start:stop:num like 0:0.1:11"
    parts = text.split(":")
    try:
        if len(parts) == 3:
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise FlatcliError(f"sigmas={text!r}: num must be at least 1, got {num}", fix)
            if num == 1 and start != stop:  # e.g. 0:0.1:1 read as start:step:stop would silently give σ = 0 only
                raise FlatcliError(f"sigmas={text!r} is start:stop:num with num 1: only σ = {start:g}, never "
                                   f"{stop:g}", f"give num, e.g. {parts[0]}:{parts[1]}:11 for {num_example(start, stop)}"
                                   f" (start:stop:num, both ends included)")
            values = [float(f"{start + (stop - start) * i / max(num - 1, 1):.12g}") for i in range(num)]
        elif len(parts) == 1:
            values = [float(part) for part in text.split(",")]
        else:
            raise FlatcliError(f"cannot read sigmas {text!r}", fix)
    except (TypeError, ValueError) as e:
        if isinstance(e, FlatcliError):
            raise
        raise FlatcliError(f"cannot read sigmas {text!r}", fix) from None
    return sorted(set(check_sigmas(values)))


def num_example(start: float, stop: float) -> str:
    return f"{start:g}, {start + (stop - start) / 10:.12g}, …, {stop:g}"


def _base_seed(seed: int | torch.Generator) -> int:
    if isinstance(seed, torch.Generator):  # one draw from the caller's generator picks the run's seed
        return int(torch.randint(2**62, (1,), generator=seed, device=seed.device))
    return seed


def local_energy(model: nn.Module, data, sigmas, *, samples: int = 50, noise: str = "multiplicative",
                 bn: str = "eval", loss: str = "cross-entropy", batch_size: int = 1000,
                 seed: int | torch.Generator = 0, bn_data=None, bn_batches: int = 4, callback=None,
                 vectorize: bool | str = "auto", draws_per_forward: int = 8, amp: bool = False) -> LocalEnergy:
    """Estimate δε(w, σ) and δL(w, σ) of ``model`` on ``data`` for each σ in ``sigmas`` (MATH.md §1).

    data: an (x, y) tensor pair (moved to the model's device once, cut into ``batch_size`` slices) or an iterable
    of (x, y) batches (a DataLoader is iterated once per forward pass). Every parameter is perturbed, buffers
    are not. bn="eval": the perturbed net uses the stored BN statistics; bn="recompute": they are re-estimated
    for each perturbed net, and for the reference, on the first ``bn_batches`` batches of ``bn_data`` (default:
    ``data``). vectorize: batch ``draws_per_forward`` draws into one forward with torch.func.vmap ("auto": on CUDA
    only; never with bn="recompute"; a model vmap cannot run falls back to one draw at a time).
    callback(increment, total) is called after each forward pass over the data, total = samples × (σ > 0)
    (this process's share of the draws under a team). The model's parameters, buffers and train/eval modes are
    restored exactly on return. Memory: one copy of the parameters plus the noise (K copies when vectorized).
    amp: run every forward pass (the reference's too) under bfloat16 autocast; losses are summed in float32/64.
    """
    settings = EnergySettings(tuple(sigmas), samples, noise, bn, bn_batches, loss, batch_size, _base_seed(seed),
                              vectorize, draws_per_forward, amp)
    return measure(model, data, settings, bn_data=bn_data, callback=callback)


@torch.inference_mode()
def measure(model: nn.Module, data, settings: EnergySettings, *, bn_data=None, callback=None) -> LocalEnergy:
    """``local_energy`` with its options already validated in ``settings``."""
    s = settings
    device, source, state, pert, bns, bn_x = perturbation_setup(model, data, s.batch_size, s.bn, s.bn_batches, bn_data)
    amp = autocast(device, s.amp)  # every forward pass, the references' too, in bfloat16 when asked
    amp.__enter__()
    try:
        model.eval()
        stored, n = draw_sums(lambda x: model(x).unsqueeze(0), source, s.loss, device)  # (1, 2), int
        if n == 0:
            raise FlatcliError("the data hold no examples", "check the data set and max_examples")
        check_finite_value("loss", float(stored[0, 0]) / n)
        base = _reference(model, pert, bns, bn_x, source, s.loss, device) if bns else stored
        vectorized = (s.vectorize is True or (s.vectorize == "auto" and device.type == "cuda")) and not bns \
            and s.samples > 1 and vmap_works(model, source)
        nets = _vmapped(model, pert) if vectorized else _one_at_a_time(model, pert, bns, bn_x)
        team = parallel.current()
        mine = _sweep(pert, source, s, list(team.mine(s.samples)), s.draws_per_forward if vectorized else 1,
                      nets, callback)  # one (S, 2) tensor per draw of this process
        sums = torch.stack(team.gather_units(mine, s.samples)) if s.samples else None
    finally:
        amp.__exit__(None, None, None)
        pert.restore()
        state.restore()
    return _summarize(s, sums, base[0], stored[0], n, vectorized)


def _reference(model, pert, bns, bn_x, source, loss, device):
    """The unperturbed net with its BatchNorm statistics recomputed on the draws' batches: (1, 2) sums."""
    pert.restore()
    _perturb.recompute_bn_stats(model, bns, bn_x)
    return draw_sums(lambda x: model(x).unsqueeze(0), source, loss, device)[0]


def _sweep(pert, source, s: EnergySettings, draws, chunk, nets, callback) -> list[torch.Tensor]:
    """Draws in the outer loop (each z_k drawn once, ``chunk`` at a time), σ in the inner loop.

    ``nets(D, σ)`` sets up the K nets w0 + σ D_k (D: per parameter (K, *shape)) and returns their forward.
    Returns one (S, 2) tensor of (loss sum, error sum) per draw, NaN where σ = 0 (filled in later).
    """
    device, out = pert.w0[0].device, []
    total = len(draws) * sum(x > 0 for x in s.sigmas)
    for k0 in range(0, len(draws), chunk):
        ks = draws[k0:k0 + chunk]
        ds = [_perturb.noise_direction(_perturb.draw_noise(pert.w0, s.seed, k), pert.w0, s.noise) for k in ks]
        D = [torch.stack(c) if len(c) > 1 else c[0].unsqueeze(0) for c in zip(*ds)]  # per parameter (K, *shape)
        del ds
        cols = []
        for sigma in s.sigmas:
            if sigma == 0:  # no draws: filled with the unperturbed value later
                cols.append(torch.full((len(ks), 2), math.nan, device=device))
                continue
            cols.append(draw_sums(nets(D, sigma), source, s.loss, device)[0])  # (K, 2)
            if callback is not None:
                callback(len(ks), total)
        out.extend(torch.stack(cols, 1).unbind(0))  # K × (S, 2)
    return out


def _one_at_a_time(model, pert, bns, bn_x):
    """K = 1: the model's own parameters set in place to w0 + σ d (BN statistics re-estimated if asked)."""
    def nets(D, sigma):
        pert.set([d[0] for d in D], sigma)
        if bns:
            _perturb.recompute_bn_stats(model, bns, bn_x)
        return lambda x: model(x).unsqueeze(0)  # (1, B, C)
    return nets


def _vmapped(model, pert):
    """K draws in one forward: torch.func.functional_call over stacked parameters w0 + σ D, vmapped over K."""
    names = [name for name, _ in model.named_parameters()]

    def nets(D, sigma):
        return vmap_forward(model, {n: torch.add(w0, d, alpha=sigma) for n, w0, d in zip(names, pert.w0, D)})
    return nets


def _summarize(s: EnergySettings, sums, base, stored, n, vectorized) -> LocalEnergy:
    """Per-draw means → mean over draws and std(ddof=1)/sqrt(M); σ = 0 columns take the reference value."""
    base, stored = base.double().cpu() / n, stored.double().cpu() / n  # (2,): loss, error
    values = sums.double().cpu() / n  # (M, S, 2): one host transfer for the whole run
    zero = torch.tensor([x == 0 for x in s.sigmas])
    values[:, zero] = base
    points = [_point(sigma, values[:, j], base) for j, sigma in enumerate(s.sigmas)]
    return LocalEnergy(points, error=float(base[1]), loss=float(base[0]), stored_error=float(stored[1]),
                       stored_loss=float(stored[0]), examples=n, draw_errors=values[..., 1].clone(),
                       draw_losses=values[..., 0].clone(), vectorized=vectorized, settings=s)


def _point(sigma: float, v: torch.Tensor, base: torch.Tensor) -> EnergyPoint:
    """One σ from its per-draw (M, 2) values; non-finite losses counted and left out of the loss statistics."""
    if sigma == 0:  # no draws: the reference value, exactly
        return EnergyPoint(sigma, 0, float(base[1]), 0.0, 0.0, float(base[0]), 0.0, 0.0)
    err, loss = v[:, 1], v[:, 0]
    finite = loss[torch.isfinite(loss)]
    mean_sem = lambda t: (float(t.mean()) if len(t) else math.nan,
                          float(t.std(correction=1)) / math.sqrt(len(t)) if len(t) > 1 else math.nan)
    (em, es), (lm, ls) = mean_sem(err), mean_sem(finite)
    return EnergyPoint(sigma, len(v), em, es, em - float(base[1]), lm, ls, lm - float(base[0]),
                       nonfinite=len(loss) - len(finite))
