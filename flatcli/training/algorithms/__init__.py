"""The training algorithms, one self-contained object each (see ``base.Algorithm``), by name.

A new algorithm is one new file with an ``Algorithm`` subclass and one line in ``REGISTRY``. The registry
names classes as "module:Class" strings, imported on first use, so that the command line can list and check
the names without importing torch.
"""
import importlib

REGISTRY: dict[str, str] = {
    "sgd": "flatcli.training.algorithms.sgd:SGDAlgorithm",
    "esgd": "flatcli.training.algorithms.esgd:EntropySGDAlgorithm",
    "rsgd": "flatcli.training.algorithms.rsgd:ReplicatedSGDAlgorithm",
}


def algorithm_class(name: str):
    """The ``Algorithm`` subclass registered as ``name``."""
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
