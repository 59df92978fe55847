"""flatcli: train networks with SGD, Entropy-SGD and replicated SGD, and measure how flat their minima are.

    from flatcli import local_energy, local_entropy, EntropySGD, ReplicatedSGD
    from flatcli import sharpness, pac_bayes_sigma, compare

The names are imported on first use, so that ``import flatcli`` (and ``flatcli --version``) stays quick.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {"local_energy": "flatcli.measure", "local_entropy": "flatcli.measure",
         "EntropySGD": "flatcli.optim", "ReplicatedSGD": "flatcli.optim",
         "sharpness": "flatcli.measure", "pac_bayes_sigma": "flatcli.measure", "compare": "flatcli.measure"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flatcli' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
