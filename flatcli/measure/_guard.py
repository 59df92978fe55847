"""Checks every estimator makes before measuring: a broken network is refused, never reported flat."""
import math

import torch

from flatcli.errors import FlatcliError

BROKEN_FIX = "the checkpoint is broken (diverged training?): measure an earlier checkpoint or retrain"


def check_finite_parameters(model: torch.nn.Module) -> None:
    """Every parameter and floating buffer holds finite numbers; else a FlatcliError naming the first bad one."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() or t.is_complex():
                bad = int((~torch.isfinite(t.detach())).sum())
                if bad:
                    raise FlatcliError(f"{kind} {name!r} holds {bad} non-finite value(s) (NaN or inf)", BROKEN_FIX)


def check_finite_value(what: str, value: float) -> None:
    """The unperturbed loss (or error) is finite; weights of absurd size give inf or NaN here."""
    if not math.isfinite(value):
        raise FlatcliError(f"the unperturbed {what} is {value} (non-finite): nothing can be measured around it",
                           BROKEN_FIX)
