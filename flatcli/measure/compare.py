"""Which flatness measure tracks generalization on these checkpoints? (MATH.md §6, rank agreement)

Each checkpoint is measured with each named measure at one headline setting, next to its train and test
error and the generalization gap (test − train error); then each measure is rank-correlated over the
checkpoints with the test error and with the gap (Kendall τ, Spearman ρ, with n and p), and, when
hyper-parameters are given and some vary, Jiang et al.'s granulated Ψ over them (``rank``).

The headline values, each computed by the measure's own estimator with its own defaults unless set here:

    local-energy    δε at σ (multiplicative noise, ``energy_samples`` draws)           higher = sharper
    sharpness       worst-case adaptive l2 sharpness at ρ (Auto-PGD, ``steps``)         higher = sharper
    pac-bayes       1/σ*² (magnitude-aware, ``target``, ``pac_samples`` draws)          higher = sharper
    hessian         λ_max of the Hessian of the loss (``flatcli.measure.hessian``)      higher = sharper
    local-entropy   s(γ), normalized local entropy (opt-in: slow)                       higher = FLATTER

So a measure that predicts generalization has τ > 0 with the test error (τ < 0 for local entropy).
"""
import importlib.util
import math
from dataclasses import asdict, dataclass

import torch.nn as nn

from flatcli.checks import check_float, check_positive_int, check_seed
from flatcli.errors import FlatcliError
from flatcli.losses import evaluate, tensor_batches
from flatcli.measure import rank

MEASURES = ("local-energy", "sharpness", "pac-bayes", "hessian", "local-entropy")
DEFAULT_MEASURES = ("local-energy", "sharpness", "pac-bayes", "hessian")
COLUMN = {m: m.replace("-", "_") for m in MEASURES}  # the CSV column of each measure
TARGETS = ("test_error", "gap")


def hessian_available() -> bool:
    return importlib.util.find_spec("flatcli.measure.hessian") is not None


def parse_measures(text: str | None) -> tuple[tuple[str, ...], list[str]]:
    """``"sharpness,pac-bayes"`` → the measures and notes; None: the defaults (hessian only where installed)."""
    if text is None:
        if hessian_available():
            return DEFAULT_MEASURES, []
        return tuple(m for m in DEFAULT_MEASURES if m != "hessian"), [
            "hessian left out of the default measures: flatcli.measure.hessian is not installed"]
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    return check_measures(names), []


def check_measures(names) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise FlatcliError("measures=() names no measure", f"name some of: {', '.join(MEASURES)}")
    for name in names:
        if name not in MEASURES:
            raise FlatcliError(f"measures: {name!r} is not a measure", f"use some of: {', '.join(MEASURES)}")
    if "hessian" in names and not hessian_available():
        raise FlatcliError("measures: 'hessian' needs flatcli.measure.hessian, which this installation lacks",
                           "drop hessian from the measures, or install a flatcli that has it")
    return names


