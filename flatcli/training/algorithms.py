"""One optimizer step of each algorithm, with the minibatch plumbing around the optimizers in flatcli.optim.

``minibatches_per_step`` is how many minibatches each model (each replica) draws in one step, which
fixes how many steps make an epoch. Each stepper's ``step()`` runs one optimizer step and returns device
tensors ``(loss_sum, error_sum, examples)`` over the minibatches it used, without a host sync.

Under torchrun (``dist`` given), SGD and eSGD are data-parallel: each rank gets a shard of every global
minibatch and the gradients are summed over ranks before the update, so every rank holds the same weights
(eSGD draws the same Langevin noise everywhere from the same seed). rSGD instead spreads the replicas over
the ranks; they meet only through the center, one all-reduce on the steps that couple.
"""
import copy
from typing import Callable

import torch

from flatcli import distributed
from flatcli.devices import autocast
from flatcli.losses import error_count, loss_sum, per_example_error, per_example_loss
from flatcli.training.config import TrainConfig

BatchFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # local stream index -> (x, y) on the device


def forward_backward(model, x, y, loss: str, amp: bool, total: int):
    """Backward of (sum of the shard's losses) / (examples in the global minibatch); (loss_sum, error_sum)."""
    with autocast(x.device, amp):
        out = model(x)
    total_loss = loss_sum(out, y, loss)
    (total_loss / total).backward()
    return total_loss.detach(), error_count(out.detach(), y)


