"""Entropic optimizers, each a ``torch.optim.Optimizer``: Entropy-SGD (eSGD) and replicated SGD (rSGD).

Imported on first use, so that reading the defaults (``flatcli.optim.defaults``) costs no torch import.
"""
import importlib

_LAZY = {"EntropySGD": "flatcli.optim.entropy_sgd", "ReplicatedSGD": "flatcli.optim.replicated_sgd"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flatcli.optim' has no attribute {name!r}")
