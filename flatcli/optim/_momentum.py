"""The heavy-ball momentum both entropic optimizers share, exactly as torch.optim.SGD does it (dampening 0)."""
import torch


def momentum_direction(optimizer: torch.optim.Optimizer, params, d, momentum: float, nesterov: bool):
    """b ← m b + d (b starts at 0, kept in ``optimizer.state``); returns d + m b with Nesterov, else b."""
    for p in params:
        if "momentum_buffer" not in optimizer.state[p]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    return torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
