"""The training algorithms, one self-contained object each (see ``base.Algorithm``), by name.

A new algorithm is one new file with an ``Algorithm`` subclass and one line here.
"""
from flatcli.training.algorithms.base import Algorithm
from flatcli.training.algorithms.esgd import EntropySGDAlgorithm
from flatcli.training.algorithms.rsgd import ReplicatedSGDAlgorithm
from flatcli.training.algorithms.sgd import SGDAlgorithm

ALGORITHMS: dict[str, type[Algorithm]] = {
    "sgd": SGDAlgorithm,
    "esgd": EntropySGDAlgorithm,
    "rsgd": ReplicatedSGDAlgorithm,
}
