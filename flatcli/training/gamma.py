"""The coupling γ of the entropic algorithms (eSGD and rSGD) over a run: a schedule from γ_0 to γ_final, and the
"balanced" start γ_0 = auto.

With t the optimizer steps already completed (t = 0 at the first step, as in MATH.md §3-4), T the run's total
steps and s = t / (T − 1) (0 at the first step, 1 at the last; s = 0 when T = 1, and s stays 1 past the end):

    constant   γ_t = γ_0
    exp        γ_t = γ_0 (1 + γ_1)^t                       with a rate γ_1 (the seed's scoping), or
               γ_t = γ_0 (γ_final / γ_0)^s                 geometric from γ_0 to γ_final, whatever T is
    linear     γ_t = γ_0 + (γ_final − γ_0) s
    cosine     γ_t = γ_final + (γ_0 − γ_final) (1 + cos π s) / 2

γ_final is given as a value (``gamma_final``) or as a multiple of γ_0 (``gamma_ratio``: γ_final = ratio · γ_0,
the form that fits γ_0 = auto).

The geometric ``exp`` over the whole run from a balanced γ_0 up by about 10⁴ is how Pittorino et al.'s own code
(SacredDNN) trains rSGD: the replicas collapse onto their center by the last epoch.

Balanced start (``gamma="auto"``): the γ_0 at which the coupling term of the objective equals the training loss
at the start, with L the mean loss over the whole training split (eval mode) of the initial weights:

    rSGD   γ_0 = Σ_a L(w^a) / Σ_a ½ |w^a − w̄|²      (the objective is Σ_a L(w^a) + γ Σ_a ½ |w^a − w̄|²,
                                                     MATH.md §4; replicas start from independent initializations)
    eSGD   γ_0 = L(w) / ½ |w|²                       (w' starts at w, so the literal coupling ½ |w' − w|² is 0;
                                                     |w|² is the scale the coupling acts over — for zero-mean
                                                     initializations it is y/(y − 1) times rSGD's E|w^a − w̄|²)
"""
import math
from dataclasses import dataclass

from flatcli.errors import FlatcliError

GAMMA_SCHEDULES = ("constant", "exp", "linear", "cosine")


@dataclass
class GammaSchedule:
    """γ_t for t = 0, 1, ... of a run of ``total`` steps (see the module docstring). The end point is ``final``
    (γ_final) or ``ratio`` · γ_0 (for a γ_0 only known at the start, "auto"); neither: the rate form of ``exp``
    with ``rate`` = γ_1, or ``constant``."""
    gamma0: float
    kind: str = "constant"
    final: float | None = None
    ratio: float | None = None
    rate: float = 0.0
    total: int = 1

    @property
    def end(self) -> float | None:
        """γ_final: ``final``, or ``ratio`` · γ_0, or None (no end point)."""
        return self.final if self.final is not None else None if self.ratio is None else self.ratio * self.gamma0

    def __call__(self, t: int) -> float:
        end = self.end
        if self.kind == "constant" or (self.kind == "exp" and end is None):
            return self.gamma0 * (1 + self.rate) ** t if self.kind == "exp" else self.gamma0  # γ_0 (1 + γ_1)^t
        if t <= 0:
            return self.gamma0
        if t >= self.total - 1:
            return end                                                     # exactly γ_final at the last step
        s = t / (self.total - 1)
        if self.kind == "exp":
            return self.gamma0 * (end / self.gamma0) ** s
        if self.kind == "linear":
            return self.gamma0 + (end - self.gamma0) * s
        return end + (self.gamma0 - end) * 0.5 * (1 + math.cos(math.pi * s))  # cosine

    def state_dict(self) -> dict:
        """What a resume needs beyond the config: the resolved γ_0 and the horizon T of the original run (a
        resumed run with a longer budget keeps γ_final after the original last step)."""
        return {"gamma0": self.gamma0, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.gamma0, self.total = float(state["gamma0"]), int(state["total"])


def schedule_of(cfg) -> GammaSchedule:
    """The γ schedule a validated config describes (horizon 1 until the trainer sets it)."""
    gamma0 = 0.0 if cfg.gamma == "auto" else float(cfg.gamma)
    return GammaSchedule(gamma0, cfg.gamma_schedule, cfg.gamma_final, cfg.gamma_ratio, cfg.gamma_growth)


def balanced(loss: float, half_sq: float, what: str) -> float:
    """loss / half_sq, or a FlatcliError when the coupling term is 0 or the ratio is not a usable number."""
    gamma = loss / half_sq if half_sq > 0 else math.inf
    if not math.isfinite(gamma) or gamma <= 0:
        raise FlatcliError(f"gamma='auto' cannot balance a loss of {loss:g} against {what} = {half_sq:g}",
                           "give --gamma a number (replicas from one --init checkpoint start at distance 0)")
    return gamma
