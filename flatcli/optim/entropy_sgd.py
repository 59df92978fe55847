"""Entropy-SGD (Chaudhari et al. 2017, "Entropy-SGD: biasing gradient descent into wide valleys"), in the form of
Pittorino et al. 2021 ("Entropic gradient descent algorithms and wide flat minima", Algorithm 1; MATH.md §3)."""
import math

import torch

from flatcli.optim import defaults as D
from flatcli.optim._momentum import check_hyper, momentum_direction

DEFAULT_LR, DEFAULT_LANGEVIN_LR, DEFAULT_LANGEVIN_STEPS = D.ESGD_LR, D.ESGD_LANGEVIN_LR, D.ESGD_LANGEVIN_STEPS
DEFAULT_GAMMA, DEFAULT_GAMMA_GROWTH, DEFAULT_NOISE, DEFAULT_ALPHA = D.ESGD_GAMMA, D.GAMMA_GROWTH, D.ESGD_NOISE, \
    D.ESGD_ALPHA
# hyper-parameters a param group may set for itself, and the range of each
_RANGES = {"lr": ">= 0", "langevin_lr": ">= 0", "gamma": ">= 0", "gamma_growth": ">= 0", "noise": ">= 0",
           "alpha": "in [0, 1)", "momentum": ">= 0", "weight_decay": ">= 0"}


