"""One optimizer step of each algorithm, with the minibatch plumbing around the optimizers in flatcli.optim.

``minibatches_per_step`` is how many minibatches each model (each replica) draws in one step, which
fixes how many steps make an epoch. Each stepper's ``step()`` runs one optimizer step and returns device tensors
``(loss_sum, error_sum, examples)`` over the minibatches it used, without a host sync.
"""
import copy
from typing import Callable

import torch

from flatcli.devices import autocast
from flatcli.losses import per_example_error, per_example_loss
from flatcli.training.config import TrainConfig

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # stream id -> (x, y) on the device


def forward_backward(model, x, y, loss: str, amp: bool):
    """Mean minibatch loss, backward; returns (loss_sum, error_sum) detached."""
    with autocast(x.device, amp):
        out = model(x)
    losses = per_example_loss(out, y, loss)
    losses.mean().backward()
    return losses.detach().sum(), per_example_error(out.detach(), y).sum()


class SGDStepper:
    minibatches_per_step = 1

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device):
        self.model, self.cfg, self.batch = models[0], cfg, batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def step(self):
        x, y = self.batch(0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, err_sum = forward_backward(self.model, x, y, self.cfg.loss, self.cfg.amp)
        self.optimizer.step()
        return loss_sum, err_sum, len(x)

    def report_model(self):
        return self.model

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class ESGDStepper(SGDStepper):
    """Entropy-SGD: one outer step calls the closure L times, each on a fresh minibatch (MATH.md §3)."""

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device):
        from flatcli.optim import EntropySGD

        self.model, self.cfg, self.batch = models[0], cfg, batch
        self.minibatches_per_step = cfg.langevin_steps
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.optimizer = EntropySGD(self.model.parameters(), lr=cfg.lr, langevin_lr=cfg.langevin_lr,
                                    langevin_steps=cfg.langevin_steps, gamma=cfg.gamma,
                                    gamma_growth=cfg.gamma_growth, noise=cfg.noise, alpha=cfg.alpha,
                                    momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay, generator=self.generator)

    def step(self):
        sums = []

        def closure():
            x, y = self.batch(0)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, err_sum = forward_backward(self.model, x, y, self.cfg.loss, self.cfg.amp)
            sums.append((loss_sum, err_sum, len(x)))
            return loss_sum / len(x)

        self.optimizer.step(closure)
        return sum(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums)

    def extra_state(self) -> dict:
        return {"noise_generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["noise_generator"])


class RSGDStepper(SGDStepper):
    """Replicated SGD: every replica takes a gradient on its own minibatch, then one coupled step (MATH.md §4)."""

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device):
        from flatcli.optim import ReplicatedSGD

        self.models, self.cfg, self.batch = models, cfg, batch
        self.optimizer = ReplicatedSGD([m.parameters() for m in models], lr=cfg.lr, coupling=cfg.gamma,
                                       coupling_every=cfg.coupling_every, gamma_growth=cfg.gamma_growth,
                                       momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=cfg.weight_decay)
        self.center = copy.deepcopy(models[0])

    def step(self):
        loss_sum = err_sum = n = 0
        for a, model in enumerate(self.models):
            x, y = self.batch(a)
            model.zero_grad(set_to_none=True)
            l, e = forward_backward(model, x, y, self.cfg.loss, self.cfg.amp)
            loss_sum, err_sum, n = loss_sum + l, err_sum + e, n + len(x)
        self.optimizer.step()
        return loss_sum, err_sum, n

    @torch.no_grad()
    def report_model(self):
        """The center w̄, with BatchNorm running statistics averaged over the replicas too."""
        for p, c in zip(self.center.parameters(), self.optimizer.center()):
            p.copy_(c)
        for name, buf in self.center.named_buffers():
            stacked = torch.stack([dict(m.named_buffers())[name] for m in self.models])
            buf.copy_(stacked.float().mean(0).to(buf.dtype) if buf.is_floating_point() else stacked[0])
        return self.center

    @torch.no_grad()
    def replica_distance(self) -> float:
        """Mean over replicas of |w^a − w̄|² / N: the mean squared distance per parameter to the center."""
        center = self.optimizer.center()
        n = sum(c.numel() for c in center)
        d = sum(sum((p - c).pow(2).sum() for p, c in zip(m.parameters(), center)) for m in self.models)
        return float(d) / (n * len(self.models))


STEPPERS = {"sgd": SGDStepper, "esgd": ESGDStepper, "rsgd": RSGDStepper}
