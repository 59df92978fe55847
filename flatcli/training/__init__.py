"""Training: hyper-parameters (config), minibatch order (batches), algorithm steps (algorithms), the loop (trainer)."""
from flatcli.training.config import ALGOS, TrainConfig
from flatcli.training.trainer import Interrupted, Trainer, evaluate_model

__all__ = ["ALGOS", "Interrupted", "TrainConfig", "Trainer", "evaluate_model"]
