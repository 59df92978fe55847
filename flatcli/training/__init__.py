"""Training: hyper-parameters (config), minibatch order (batches), one object per algorithm (algorithms), the
loop (trainer). The names below are imported on first use, so reading the config costs no torch import."""
import importlib

from flatcli.training.config import ALGOS, TrainConfig

_LAZY = {"Interrupted": "flatcli.training.trainer", "Trainer": "flatcli.training.trainer",
         "evaluate_model": "flatcli.training.trainer"}
__all__ = ["ALGOS", "TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flatcli.training' has no attribute {name!r}")
