"""Every training hyper-parameter in one place, with units, defaults and validation."""
import math
from dataclasses import asdict, dataclass, field, fields

from flatcli.errors import FlatcliError
from flatcli.optim import entropy_sgd as esgd_defaults
from flatcli.optim import replicated_sgd as rsgd_defaults
from flatcli.losses import check_loss

ALGOS = ("sgd", "esgd", "rsgd")
SCHEDULES = ("constant", "cosine", "step")
# eSGD's outer step w ← w − η (w − μ) moves w to μ at η = 1; the inner Langevin rate η' plays SGD's part.
DEFAULT_LR = {"sgd": 0.1, "esgd": esgd_defaults.DEFAULT_LR, "rsgd": rsgd_defaults.DEFAULT_LR}


@dataclass
class TrainConfig:
    algo: str = "sgd"
    epochs: int = 10                # budget: an epoch is n/B minibatch gradients per model (replica)
    steps: int | None = None        # stop after this many optimizer steps (outer steps for eSGD)
    batch_size: int = 64            # examples per minibatch
    lr: float | None = None         # SGD lr; eSGD outer lr η; rSGD lr η. None: DEFAULT_LR[algo]
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"   # constant | cosine (to 0 over the run) | step (× lr_decay at each milestone)
    milestones: list[int] = field(default_factory=list)  # epochs at which the step schedule decays
    lr_decay: float = 0.1
    seed: int = 0
    loss: str = "cross-entropy"
    augment: bool = True            # random crop + flip, for image data only
    amp: bool = False               # bf16 autocast where the device supports it
    # Entropy-SGD (MATH.md §3)
    langevin_steps: int = esgd_defaults.DEFAULT_LANGEVIN_STEPS  # L: minibatch gradients per outer step
    langevin_lr: float = esgd_defaults.DEFAULT_LANGEVIN_LR        # η'
    noise: float = esgd_defaults.DEFAULT_NOISE                    # ε: the Langevin step adds sqrt(η') ε ξ
    alpha: float = esgd_defaults.DEFAULT_ALPHA                    # α: averaging of μ
    gamma: float = rsgd_defaults.DEFAULT_COUPLING                 # γ_0: coupling (eSGD and rSGD)
    gamma_growth: float = 0.0       # γ_1: scoping γ_t = γ_0 (1 + γ_1)^t, t in optimizer steps
    # replicated SGD (MATH.md §4)
    replicas: int = 3               # y
    coupling_every: int = rsgd_defaults.DEFAULT_COUPLING_EVERY  # K

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "TrainConfig":
        def bad(name, value, fix):
            raise FlatcliError(f"--{name.replace('_', '-')} {value!r} is invalid", fix)

        if self.algo not in ALGOS:
            bad("algo", self.algo, f"use one of: {', '.join(ALGOS)}")
        if self.lr_schedule not in SCHEDULES:
            bad("lr_schedule", self.lr_schedule, f"use one of: {', '.join(SCHEDULES)}")
        check_loss(self.loss)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.algo]
        for name in ("epochs", "batch_size", "langevin_steps", "coupling_every"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "use a positive integer")
        if self.steps is not None and self.steps < 1:
            bad("steps", self.steps, "use a positive integer")
        if self.replicas < 2:
            bad("replicas", self.replicas, "rSGD needs at least 2 replicas")
        for name in ("lr", "langevin_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                bad(name, value, "use a finite positive learning rate")
        for name in ("momentum", "weight_decay", "noise", "gamma", "gamma_growth", "lr_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                bad(name, value, "use a finite value >= 0")
        if not 0 <= self.alpha < 1:
            bad("alpha", self.alpha, "use a value in [0, 1)")
        if self.nesterov and self.momentum <= 0:
            bad("nesterov", self.nesterov, "Nesterov needs --momentum > 0")
        if any(m < 1 for m in self.milestones):
            bad("milestones", self.milestones, "use positive epoch numbers, e.g. 30,60")
        return self
