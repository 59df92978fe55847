"""Validation of estimator options, shared by every measure; messages name the keyword as ``name=value``.

The CLI translates ``name=`` into the flag that sets it (``--name``), so one message serves both callers.
Numbers that reach float32 tensors must be float32-representable, seeds must fit in 64 bits.
"""
import math
from typing import Sequence

from flatcli.errors import FlatcliError

FLOAT32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2 ** 63  # seeds of torch.Generator.manual_seed: non-negative and below 2^63 (int64)
COUNT_LIMIT = 2 ** 62  # counts (samples, steps, chains): beyond it a count overflows C sizes, never finishes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value, least: int = 1, most: int | None = None) -> int:
    if not _is_int(value) or value < least or value > (COUNT_LIMIT if most is None else most):
        span = f"in {least}..2^62" if most is None else f"in {least}..{most}"
        raise FlatcliError(f"{name}={value!r} is not an integer {span}", f"give {name} an integer {span}")
    return value


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def check_float(name: str, value, *, low: float = 0.0, strict: bool = True, high: float = FLOAT32_MAX) -> float:
    """A finite number in (low, high] (``strict``) or [low, high], float32-representable by default."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > low if strict else value >= low) and value <= high
    if not ok:
        if high != FLOAT32_MAX:
            need = f"a number in {'(' if strict else '['}{low:g}, {high:g}]"
        elif low == 0:
            need = f"a {'positive' if strict else 'non-negative'} number that float32 can hold (at most 3.4e38)"
        else:
            need = f"a number {'>' if strict else '>='} {low:g} that float32 can hold"
        raise FlatcliError(f"{name}={_show(value)} is not {need}", f"give {name}=VALUE with VALUE {need}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise FlatcliError(f"{name}={value!r} is not one of {', '.join(choices)}", f"use {name}={choices[0]!r}")
    return value


def check_seed(name: str, value) -> int:
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise FlatcliError(f"{name}={value!r} is not an integer in 0..2^63−1", f"give {name} a non-negative integer "
                                                                                 "below 9223372036854775808")
    return value


def check_sigmas(sigmas) -> list[float]:
    """Noise levels: at least one, each finite, >= 0 and float32-representable."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise FlatcliError(f"sigmas={sigmas!r} are not numbers", "give noise levels like 0,0.01,0.05") from None
    if not values:
        raise FlatcliError("sigmas=[] holds no noise level", "give at least one, e.g. 0,0.01,0.05")
    for s in values:
        if not (math.isfinite(s) and 0 <= s <= FLOAT32_MAX):
            raise FlatcliError(f"sigmas: {s} is not finite and >= 0 (float32)", "use noise levels like 0,0.01,0.05")
    return values
