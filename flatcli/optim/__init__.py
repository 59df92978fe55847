"""Entropic optimizers, each a ``torch.optim.Optimizer``: Entropy-SGD (eSGD) and replicated SGD (rSGD)."""
from flatcli.optim.entropy_sgd import EntropySGD
from flatcli.optim.replicated_sgd import ReplicatedSGD

__all__ = ["EntropySGD", "ReplicatedSGD"]
