"""Sharing an estimator's work among processes: an ambient *team*, set by the caller, read by the estimators.

An estimator splits its work into independent units (noise draws, chain passes, probe vectors, data
chunks), computes the units ``team.mine(n)`` and reassembles every process's results with
``team.gather_units``. Outside a team (the default, and every notebook call) the team is one process, and
all of this reduces to a plain loop. The measurement pipeline of the CLI joins a torchrun job and runs the
estimators inside ``with sharing(team): ...``; the estimators' signatures carry no distribution plumbing.

    from flatcli import parallel
    team = parallel.current()
    mine = [compute(k) for k in team.mine(n)]         # units k ≡ rank (mod world)
    every = team.gather_units(mine, n)                # all n results, in unit order, on every process

A unit must be computed the same way wherever it runs (its random numbers drawn from (seed, unit) alone), so
the reassembled result equals the one-process result bit for bit.
"""
import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Team:
    """This process's place among ``world`` processes sharing one measurement, and the collectives it needs.

    ``all_gather(obj)`` returns every process's (picklable) ``obj`` in rank order; ``all_reduce(tensors)``
    sums a list of tensors over the processes in place. Both are None for a team of one.
    """
    rank: int = 0
    world: int = 1
    all_gather: Callable[[object], list] | None = None
    all_reduce: Callable[[list[torch.Tensor]], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> range:
        """The units of ``n`` this process computes: k ≡ rank (mod world)."""
        return range(self.rank, n, self.world)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (``[obj]`` for a team of one)."""
        return [obj] if self.world == 1 else self.all_gather(obj)

    def gather_units(self, mine: Sequence, n: int) -> list:
        """The results of all ``n`` units in unit order, from each process's results for ``mine(n)``.

        Tensors travel through the CPU and come back on the device they left from.
        """
        mine = list(mine)
        if self.world == 1:
            return mine
        device = next((t.device for t in mine if isinstance(t, torch.Tensor)), None)
        parts = self.all_gather([t.cpu() if isinstance(t, torch.Tensor) else t for t in mine])
        out = [parts[k % self.world][k // self.world] for k in range(n)]
        return [t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in out]

    def sum_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum ``tensors`` over the processes, in place (nothing to do for a team of one)."""
        if self.world > 1 and tensors:
            self.all_reduce(tensors)
        return tensors

    def first(self, value):
        """Rank 0's ``value`` on every process (so that every process plans the same work)."""
        return value if self.world == 1 else self.gather(value)[0]


SOLO = Team()
_current: ContextVar[Team] = ContextVar("flatcli_team", default=SOLO)


def current() -> Team:
    """The team the running estimator belongs to (``SOLO`` unless a caller set one with ``sharing``)."""
    return _current.get()


@contextlib.contextmanager
def sharing(team: Team):
    """Run the estimators called inside the block as members of ``team``."""
    token = _current.set(team)
    try:
        yield team
    finally:
        _current.reset(token)
