"""Rank agreement of a flatness measure with generalization over a set of checkpoints (MATH.md §6).

Kendall τ (τ-b, which is Kendall's 1938 τ when nothing is tied) and Spearman ρ with their two-sided p-values
come from ``scipy.stats``. Jiang et al.'s (2020, §3) granulated Kendall coefficient

    Ψ = (1/n) Σ_i ψ_i,   ψ_i = mean over the settings θ_{−i} of the other hyper-parameters of
                               τ(measure, target) over the checkpoints that share θ_{−i} (only θ_i varies)

with the mean over the n hyper-parameters that vary. A group of one checkpoint has no τ and is left out, as
is a group whose τ is undefined (all values tied); ``groups`` says how many groups each ψ_i averages.
Pairs where the measure or the target is NaN are left out everywhere (``n`` counts the pairs used).
"""
import json
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

from flatcli.errors import FlatcliError


@dataclass(frozen=True)
class Correlation:
    statistic: float  # τ or ρ; NaN when undefined (fewer than 2 pairs, or a constant column)
    pvalue: float
    n: int


@dataclass(frozen=True)
class Granulated:
    psi: float  # Ψ; NaN when no hyper-parameter has a group of two or more
    per_hyper: dict  # {name: ψ_i}
    groups: dict  # {name: number of groups averaged}


def require_scipy():
    """scipy.stats, or a FlatcliError saying how to install it (it is the optional ``stats`` extra)."""
    try:
        import scipy.stats
    except ImportError:
        raise FlatcliError("rank correlations need scipy, which is not installed",
                           "pip install 'flatcli[stats]' (or pip install scipy)") from None
    return scipy.stats


def _pairs(x: Sequence[float], y: Sequence[float]):
    if len(x) != len(y):
        raise FlatcliError(f"{len(x)} measure values but {len(y)} targets", "pass one of each per checkpoint")
    keep = [(float(a), float(b)) for a, b in zip(x, y) if not (math.isnan(float(a)) or math.isnan(float(b)))]
    return [a for a, _ in keep], [b for _, b in keep]


def _correlate(fn, x, y) -> Correlation:
    a, b = _pairs(x, y)
    if len(a) < 2:
        return Correlation(math.nan, math.nan, len(a))
    with warnings.catch_warnings():  # a constant column: scipy warns and returns NaN, which is the answer
        warnings.simplefilter("ignore")
        r = fn(a, b)
    return Correlation(float(r.statistic), float(r.pvalue), len(a))


def kendall(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Kendall τ-b of x against y and its two-sided p-value (``scipy.stats.kendalltau``)."""
    return _correlate(require_scipy().kendalltau, x, y)


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman ρ of x against y and its two-sided p-value (``scipy.stats.spearmanr``)."""
    return _correlate(require_scipy().spearmanr, x, y)


def varying(hypers: Sequence[dict], ignore: Sequence[str] = ("seed",)) -> list[str]:
    """The hyper-parameter names whose values are not all equal (a name missing from a dict counts as None)."""
    names = sorted({k for h in hypers for k in h} - set(ignore))
    return [k for k in names if len({_key(h.get(k)) for h in hypers}) > 1]


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def granulated_kendall(measure: Sequence[float], target: Sequence[float], hypers: Sequence[dict],
                       names: Sequence[str] | None = None) -> Granulated:
    """Ψ of ``measure`` against ``target`` over the hyper-parameters ``names`` (default: those that vary)."""
    if not len(measure) == len(target) == len(hypers):
        raise FlatcliError(f"{len(measure)} measure values, {len(target)} targets and {len(hypers)} hyper-parameter "
                           "sets", "pass one of each per checkpoint")
    names = list(varying(hypers) if names is None else names)
    per, counts = {}, {}
    for name in names:
        others = [k for k in names if k != name]
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(hypers):
            groups.setdefault(tuple(_key(h.get(k)) for k in others), []).append(i)
        taus = []
        for members in groups.values():
            if len({_key(hypers[i].get(name)) for i in members}) < 2:
                continue
            tau = kendall([measure[i] for i in members], [target[i] for i in members]).statistic
            if not math.isnan(tau):
                taus.append(tau)
        if taus:
            per[name], counts[name] = sum(taus) / len(taus), len(taus)
    psi = sum(per.values()) / len(per) if per else math.nan
    return Granulated(psi, per, counts)
