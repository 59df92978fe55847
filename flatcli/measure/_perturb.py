"""Weight noise for the local-energy estimator (MATH.md §1): draws, in-place perturbation, exact restoration.

Draw k of a run with seed s is ``z_k ~ N(0, I_N)`` from a generator seeded with ``draw_seed(s, k)``, one flat
float32 vector over all parameters in ``model.parameters()`` order. So draw k does not depend on how many draws
there are, on which σ values are asked for, nor on which process computes it.
"""
import torch
import torch.nn as nn

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def draw_seed(seed: int, k: int) -> int:
    """Seed of draw k: SplitMix64(SplitMix64(seed) + k), a 64-bit integer."""
    return _splitmix64((_splitmix64(seed & _MASK) + k) & _MASK)


def draw_noise(params: list[torch.Tensor], seed: int, k: int) -> list[torch.Tensor]:
    """z_k split into one tensor per parameter (shape and dtype of each parameter)."""
    device = params[0].device
    g = torch.Generator(device=device).manual_seed(draw_seed(seed, k))
    z = torch.randn(sum(p.numel() for p in params), generator=g, device=device)  # (N,) float32
    return [t.view_as(p).to(device=p.device, dtype=p.dtype)
            for t, p in zip(z.split([p.numel() for p in params]), params)]


def noise_direction(z: list[torch.Tensor], w0: list[torch.Tensor], noise: str) -> list[torch.Tensor]:
    """d with w(σ) = w0 + σ d: d = w0 ⊙ z (multiplicative, w0 ⊙ (1 + σ z)) or d = z (additive). In place on z."""
    if noise == "multiplicative":
        torch._foreach_mul_(z, w0)
    return z


class Perturbation:
    """Holds ONE copy w0 of the parameters; sets them to w0 + σ d in place and restores them bit for bit."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters()]
        self.w0 = [p.detach().clone() for p in self.params]

    def set(self, d: list[torch.Tensor], sigma: float) -> None:
        """w ← w0 + σ d (two fused passes over the parameters)."""
        torch._foreach_copy_(self.params, self.w0)
        torch._foreach_add_(self.params, d, alpha=sigma)

    def restore(self) -> None:
        torch._foreach_copy_(self.params, self.w0)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics (the ones ``--bn recompute`` re-estimates)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class ModelState:
    """Saves the train/eval flag of every module, the buffers and BN momenta; ``restore()`` puts them back."""

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.momenta = [(m, m.momentum) for m in batchnorms(model)]

    def restore(self) -> None:
        for b, saved in self.buffers:
            b.copy_(saved)
        for m, momentum in self.momenta:
            m.momentum = momentum
        for m, training in self.modes:
            m.training = training


def recompute_bn_stats(model: nn.Module, bns: list, batches: list[torch.Tensor]) -> None:
    """Re-estimate BN running statistics as the plain average over ``batches`` (momentum=None), then eval mode.

    Only the BN layers run in train mode while doing it, so dropout and the like stay off.
    """
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running = mean over batches of the batch statistics
        m.train()
    for x in batches:
        model(x)
    for m in bns:
        m.eval()
