"""Names the command line and the library check against, in one torch-free place."""
from flatcli.errors import FlatcliError

LOSS_NAMES = ("cross-entropy", "mse")


def check_loss(name) -> str:
    if name not in LOSS_NAMES:
        raise FlatcliError(f"loss={name!r} is not a known loss", f"use one of: {', '.join(LOSS_NAMES)}")
    return name
