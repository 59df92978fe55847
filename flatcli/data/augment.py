"""The usual CIFAR augmentation, done on whole batches on the device: random crop after padding, random flip.

Held as tensors and drawn from an explicit generator (as in airbench), so no DataLoader is needed and the
sequence of random draws is reproducible and resumable.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

PADDING_MODES = ("reflect", "zeros")


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4, padding_mode: str = "reflect") -> Tensor:
    """Each image of x (B, C, H, W) padded by ``pad`` on every side, cropped back to H × W at a random
    offset (dy, dx) ∈ {0..2·pad}², and mirrored left-right with probability 1/2.

    out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + j]            (no flip)
                      padded[b, c, dy_b + i, dx_b + W − 1 − j]    (flip)

    ``generator`` must live on x's device. Draws, in this order: dy (B,), dx (B,), then the flips (B,).
    ``padding_mode``: "reflect" (as airbench; the default) or "zeros" (pads with 0, i.e. with the mean
    pixel of normalized images).
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if padding_mode == "reflect" else "constant")
    rows = dy[:, None] + torch.arange(h, device=dev)                                    # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)                 # (B, W)
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]              # (B, C, H, W)
