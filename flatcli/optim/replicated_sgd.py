"""Replicated SGD (Baldassi et al. 2016 "robust ensembles"; Pittorino et al. 2021, "Entropic gradient descent
algorithms and wide flat minima", Algorithm 2; MATH.md §4): SGD on Σ_a L(w^a) + γ Σ_a ½ |w^a − w̄|²."""
from collections.abc import Callable, Iterable, Sequence

import torch

from flatcli.optim import defaults as D
from flatcli.optim._momentum import check_hyper, momentum_direction

DEFAULT_LR, DEFAULT_COUPLING, DEFAULT_COUPLING_EVERY = D.RSGD_LR, D.RSGD_COUPLING, D.RSGD_COUPLING_EVERY
DEFAULT_GAMMA_GROWTH = D.GAMMA_GROWTH
_RANGES = {"lr": ">= 0", "coupling": ">= 0", "gamma_growth": ">= 0", "momentum": ">= 0", "weight_decay": ">= 0"}


def _check(ok: bool, name: str, value, need: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (need {need})")


class ReplicatedSGD(torch.optim.Optimizer):
    """y replicas of one network, each trained by SGD and elastically coupled to their center w̄.

    ``replicas`` holds one iterable of parameters per replica (same shapes, same order); each becomes one
    param group. Symbols mapped once: ``lr`` = η, ``coupling`` = γ_0, ``coupling_every`` = K,
    ``gamma_growth`` = γ_1. Step t (counted from 1) does, for every replica a::

        w̄   ← (1/y) Σ_a w^a                                  (before any replica moves)
        dw^a ← ∇L(w^a; Ξ_a) [+ weight_decay · w^a]          (the gradient already in .grad)
        if t ≡ 0 (mod K):  dw^a ← dw^a + K γ_t (w^a − w̄),    γ_t = γ_0 (1 + γ_1)^(t − 1)
        [momentum m: b ← m b + dw^a (b starts at 0);  dw^a ← dw^a + m b if nesterov else b]
        w^a  ← w^a − η dw^a

    With ``momentum = weight_decay = 0`` and ``gamma_growth = 0`` this is exactly seed Algorithm 2. Momentum
    acts on the whole coupled gradient, so with γ = 0 each replica runs ``torch.optim.SGD``. The exponent of
    the scoping is the number of steps already completed, t − 1, as in EntropySGD (γ_0 at the first step).
    The step count t − 1 is kept per group under ``"step_count"``, so it survives ``state_dict()``; K and the
    count are read from the first group (groups are replicas, which share them). Parameters whose ``.grad`` is None do not move (they still count in w̄).

    Replicas spread over processes: give each process its own replicas, ``total_replicas`` = y over all of
    them, and ``all_reduce`` (a function that sums a list of tensors over the processes in place, e.g. with
    torch.distributed); the center is then one all-reduce, done only on the steps that couple.
    """

    def __init__(self, replicas: Sequence[Iterable[torch.Tensor]], lr: float = DEFAULT_LR, *,
                 coupling: float = DEFAULT_COUPLING, coupling_every: int = DEFAULT_COUPLING_EVERY,
                 gamma_growth: float = DEFAULT_GAMMA_GROWTH, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, total_replicas: int | None = None,
                 all_reduce: Callable[[list[torch.Tensor]], None] | None = None):
        replicas = [list(r) for r in replicas]
        self.total_replicas = total_replicas or len(replicas)
        self.all_reduce = all_reduce
        _check(self.total_replicas >= 2, "number of replicas", self.total_replicas, ">= 2")
        _check(len(replicas) >= 1, "number of local replicas", len(replicas), ">= 1")
        shapes = [tuple(p.shape) for p in replicas[0]]
        for a, r in enumerate(replicas[1:], start=1):
            _check([tuple(p.shape) for p in r] == shapes, f"parameter shapes of replica {a}",
                   [tuple(p.shape) for p in r], f"the shapes of replica 0, {shapes}")
        _check(isinstance(coupling_every, int) and coupling_every >= 1, "coupling_every", coupling_every,
               "an integer >= 1")
        defaults = dict(lr=lr, coupling=coupling, coupling_every=coupling_every, gamma_growth=gamma_growth,
                        momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, step_count=0)
        super().__init__([{"params": r} for r in replicas], defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Check the replica's values (torch.optim passes every group through here)."""
        super().add_param_group(param_group)
        check_hyper(self.param_groups[-1], _RANGES)

    @property
    def current_gamma(self) -> float:
        """γ_t = γ_0 (1 + γ_1)^(t − 1) of the coming step t, t − 1 steps completed (first param group)."""
        g = self.param_groups[0]
        return g["coupling"] * (1 + g["gamma_growth"]) ** g["step_count"]

    def will_couple(self) -> bool:
        """Whether the coming step t applies the coupling (t ≡ 0 mod K); only then is the center needed."""
        g = self.param_groups[0]
        return (g["step_count"] + 1) % g["coupling_every"] == 0

    @torch.no_grad()
    def center(self) -> list[torch.Tensor]:
        """The center w̄ = (1/y) Σ_a w^a, one new tensor per parameter."""
        groups = self.param_groups
        total = [p.detach().clone() for p in groups[0]["params"]]
        for g in groups[1:]:
            torch._foreach_add_(total, g["params"])
        if self.all_reduce is not None:
            self.all_reduce(total)                                          # Σ over every process's replicas
        torch._foreach_div_(total, self.total_replicas)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        """One step t of Algorithm 2 with the gradients stored in every replica; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        couples, gamma_k = self.will_couple(), self.current_gamma * self.param_groups[0]["coupling_every"]
        center = self.center() if couples else None                        # w̄, before any replica moves
        for group in self.param_groups:
            moving = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            params = [group["params"][i] for i in moving]
            if params:
                d = [p.grad for p in params]                                # ∇L(w^a; Ξ_a), never modified
                if group["weight_decay"]:
                    d = torch._foreach_add(d, params, alpha=group["weight_decay"])
                if couples:
                    pull = torch._foreach_sub(params, [center[i] for i in moving])  # w^a − w̄
                    d = torch._foreach_add(d, pull, alpha=gamma_k)          # + K γ_t (w^a − w̄)
                self._apply(group, params, d)
            group["step_count"] += 1
        return loss

    def _apply(self, group, params, d) -> None:
        """w ← w − η d, with torch.optim.SGD's momentum / Nesterov (dampening 0) when momentum > 0."""
        if group["momentum"]:
            d = momentum_direction(self, params, d, group["momentum"], group["nesterov"])
        torch._foreach_add_(params, d, alpha=-group["lr"])