class SGDStepper:
    minibatches_per_step = 1

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device, dist=None, global_batch: int = 1):
        self.model, self.cfg, self.batch, self.dist, self.global_batch = models[0], cfg, batch, dist, global_batch
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def gradient(self):
        """Gradient of the mean loss over one global minibatch, summed over the ranks' shards."""
        x, y = self.batch(0)
        self.optimizer.zero_grad(set_to_none=True)
        sums = forward_backward(self.model, x, y, self.cfg.loss, self.cfg.amp, self.global_batch)
        if self.dist is not None:
            distributed.all_reduce_([p.grad for p in self.model.parameters() if p.grad is not None])
        return (*sums, len(x))

    def step(self):
        sums = self.gradient()
        self.optimizer.step()
        return sums

    def report_model(self):
        return self.model

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class ESGDStepper(SGDStepper):
    """Entropy-SGD: one outer step calls the closure L times, each on a fresh minibatch (MATH.md §3)."""

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device, dist=None, global_batch: int = 1):
        from flatcli.optim import EntropySGD

        self.model, self.cfg, self.batch, self.dist, self.global_batch = models[0], cfg, batch, dist, global_batch
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
            sums.append(self.gradient())
            return sums[-1][0] / sums[-1][2]

        self.optimizer.step(closure)
        return sum(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums)

    def extra_state(self) -> dict:
        return {"noise_generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["noise_generator"])


class RSGDStepper(SGDStepper):
    """Replicated SGD: every replica takes a gradient on its own minibatch, then one coupled step (MATH.md §4).

    ``batched`` (default: on CUDA for models without BatchNorm) stacks the replicas and takes all their gradients
    in one vmapped forward/backward instead of y small ones; the numbers are the same to float tolerance.
    """

    def __init__(self, models, cfg: TrainConfig, batch: BatchFn, device, dist=None, global_batch: int = 1,
                 batched: bool | None = None):
        from flatcli.optim import ReplicatedSGD

        self.models, self.cfg, self.batch, self.dist = models, cfg, batch, dist
        self.optimizer = ReplicatedSGD([m.parameters() for m in models], lr=cfg.lr, coupling=cfg.gamma,
                                       coupling_every=cfg.coupling_every, gamma_growth=cfg.gamma_growth,
                                       momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=cfg.weight_decay, total_replicas=cfg.replicas,
                                       all_reduce=distributed.all_reduce_ if dist is not None else None)
        self.center = copy.deepcopy(models[0])
        # one vmapped forward/backward for all local replicas where it pays (CUDA) and the model allows it:
        # BatchNorm in train mode updates running statistics in place, which vmap cannot batch: loop then.
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
        self.batched = batched if batched is not None else (device.type == "cuda" and not has_bn and len(models) > 1)

    def step(self):
        batches = [self.batch(i) for i in range(len(self.models))]
        if self.batched:
            loss_sum, err_sum, n = self._batched_gradients(batches)
        else:
            loss_sum = err_sum = n = 0
            for model, (x, y) in zip(self.models, batches):
                model.zero_grad(set_to_none=True)
                l, e = forward_backward(model, x, y, self.cfg.loss, self.cfg.amp, len(x))
                loss_sum, err_sum, n = loss_sum + l, err_sum + e, n + len(x)
        self.optimizer.step()
        return loss_sum, err_sum, n

    def _batched_gradients(self, batches):
        """All local replicas in one forward/backward: torch.func.grad over the model, vmapped over replicas."""
        names = [name for name, _ in self.models[0].named_parameters()]
        stacked = {n: torch.stack(ps) for n, ps in zip(names, zip(*(m.parameters() for m in self.models)))}
        xs, ys = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])  # (R, B, ...)
        template, loss, amp = self.models[0], self.cfg.loss, self.cfg.amp

        def replica_loss(params, x, y):
            with autocast(x.device, amp):
                out = torch.func.functional_call(template, params, (x,))
            losses = per_example_loss(out, y, loss)
            return losses.mean(), (losses.detach().sum(), per_example_error(out.detach(), y).sum())

        grads, (loss_sums, err_sums) = torch.func.vmap(torch.func.grad(replica_loss, has_aux=True))(stacked, xs, ys)
        for r, model in enumerate(self.models):
            for name, p in zip(names, model.parameters()):
                p.grad = grads[name][r]
        return loss_sums.sum(), err_sums.sum(), ys.shape[0] * ys.shape[1]

    def _sum_over_replicas(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.dist is not None:
            distributed.all_reduce_(tensors)
        return tensors

    @torch.no_grad()
    def report_model(self):
        """The center w̄, with BatchNorm running statistics averaged over the replicas too."""
        for p, c in zip(self.center.parameters(), self.optimizer.center()):
            p.copy_(c)
        names = [n for n, b in self.center.named_buffers() if b.is_floating_point()]
        sums = [sum(dict(m.named_buffers())[n].float() for m in self.models) for n in names]
        buffers = dict(self.center.named_buffers())
        for name, total in zip(names, self._sum_over_replicas(sums)):
            buffers[name].copy_(total / self.cfg.replicas)
        for name, buf in buffers.items():   # counters (num_batches_tracked): the same in every replica
            if not buf.is_floating_point():
                buf.copy_(dict(self.models[0].named_buffers())[name])
        return self.center

    @torch.no_grad()
    def replica_distance(self) -> float:
        """Mean over replicas of |w^a − w̄|² / N: the mean squared distance per parameter to the center."""
        center = self.optimizer.center()
        n = sum(c.numel() for c in center)
        d = sum(sum((p - c).pow(2).sum() for p, c in zip(m.parameters(), center)) for m in self.models)
        return float(self._sum_over_replicas([torch.as_tensor(d, dtype=torch.float64)])[0]) / (n * self.cfg.replicas)

    def extra_state(self) -> dict:
        """Per local replica: momentum buffers (or None) and the step count, independent of how ranks split them."""
        groups = self.optimizer.param_groups
        return {"replicas": [{"step_count": g["step_count"],
                              "momentum": [self.optimizer.state[p].get("momentum_buffer") for p in g["params"]]}
                             for g in groups]}

    def load_extra_state(self, state: dict) -> None:
        for group, saved in zip(self.optimizer.param_groups, state["replicas"]):
            group["step_count"] = saved["step_count"]
            for p, buf in zip(group["params"], saved["momentum"]):
                if buf is not None:
                    self.optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()


STEPPERS = {"sgd": SGDStepper, "esgd": ESGDStepper, "rsgd": RSGDStepper}