@dataclass(frozen=True)
class CompareSettings:
    """The headline setting of every measure; the others are each estimator's own defaults."""
    measures: tuple[str, ...] = ("local-energy", "sharpness", "pac-bayes")
    sigma: float = 0.1  # local energy: multiplicative noise level
    energy_samples: int = 50
    rho: float = 0.1  # sharpness: radius in units of |w|
    steps: int = 20
    target: float = 0.1  # pac-bayes: allowed error rise
    pac_samples: int = 20
    gamma: float = 10.0  # local entropy: coupling
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "measures", check_measures(self.measures))
        check_float("sigma", self.sigma)
        check_float("rho", self.rho)
        check_float("target", self.target, high=1.0)
        check_float("gamma", self.gamma)
        for name in ("energy_samples", "steps", "pac_samples", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_seed("seed", self.seed)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Subject:
    """One checkpoint: the model, the examples the measures use, the train and test examples for the errors,
    its loss, and (for Ψ) its hyper-parameters."""
    label: str
    model: nn.Module
    data: tuple  # (x, y) the measures run on
    train: tuple  # (x, y) for the train error
    test: tuple  # (x, y) for the test error
    loss: str = "cross-entropy"
    hyper: dict | None = None


@dataclass(frozen=True)
class CompareResult:
    rows: list[dict]  # one per checkpoint: checkpoint, train_error, test_error, gap, a column per measure
    correlations: list[dict]  # one per (measure, target)
    columns: list[str]  # the measure columns, in order
    hypers: list[str]  # the hyper-parameters that vary (Ψ is over these)
    details: list[dict]  # per checkpoint: every measure's own records
    settings: CompareSettings


def headline(name: str, model, data, loss: str, s: CompareSettings) -> tuple[float, list[dict]]:
    """One measure's headline value on one model, and that measure's own records."""
    if name == "local-energy":
        from flatcli.measure.local_energy import local_energy
        r = local_energy(model, data, [s.sigma], samples=s.energy_samples, loss=loss, batch_size=s.batch_size,
                         seed=s.seed)
        return r.points[0].delta_error, r.records()
    if name == "sharpness":
        from flatcli.measure.sharpness import sharpness
        r = sharpness(model, data, s.rho, steps=s.steps, loss=loss, batch_size=s.batch_size, seed=s.seed)
        return r.points[0].sharpness, r.records()
    if name == "pac-bayes":
        from flatcli.measure.pac_bayes import pac_bayes_sigma
        r = pac_bayes_sigma(model, data, target=s.target, samples=s.pac_samples, loss=loss,
                            batch_size=s.batch_size, seed=s.seed)
        return r.flatness, r.records()
    if name == "hessian":
        from flatcli.measure.hessian import hessian_spectrum  # another module's estimator, loaded when asked
        r = hessian_spectrum(model, data, top_k=1, bottom_k=0, trace=False, density=False, seed=s.seed, loss=loss)
        return float(r.eigenvalues[0]), r.records()
    from flatcli.measure.local_entropy import local_entropy
    r = local_entropy(model, data, [s.gamma], loss=loss, seed=s.seed)
    return r.rows[0].local_entropy, r.records()


def _error(model, data, loss, batch_size) -> float:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return evaluate(model, tensor_batches(*data, batch_size), loss)[1]
    finally:
        for m, mode in modes:
            m.training = mode


def compare(subjects, *, measures=("local-energy", "sharpness", "pac-bayes"), sigma: float = 0.1,
            energy_samples: int = 50, rho: float = 0.1, steps: int = 20, target: float = 0.1, pac_samples: int = 20,
            gamma: float = 10.0, batch_size: int = 1000, seed: int = 0, callback=None) -> CompareResult:
    """Measure every ``Subject`` with every measure and rank-correlate each measure with generalization.

    callback(increment, total): after each measure of each checkpoint, total = checkpoints × measures."""
    settings = CompareSettings(tuple(measures), sigma, energy_samples, rho, steps, target, pac_samples, gamma,
                               batch_size, seed)
    return measure(subjects, settings, callback=callback)


def measure(subjects, settings: CompareSettings, *, callback=None, count: int | None = None) -> CompareResult:
    """``compare`` with its options already validated. ``subjects`` may be an iterator (each subject is used
    once, in order) when ``count`` says how many it yields."""
    s = settings
    rank.require_scipy()  # before any work
    if count is None:
        subjects = list(subjects)
        count = len(subjects)
    if count < 2:
        raise FlatcliError(f"{count} checkpoint(s) to compare", "pass at least two (rank correlations need several; "
                                                                "five or more say something)")
    rows, details, hypers, total = [], [], [], count * len(s.measures)
    for subject in subjects:
        train = _error(subject.model, subject.train, subject.loss, s.batch_size)
        test = _error(subject.model, subject.test, subject.loss, s.batch_size)
        row, records = {"checkpoint": subject.label, "train_error": train, "test_error": test, "gap": test - train}, {}
        for name in s.measures:
            row[COLUMN[name]], records[name] = headline(name, subject.model, subject.data, subject.loss, s)
            if callback is not None:
                callback(1, total)
        rows.append(row)
        details.append({"checkpoint": subject.label, "hyper": subject.hyper, "measures": records})
        hypers.append(subject.hyper)
    varying = rank.varying(hypers) if all(h is not None for h in hypers) else []
    for row, h in zip(rows, hypers):
        row.update({k: _plain(h.get(k)) for k in varying})
    columns = [COLUMN[m] for m in s.measures]
    return CompareResult(rows, correlations(rows, columns, hypers if varying else None, varying), columns, varying,
                         details, s)


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def correlations(rows: list[dict], columns: list[str], hypers=None, names=()) -> list[dict]:
    """Kendall τ, Spearman ρ (with p and n) and Ψ of each measure column against the test error and the gap.

    ``psi_per_hyper``: ψ_i of each hyper-parameter that has a group of checkpoints differing in it alone."""
    out = []
    for col in columns:
        values = [row[col] for row in rows]
        for against in TARGETS:
            target = [row[against] for row in rows]
            t, r = rank.kendall(values, target), rank.spearman(values, target)
            g = rank.granulated_kendall(values, target, hypers, names) if hypers else None
            out.append({"measure": col, "against": against, "kendall_tau": t.statistic, "kendall_p": t.pvalue,
                        "spearman_rho": r.statistic, "spearman_p": r.pvalue, "n": t.n,
                        "psi": g.psi if g else math.nan, "psi_per_hyper": g.per_hyper if g else {}})
    return out
