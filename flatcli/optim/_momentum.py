"""What both entropic optimizers share: heavy-ball momentum exactly as torch.optim.SGD does it (dampening 0),
and the check of a param group's hyper-parameters."""
import math

import torch


def check_hyper(group: dict, ranges: dict[str, str]) -> None:
    """Every value of ``group`` named in ``ranges`` ("name": ">= 0" or "in [0, 1)") is a finite number in its
    range; Nesterov needs momentum. Raises ValueError naming the bad value, as torch.optim does."""
    for name, need in ranges.items():
        v = group[name]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if ok and need == "in [0, 1)":
            ok = v < 1
        if not ok:
            raise ValueError(f"Invalid {name}: {v!r} (need a finite value {need})")
    if group.get("nesterov") and not group.get("momentum", 0) > 0:
        raise ValueError("Invalid nesterov: True (need momentum > 0 with nesterov=True)")


def momentum_direction(optimizer: torch.optim.Optimizer, params, d, momentum: float, nesterov: bool):
    """b ← m b + d (b starts at 0, kept in ``optimizer.state``); returns d + m b with Nesterov, else b."""
    for p in params:
        if "momentum_buffer" not in optimizer.state[p]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    return torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