class EntropySGD(torch.optim.Optimizer):
    """Entropy-SGD: descend the local-entropy loss, whose gradient γ (w − ⟨w'⟩) is estimated by SGLD.

    One ``step(closure)`` is one outer step (MATH.md §3), symbols mapped once:
    ``lr`` = η, ``langevin_lr`` = η', ``langevin_steps`` = L, ``gamma`` = γ_0, ``gamma_growth`` = γ_1,
    ``noise`` = ε, ``alpha`` = α::

        w', μ ← w
        for l = 1..L:   dw' ← ∇L(w'; Ξ_l) + γ_t (w' − w) [+ weight_decay · w']
                        w'  ← w' − η' dw' + sqrt(η') ε ξ,  ξ ~ N(0, I)
                        μ   ← α μ + (1 − α) w'
        d ← w − μ;  [momentum m: b ← m b + d (b starts at 0);  d ← d + m b if nesterov else b]
        w ← w − η d

    with γ_t = γ_0 (1 + γ_1)^t, t = outer steps taken so far (t = 0 at the first step, kept per param group
    under ``"step_count"``, so it survives ``state_dict()``). With ``momentum = weight_decay = 0`` and
    ``gamma_growth = 0`` this is exactly seed Algorithm 1. Weight decay (L2) acts on the inner gradient dw';
    momentum / Nesterov act on the outer direction w − μ, as in Chaudhari et al.'s code.

    ``closure()`` must zero the grads, compute the loss of a fresh minibatch, call backward and return the loss;
    it is called L times per step, while the parameters hold w'. After the step they hold the new w. A
    parameter whose ``.grad`` is None after a closure call does not move in that Langevin step (frozen
    parameters stay frozen: with momentum, a parameter that had no gradient in any of the L closure calls
    does not take the outer step either, as with ``torch.optim.SGD``). ``step`` returns the mean of the L
    closure losses.

    Noise: one ``torch.randn`` draw per parameter per Langevin step, in parameter order, from ``generator``
    (a ``torch.Generator`` on the parameters' device; None = the global RNG). None is drawn when ε = 0.
    The optimizer does not save the generator: for an exact resume the caller saves ``generator.get_state()``
    next to ``state_dict()``. Every hyper-parameter but ``langevin_steps`` may be set per param group (each
    group's values are checked); all groups share one inner loop, so ``langevin_steps`` is the optimizer's
    and a param group that sets its own is refused.
    """

    def __init__(self, params, lr: float = DEFAULT_LR, *, langevin_lr: float = DEFAULT_LANGEVIN_LR,
                 langevin_steps: int = DEFAULT_LANGEVIN_STEPS, gamma: float = DEFAULT_GAMMA,
                 gamma_growth: float = DEFAULT_GAMMA_GROWTH, noise: float = DEFAULT_NOISE,
                 alpha: float = DEFAULT_ALPHA, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None):
        if not (isinstance(langevin_steps, int) and langevin_steps >= 1):
            raise ValueError(f"Invalid langevin_steps: {langevin_steps!r} (need an integer >= 1)")
        self.langevin_steps = langevin_steps
        defaults = dict(lr=lr, langevin_lr=langevin_lr, gamma=gamma,
                        gamma_growth=gamma_growth, noise=noise, alpha=alpha, momentum=momentum,
                        nesterov=nesterov, weight_decay=weight_decay, step_count=0)
        super().__init__(params, defaults)
        self.generator = generator

    def add_param_group(self, param_group: dict) -> None:
        """Check the group's own values (torch.optim passes every group through here, the first included)."""
        if "langevin_steps" in param_group and param_group["langevin_steps"] != self.langevin_steps:
            raise ValueError(f"Invalid langevin_steps in a param group: {param_group['langevin_steps']!r} (all "
                             f"groups share one inner loop of {self.langevin_steps} steps: set it on the optimizer)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyper(group, _RANGES)

    @staticmethod
    def _gamma(group) -> float:
        return group["gamma"] * (1 + group["gamma_growth"]) ** group["step_count"]  # γ_t = γ_0 (1 + γ_1)^t

    @property
    def current_gamma(self) -> float:
        """γ_t that the coming step uses (first param group)."""
        return self._gamma(self.param_groups[0])

    @torch.no_grad()
    def step(self, closure):
        """One outer step; calls ``closure`` L times and returns the mean of its losses."""
        if closure is None:
            raise ValueError("EntropySGD.step needs a closure that returns the loss of a fresh minibatch")
        anchors = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]  # w
        means = [[w.clone() for w in ws] for ws in anchors]                                # μ
        moved = [set() for _ in self.param_groups]  # indices of the parameters that had a gradient
        total = 0.0
        for _ in range(self.langevin_steps):
            with torch.enable_grad():
                loss = closure()
            total = total + (loss.detach() if torch.is_tensor(loss) else loss)
            for group, ws, mus, m in zip(self.param_groups, anchors, means, moved):
                m.update(self._langevin_step(group, ws, mus))
        for group, ws, mus, m in zip(self.param_groups, anchors, means, moved):
            self._outer_step(group, ws, mus, sorted(m))
        return total / self.langevin_steps

    def _langevin_step(self, group, ws, mus) -> list[int]:
        """One inner step of the parameters that have a gradient; returns their indices."""
        ps = group["params"]
        moving = [i for i, p in enumerate(ps) if p.grad is not None]
        if moving:
            params, anchors = [ps[i] for i in moving], [ws[i] for i in moving]
            lr, gamma = group["langevin_lr"], self._gamma(group)
            if group["weight_decay"]:
                dw = torch._foreach_sub(params, anchors)
                torch._foreach_mul_(dw, gamma)                          # γ (w' − w)
                torch._foreach_add_(dw, [p.grad for p in params])       # + ∇L(w'; Ξ)
                torch._foreach_add_(dw, params, alpha=group["weight_decay"])
                torch._foreach_add_(params, dw, alpha=-lr)              # w' ← w' − η' dw'
            else:  # the same update in two passes over the weights instead of four
                torch._foreach_lerp_(params, anchors, lr * gamma)       # w' ← w' − η' γ (w' − w)
                torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)  # − η' ∇L(w'; Ξ)
            if group["noise"]:
                xi = [torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)
                      for p in params]
                torch._foreach_add_(params, xi, alpha=math.sqrt(group["langevin_lr"]) * group["noise"])
        torch._foreach_lerp_(mus, ps, 1 - group["alpha"])               # μ ← α μ + (1 − α) w'
        return moving

    def _outer_step(self, group, ws, mus, moved: list[int]) -> None:
        """w ← w − η (w − μ) for the parameters that moved; the others (frozen) keep w and their momentum."""
        ps = group["params"]
        if moved:
            w, mu = [ws[i] for i in moved], [mus[i] for i in moved]
            d = torch._foreach_sub(w, mu)                               # w − μ ≈ ∇L_LE(w) / γ
            if group["momentum"]:
                d = momentum_direction(self, [ps[i] for i in moved], d, group["momentum"], group["nesterov"])
            torch._foreach_add_(w, d, alpha=-group["lr"])               # w ← w − η d
        torch._foreach_copy_(ps, ws)
        group["step_count"] += 1
