"""What a training algorithm is to the trainer: its models and optimizer(s), one step, the model it reports,
its extra metrics, and its whole resumable state.

The trainer knows no algorithm by name. It asks the algorithm class which models this process trains
(``local_models``), builds them, and then only calls the methods below. ``step()`` returns device tensors
``(loss_sum, error_sum, examples)`` over the minibatches it used, without a host sync.

Under torchrun (``dist`` given) a data-parallel algorithm (``data_parallel = True``) gets a shard of every
global minibatch and sums its gradients over the ranks before the update (``gradient()``), so every rank
holds the same weights. Others (rSGD) train their own models on each rank; their ``state_dict()`` and
``report_model()`` are collectives every rank calls.
"""
from typing import Callable

import torch

from flatcli import distributed
from flatcli.devices import autocast
from flatcli.errors import FlatcliError
from flatcli.losses import error_count, loss_sum
from flatcli.training.config import TrainConfig

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # local stream index -> (x, y) on the device


def forward_backward(model, x, y, loss: str, amp: bool, total: int):
    """Backward of (sum of the shard's losses) / (examples in the global minibatch); (loss_sum, error_sum)."""
    with autocast(x.device, amp):
        out = model(x)
    total_loss = loss_sum(out, y, loss)
    (total_loss / total).backward()
    return total_loss.detach(), error_count(out.detach(), y)


class Algorithm:
    """One training algorithm. Subclasses set ``self.optimizer`` (whose groups carry the lr) and ``step``."""
    minibatches_per_step = 1  # minibatches each model draws per step: fixes how many steps make an epoch
    data_parallel = True      # under torchrun: shard every global minibatch over the ranks

    @staticmethod
    def local_models(cfg: TrainConfig, dist) -> list[int]:
        """Indices of the models (data streams) this process trains."""
        return [0]

    def __init__(self, models: list[torch.nn.Module], ids: list[int], cfg: TrainConfig, batch: BatchFn,
                 device: torch.device, dist=None, global_batch: int = 1):
        self.models, self.ids, self.cfg, self.batch, self.device, self.dist = models, ids, cfg, batch, device, dist
        self.model, self.global_batch = models[0], global_batch

    # -- one step ---------------------------------------------------------------------------------
    def gradient(self):
        """Gradient of the mean loss over one global minibatch, summed over the ranks' shards."""
        x, y = self.batch(0)
        self.optimizer.zero_grad(set_to_none=True)
        sums = forward_backward(self.model, x, y, self.cfg.loss, self.cfg.amp, self.global_batch)
        if self.dist is not None:
            distributed.all_reduce_([p.grad for p in self.model.parameters() if p.grad is not None])
        return (*sums, len(x))

    def step(self):
        raise NotImplementedError

    # -- the coupling γ (entropic algorithms only; see flatcli.training.gamma) ------------------------
    gamma_schedule = None  # a GammaSchedule for algorithms that couple; the trainer sets its horizon

    def set_gamma(self, gamma: float) -> None:
        """The coupling of the coming step (the trainer calls this before every step)."""

    def balanced_gamma(self, mean_loss) -> float:
        """The balanced γ_0 of ``gamma="auto"``; ``mean_loss(model)`` is its mean training loss."""
        raise FlatcliError(f"gamma='auto' is for the entropic algorithms, not {self.cfg.algo}",
                           "use --gamma auto with --algo esgd or rsgd")

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- what it reports ----------------------------------------------------------------------------
    def report_model(self) -> torch.nn.Module:
        """The model that is evaluated, saved as model.safetensors and measured by default."""
        return self.model

    def epoch_metrics(self, evaluate, test_error: float, running: dict) -> dict:
        """Extra columns of metrics.csv at the end of an epoch. ``evaluate(model, split)`` → (loss, error)."""
        return {}

    def metadata(self) -> dict:
        """Extra fields of the checkpoint metadata."""
        return {"replicas": 0}

    def extra_weights(self, state: dict) -> dict[str, dict]:
        """Weight files beyond model.safetensors, from ``state_dict()``'s result: {file name: state dict}."""
        return {}

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: weights, optimizer state, generators (tensors, numbers)."""
        return {"weights": _cpu(self.model.state_dict()), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])


def _cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
