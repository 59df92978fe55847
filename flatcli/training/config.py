"""Every training hyper-parameter in one place, with units, defaults and validation."""
from dataclasses import asdict, dataclass, field, fields

from flatcli.choices import check_loss
from flatcli.errors import FlatcliError
from flatcli.checks import FLOAT32_MAX, check_float, check_seed
from flatcli.optim import defaults as D
from flatcli.training.algorithms import REGISTRY
from flatcli.training.gamma import GAMMA_SCHEDULES

ALGOS = tuple(REGISTRY)

SCHEDULES = ("constant", "cosine", "step")
# eSGD's outer step w ← w − η (w − μ) moves w to μ at η = 1; the inner Langevin rate η' plays SGD's part.
DEFAULT_LR = {"sgd": 0.1, "esgd": D.ESGD_LR, "rsgd": D.RSGD_LR}  # others: 0.1


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
    langevin_steps: int = D.ESGD_LANGEVIN_STEPS  # L: minibatch gradients per outer step
    langevin_lr: float = D.ESGD_LANGEVIN_LR        # η'
    noise: float = D.ESGD_NOISE                    # ε: the Langevin step adds sqrt(η') ε ξ
    alpha: float = D.ESGD_ALPHA                    # α: averaging of μ
    gamma: float | str = D.RSGD_COUPLING           # γ_0: coupling (eSGD and rSGD), or "auto": balanced start
    gamma_growth: float = 0.0       # γ_1: scoping γ_t = γ_0 (1 + γ_1)^t, t in optimizer steps (schedule exp)
    gamma_schedule: str | None = None  # constant | exp | linear | cosine (training/gamma.py); None: exp if
                                       # gamma_growth > 0, else constant (so older configs read as they ran)
    gamma_final: float | None = None   # γ at the last step of exp (geometric), linear and cosine, or
    gamma_ratio: float | None = None   # ... as a multiple of γ_0: γ_final = gamma_ratio · γ_0
    gamma_auto: bool = False        # set when γ_0 was "auto": gamma then holds the balanced value it resolved to
    # replicated SGD (MATH.md §4)
    replicas: int = 3               # y
    coupling_every: int = D.RSGD_COUPLING_EVERY  # K

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "TrainConfig":
        """Every value checked (numbers that reach float32 tensors must fit in float32), or a FlatcliError
        naming it as ``name=value``; a missing lr takes the algorithm's default."""
        def bad(name, value, fix):
            raise FlatcliError(f"{name}={value!r} is invalid", fix)

        if self.algo not in REGISTRY:
            bad("algo", self.algo, f"use one of: {', '.join(REGISTRY)}")
        if self.lr_schedule not in SCHEDULES:
            bad("lr_schedule", self.lr_schedule, f"use one of: {', '.join(SCHEDULES)}")
        check_loss(self.loss)
        check_seed("seed", self.seed)
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.algo, 0.1)
        for name in ("epochs", "batch_size", "langevin_steps", "coupling_every", "replicas") + \
                (("steps",) if self.steps is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if name == "replicas" else 1) \
                    or value > 2 ** 62:
                bad(name, value, "rSGD needs at least 2 replicas" if name == "replicas" else "use a positive integer")
        for name in ("lr", "langevin_lr"):
            check_float(name, getattr(self, name))
        for name in ("momentum", "weight_decay", "noise", "gamma_growth", "lr_decay"):
            check_float(name, getattr(self, name), strict=False)
        self._validate_gamma(bad)
        check_float("alpha", self.alpha, strict=False, high=1.0)
        if self.alpha >= 1:
            bad("alpha", self.alpha, "use a value in [0, 1)")
        if self.nesterov and self.momentum <= 0:
            bad("nesterov", self.nesterov, "Nesterov needs --momentum > 0")
        if any(not isinstance(m, int) or m < 1 for m in self.milestones):
            bad("milestones", self.milestones, "use positive epoch numbers, e.g. 30,60")
        return self

    def _validate_gamma(self, bad) -> None:
        if self.gamma != "auto":
            check_float("gamma", self.gamma, strict=False)
        if self.gamma_schedule is None:
            self.gamma_schedule = "exp" if self.gamma_growth > 0 else "constant"
        kind = self.gamma_schedule
        if kind not in GAMMA_SCHEDULES:
            bad("gamma_schedule", kind, f"use one of: {', '.join(GAMMA_SCHEDULES)}")
        ends = [name for name in ("gamma_final", "gamma_ratio") if getattr(self, name) is not None]
        for name in ends:
            check_float(name, getattr(self, name), strict=False)
        if len(ends) == 2:
            bad("gamma_ratio", self.gamma_ratio, "give the end of the γ schedule once: --gamma-final or --gamma-ratio")
        if ends and kind == "constant":
            bad(ends[0], getattr(self, ends[0]), "an end value of γ needs --gamma-schedule exp, linear or cosine")
        if self.gamma_growth > 0 and (kind != "exp" or ends):
            bad("gamma_growth", self.gamma_growth, "a growth rate is the exp schedule without an end value: "
                "give --gamma-growth or --gamma-final/--gamma-ratio")
        if kind in ("linear", "cosine") and not ends:
            bad("gamma_final", None, f"the {kind} schedule runs to an end value: give --gamma-final or --gamma-ratio")
        if kind == "exp" and ends and (getattr(self, ends[0]) <= 0 or self.gamma == 0):
            bad(ends[0], getattr(self, ends[0]), "the geometric exp schedule needs γ_0 > 0 and an end value > 0")
