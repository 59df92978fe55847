"""Entropy-SGD (MATH.md §3): one outer step calls the closure L times, each on a fresh minibatch."""
import torch

from flatcli.training.algorithms.base import Algorithm
from flatcli.training.gamma import balanced, schedule_of


class EntropySGDAlgorithm(Algorithm):
    """flatcli.optim.EntropySGD with its Langevin noise drawn from a generator it owns (and saves)."""

    def __init__(self, models, ids, cfg, batch, device, dist=None, global_batch: int = 1):
        from flatcli.optim import EntropySGD

        super().__init__(models, ids, cfg, batch, device, dist, global_batch)
        self.minibatches_per_step = cfg.langevin_steps
        # γ_t comes from the schedule (set before every step); "auto" is resolved by the trainer, 0 until then
        self.gamma_schedule = schedule_of(cfg)
        # seeded alike on every rank: data-parallel ranks draw the same noise and stay identical
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.optimizer = EntropySGD(self.model.parameters(), lr=cfg.lr, langevin_lr=cfg.langevin_lr,
                                    langevin_steps=cfg.langevin_steps, gamma=self.gamma_schedule(0),
                                    gamma_growth=0.0, noise=cfg.noise, alpha=cfg.alpha,
                                    momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay, generator=self.generator)

    def step(self):
        sums = []

        def closure():
            sums.append(self.gradient())
            return sums[-1][0] / sums[-1][2]

        self.optimizer.step(closure)
        return sum(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums)

    def set_gamma(self, gamma):
        for group in self.optimizer.param_groups:
            group["gamma"] = gamma

    @torch.no_grad()
    def balanced_gamma(self, mean_loss):
        """γ_0 = L(w) / ½ |w|² (flatcli.training.gamma)."""
        half_sq = 0.5 * float(sum(p.double().pow(2).sum() for p in self.model.parameters()))
        return balanced(mean_loss(self.model), half_sq, "½ |w|² of the initial weights")

    def epoch_metrics(self, evaluate, test_error, running):
        return {"gamma": self.optimizer.current_gamma}  # γ of the coming step, after scoping

    def state_dict(self):
        return {**super().state_dict(), "noise_generator": self.generator.get_state(),
                "gamma_schedule": self.gamma_schedule.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["noise_generator"])
        if "gamma_schedule" in state:  # (states written before schedules: the config alone describes γ)
            self.gamma_schedule.load_state_dict(state["gamma_schedule"])

