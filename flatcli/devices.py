"""Device choice and mixed precision; nothing else in flatcli names a device."""
import contextlib

import torch

from flatcli.errors import FlatcliError

MAX_THREADS = 4096  # torch.set_num_threads takes a C int; more threads than this is a typo


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FlatcliError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatcliError(f"device {name!r} asked for, but CUDA is not available", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FlatcliError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)",
                               "pick an index below the device count")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FlatcliError(f"device {name!r} asked for, but MPS is not available", "use --device cpu or auto")
    elif device.type != "cpu":
        raise FlatcliError(f"unsupported device {name!r}", "use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where the device supports it; a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (intra-op) to ``threads``; None keeps torch's default. Returns the count in use."""
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise FlatcliError(f"threads={threads} is not in 1..{MAX_THREADS}", "give threads=1 or more, up to the cores")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
