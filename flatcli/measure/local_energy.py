"""Local energy: how much the error and loss grow under random weight noise (MATH.md §1).

    δε(w, σ) = E_z[ε(w ⊙ (1 + σ z))] − ε(w)   (multiplicative)      δε_add(w, σ) = E_z[ε(w + σ z)] − ε(w)

and the same with the loss L. M draws z_1..z_M, the SAME draws at every σ (common random numbers); draw k
comes from ``draw_seed(seed, k)`` (see ``_perturb``). Cost: one unperturbed pass over the data, then
(number of σ > 0) × M forward passes (plus ``bn_batches`` batches each with bn="recompute"), nothing else.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from flatcli.errors import FlatcliError
from flatcli.losses import check_loss
from flatcli.measure import _perturb
from flatcli.measure._sweep import DataSource, batch_list, draw_sums, vmap_forward, vmap_works

NOISES = ("multiplicative", "additive")
BN_POLICIES = ("eval", "recompute")


@dataclass(frozen=True)
class EnergyPoint:
    """One σ. Errors are fractions; *_sem = std over draws (ddof=1) / sqrt(M); delta_* = mean − unperturbed.

    At σ = 0 no draws are made: samples = 0, the means are the unperturbed values, sem and delta are exactly 0.
    """
    sigma: float
    samples: int
    error_mean: float
    error_sem: float
    delta_error: float
    loss_mean: float
    loss_sem: float
    delta_loss: float


@dataclass(frozen=True)
class LocalEnergy:
    """The curve over σ, the unperturbed values, and the per-draw values (M, S) for draw-by-draw comparisons."""
    points: list[EnergyPoint]
    error: float  # ε(w), unperturbed
    loss: float  # L(w), unperturbed
    examples: int
    draw_errors: torch.Tensor  # (M, S) float64: ε of draw k at sigmas[j]; the unperturbed value where σ = 0
    draw_losses: torch.Tensor  # (M, S) float64
    vectorized: bool  # True when draws were batched with torch.func.vmap

    def __iter__(self):
        return iter(self.points)

    def __len__(self):
        return len(self.points)


def parse_sigmas(text: str) -> list[float]:
    """``"0,0.01,0.05"`` or ``"start:stop:num"`` (num evenly spaced values, both ends included).

    The result is sorted ascending with duplicates removed: it is a curve over σ.
    """
    fix = "write a comma-separated list like 0,0.01,0.05 or start:stop:num like 0:0.1:11"
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            start, stop, num = float(start), float(stop), int(num)
            if num < 1:
                raise FlatcliError(f"sigmas {text!r}: num must be at least 1", fix)
            values = [float(f"{start + (stop - start) * i / max(num - 1, 1):.12g}") for i in range(num)]
        else:
            values = [float(part) for part in text.split(",")]
    except ValueError:
        raise FlatcliError(f"cannot read sigmas {text!r}", fix) from None
    _check_sigmas(values)
    return sorted(set(values))


def _check_sigmas(sigmas) -> list[float]:
    sigmas = [float(s) for s in sigmas]
    if not sigmas:
        raise FlatcliError("no sigma values given", "give at least one noise level, e.g. 0,0.01,0.05")
    bad = [s for s in sigmas if not math.isfinite(s) or s < 0]
    if bad:
        raise FlatcliError(f"sigma must be finite and >= 0, got {bad[0]}", "use noise levels like 0,0.01,0.05")
    return sigmas


def _check_options(samples, noise, bn, loss, batch_size, bn_batches, vectorize, draws_per_forward) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise FlatcliError(f"samples must be an integer >= 1, got {samples!r}", "use e.g. --samples 100")
    if noise not in NOISES:
        raise FlatcliError(f"unknown noise {noise!r}", f"use one of: {', '.join(NOISES)}")
    if bn not in BN_POLICIES:
        raise FlatcliError(f"unknown BatchNorm policy {bn!r}", f"use one of: {', '.join(BN_POLICIES)}")
    check_loss(loss)
    for name, value in (("batch size", batch_size), ("bn batches", bn_batches),
                        ("draws per forward", draws_per_forward)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FlatcliError(f"{name} must be an integer >= 1, got {value!r}", "use a positive integer")
    if vectorize not in (True, False, "auto"):
        raise FlatcliError(f"vectorize must be True, False or 'auto', got {vectorize!r}", "use auto")


def _base_seed(seed: int | torch.Generator) -> int:
    if isinstance(seed, torch.Generator):  # one draw from the caller's generator picks the run's seed
        return int(torch.randint(2**62, (1,), generator=seed, device=seed.device))
    return int(seed)


@torch.inference_mode()
def local_energy(model: nn.Module, data, sigmas, *, samples: int = 100, noise: str = "multiplicative",
                 bn: str = "eval", loss: str = "cross-entropy", batch_size: int = 1000,
                 seed: int | torch.Generator = 0, bn_data=None, bn_batches: int = 4, callback=None,
                 vectorize: bool | str = "auto", draws_per_forward: int = 8, shard: tuple[int, int] = (0, 1),
                 gather=None) -> LocalEnergy:
    """Estimate δε(w, σ) and δL(w, σ) of ``model`` on ``data`` for each σ in ``sigmas`` (MATH.md §1).

    data: an (x, y) tensor pair (moved to the model's device once, cut into ``batch_size`` slices) or an iterable
    of (x, y) batches (a DataLoader is iterated once per forward pass). Every parameter is perturbed, buffers
    are not. bn="eval": the perturbed net uses the stored BN statistics; bn="recompute": they are re-estimated
    for each perturbed net on the first ``bn_batches`` batches of ``bn_data`` (default: ``data``).
    vectorize: batch ``draws_per_forward`` draws into one forward with torch.func.vmap ("auto": on CUDA only;
    never with bn="recompute"; a model vmap cannot run falls back to one draw at a time).
    callback(done, total) is called after each forward pass over the data, total = samples × (number of σ > 0).
    The model's parameters, buffers and train/eval modes are restored exactly on return. With bn="recompute"
    the σ = 0 point is still the net as given (stored statistics), so δ at small σ includes the change of
    statistics. Memory: one copy of the parameters plus the noise (K copies when vectorized).

    shard=(rank, world), gather: share the draws among processes. This process computes the draws
    k ≡ rank (mod world); ``gather(tensor)`` must return every process's tensor in rank order (e.g. an
    all-gather). Draw k is the same noise whatever the sharding, so the result equals the one-process result.
    """
    sigmas = _check_sigmas(sigmas)
    _check_options(samples, noise, bn, loss, batch_size, bn_batches, vectorize, draws_per_forward)
    params = list(model.parameters())
    if not params:
        raise FlatcliError("the model has no parameters to perturb", "pass a model with weights")
    device = params[0].device
    source = DataSource(data, batch_size, device)
    state, pert = _perturb.ModelState(model), _perturb.Perturbation(model)
    bns = _perturb.batchnorms(model) if bn == "recompute" else []
    bn_x = batch_list(source if bn_data is None else bn_data, batch_size, device, bn_batches) if bns else []
    try:
        model.eval()
        base, n = draw_sums(lambda x: model(x).unsqueeze(0), source, loss, device)  # (1, 2), int
        if n == 0:
            raise FlatcliError("the data holds no examples", "check the data set and --max-examples")
        vectorized = (vectorize is True or (vectorize == "auto" and device.type == "cuda")) and not bns \
            and samples > 1 and vmap_works(model, source)
        nets = _vmapped(model, pert) if vectorized else _one_at_a_time(model, pert, bns, bn_x)
        draws = list(range(shard[0], samples, shard[1]))
        sums = _sweep(pert, source, sigmas, draws, noise, loss, _base_seed(seed),
                      draws_per_forward if vectorized else 1, nets, callback)  # (len(draws), S, 2) on the device
        if gather is not None:
            sums = _interleave(gather(sums.cpu()), samples).to(device)
    finally:
        pert.restore()
        state.restore()
    return _summarize(sigmas, sums, base[0], n, vectorized)


def _interleave(parts: list[torch.Tensor], samples: int) -> torch.Tensor:
    """Reassemble the draws of ``world`` processes (process r held draws r, r + world, ...) in draw order."""
    world = len(parts)
    return torch.stack([parts[k % world][k // world] for k in range(samples)])


def _sweep(pert, source, sigmas, draws, noise, loss, seed, chunk, nets, callback) -> torch.Tensor:
    """Draws in the outer loop (each z_k drawn once, ``chunk`` at a time), σ in the inner loop; (M, S, 2) sums.

    ``nets(D, σ)`` sets up the K nets w0 + σ D_k (D: per parameter (K, *shape)) and returns their forward.
    """
    device, total, done, blocks = pert.w0[0].device, len(draws) * sum(s > 0 for s in sigmas), 0, []
    for k0 in range(0, len(draws), chunk):
        ks = draws[k0:k0 + chunk]
        ds = [_perturb.noise_direction(_perturb.draw_noise(pert.w0, seed, k), pert.w0, noise) for k in ks]
        D = [torch.stack(c) if len(c) > 1 else c[0].unsqueeze(0) for c in zip(*ds)]  # per parameter (K, *shape)
        del ds
        cols = []
        for sigma in sigmas:
            if sigma == 0:  # no draws: filled with the unperturbed value later
                cols.append(torch.full((len(ks), 2), math.nan, device=device))
                continue
            cols.append(draw_sums(nets(D, sigma), source, loss, device)[0])  # (K, 2)
            done += len(ks)
            if callback is not None:
                callback(done, total)
        blocks.append(torch.stack(cols, 1))  # (K, S, 2)
    return torch.cat(blocks) if blocks else torch.zeros(0, len(sigmas), 2, device=device)


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


def _summarize(sigmas, sums, base, n, vectorized) -> LocalEnergy:
    """Per-draw means → mean over draws and std(ddof=1)/sqrt(M); σ = 0 columns take the unperturbed value."""
    values = sums.double().cpu() / n  # (M, S, 2): one host transfer for the whole run
    base = base.double().cpu() / n
    zero = torch.tensor([s == 0 for s in sigmas])
    values[:, zero] = base
    m = values.shape[0]
    mean = values.mean(0)
    sem = values.std(0, correction=1) / math.sqrt(m) if m > 1 else torch.full_like(mean, math.nan)
    points = []
    for j, s in enumerate(sigmas):
        if s == 0:  # no draws: the unperturbed value, exactly
            points.append(EnergyPoint(s, 0, float(base[1]), 0.0, 0.0, float(base[0]), 0.0, 0.0))
            continue
        points.append(EnergyPoint(sigma=s, samples=m, error_mean=float(mean[j, 1]), error_sem=float(sem[j, 1]),
                                  delta_error=float(mean[j, 1] - base[1]), loss_mean=float(mean[j, 0]),
                                  loss_sem=float(sem[j, 0]), delta_loss=float(mean[j, 0] - base[0])))
    return LocalEnergy(points, error=float(base[1]), loss=float(base[0]), examples=n,
                       draw_errors=values[..., 1].clone(), draw_losses=values[..., 0].clone(), vectorized=vectorized)
