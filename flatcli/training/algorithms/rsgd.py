"""Replicated SGD (MATH.md §4): every replica takes a gradient on its own minibatch, then one coupled step.

Under torchrun the y replicas are spread over the ranks (y / P each, global indices rank·y/P ...); they meet
only through the center. The resumable state is keyed by global replica index, so any world size resumes it.
"""
import copy

import torch

from flatcli import distributed
from flatcli.devices import autocast
from flatcli.errors import FlatcliError
from flatcli.losses import per_example_error, per_example_loss
from flatcli.training.algorithms.base import Algorithm, _cpu, forward_backward
from flatcli.training.gamma import balanced, schedule_of

REPLICAS_FILE = "replicas.safetensors"


class ReplicatedSGDAlgorithm(Algorithm):
    """y replicas trained by ``flatcli.optim.ReplicatedSGD``; the reported model is their center w̄.

    ``batched`` (default: on CUDA for models without BatchNorm) stacks the local replicas and takes all their
    gradients in one vmapped forward/backward instead of y small ones; the numbers are the same to float
    tolerance.
    """
    data_parallel = False

    @staticmethod
    def local_models(cfg, dist) -> list[int]:
        y, world = cfg.replicas, dist.world if dist else 1
        if y % world:
            raise FlatcliError(f"replicas={y} cannot be split evenly over {world} ranks",
                               f"use a multiple of {world} replicas or another --nproc_per_node")
        rank = dist.rank if dist else 0
        return list(range(rank * y // world, (rank + 1) * y // world))

    def __init__(self, models, ids, cfg, batch, device, dist=None, global_batch: int = 1, batched=None):
        from flatcli.optim import ReplicatedSGD

        super().__init__(models, ids, cfg, batch, device, dist, global_batch)
        self.gamma_schedule = schedule_of(cfg)  # γ_t, set before every step by the trainer
        self.optimizer = ReplicatedSGD([m.parameters() for m in models], lr=cfg.lr,
                                       coupling=self.gamma_schedule(0),
                                       coupling_every=cfg.coupling_every, gamma_growth=0.0,
                                       momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=cfg.weight_decay, total_replicas=cfg.replicas,
                                       all_reduce=distributed.all_reduce_ if dist is not None else None)
        self.center = copy.deepcopy(models[0])
        # BatchNorm in train mode updates running statistics in place, which vmap cannot batch: loop then
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
        """The center w̄, with BatchNorm running statistics averaged over the replicas too (a collective)."""
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

    def set_gamma(self, gamma):
        for group in self.optimizer.param_groups:
            group["coupling"] = gamma

    @torch.no_grad()
    def balanced_gamma(self, mean_loss):
        """γ_0 = Σ_a L(w^a) / Σ_a ½ |w^a − w̄|² over every replica (flatcli.training.gamma; a collective)."""
        center = self.optimizer.center()
        sq = sum(sum((p.double() - c.double()).pow(2).sum() for p, c in zip(m.parameters(), center))
                 for m in self.models)
        total = torch.tensor([sum(mean_loss(m) for m in self.models), float(sq)], dtype=torch.float64)
        loss, sq = self._sum_over_replicas([total.to(self.device)])[0].tolist()
        return balanced(loss, 0.5 * sq, "Σ_a ½ |w^a − w̄|² of the initial replicas")

    def epoch_metrics(self, evaluate, test_error, running):
        center_train = evaluate(self.center, "train")
        test = torch.tensor(sum(evaluate(m, "test")[1] for m in self.models), dtype=torch.float64)
        self._sum_over_replicas([test])
        # the replicas' train error is the running one of the epoch: no extra passes over the data
        return {"gamma": self.optimizer.current_gamma, "replica_distance": self.replica_distance(),
                "center_train_error": center_train[1], "center_test_error": test_error,
                "replicas_train_error": running["error"], "replicas_test_error": float(test) / self.cfg.replicas}

    def metadata(self):
        return {"replicas": self.cfg.replicas}

    def state_dict(self):
        """Every replica's weights, momentum buffers and step count, in global replica order (a collective)."""
        local = [(a, {"weights": _cpu(m.state_dict()), "step_count": g["step_count"],
                      "momentum": [None if self.optimizer.state[p].get("momentum_buffer") is None else
                                   self.optimizer.state[p]["momentum_buffer"].cpu() for p in g["params"]]})
                 for a, m, g in zip(self.ids, self.models, self.optimizer.param_groups)]
        parts = distributed.all_gather(local) if self.dist is not None else [local]
        return {"replicas": [st for _, st in sorted((x for part in parts for x in part), key=lambda x: x[0])],
                "gamma_schedule": self.gamma_schedule.state_dict()}

    def load_state_dict(self, state):
        if "gamma_schedule" in state:  # (states written before schedules: the config alone describes γ)
            self.gamma_schedule.load_state_dict(state["gamma_schedule"])
        for a, m, group in zip(self.ids, self.models, self.optimizer.param_groups):
            saved = state["replicas"][a]
            m.load_state_dict(saved["weights"])
            group["step_count"] = saved["step_count"]
            for p, buf in zip(group["params"], saved["momentum"]):
                if buf is not None:
                    self.optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()

    def extra_weights(self, state):
        return {REPLICAS_FILE: {f"{a}.{k}": v for a, st in enumerate(state["replicas"])
                                for k, v in st["weights"].items()}}
