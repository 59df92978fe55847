"""Minibatch order and learning-rate schedules: pure functions of (seed, position), so a run can resume exactly."""
import math

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix-style), so that streams never share random numbers."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchStream:
    """Indices of minibatches, epoch after epoch; epoch e is a permutation drawn from (seed, stream, e).

    The last incomplete batch of an epoch is dropped, so every minibatch has the same size.
    The position (epoch, index) is the whole state: ``state()`` / ``load_state()`` resume exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int = 0):
        self.n, self.batch_size = n, min(batch_size, n)
        self.seed, self.stream = seed, stream
        self.epoch, self.index, self._perm = 0, 0, None

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def next(self) -> torch.Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, self.epoch))
            self._perm = torch.randperm(self.n, generator=g)
        start = self.index * self.batch_size
        self.index += 1
        return self._perm[start:start + self.batch_size]

    def state(self) -> list[int]:
        return [self.epoch, self.index]

    def load_state(self, state) -> None:
        self.epoch, self.index, self._perm = int(state[0]), int(state[1]), None


def scheduled_lr(base: float, schedule: str, progress: float, epoch: int, milestones, decay: float) -> float:
    """The learning rate at a point of the run: ``progress`` in [0, 1] of all steps, ``epoch`` counted from 0."""
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":
        return base * decay ** sum(epoch >= m for m in milestones)
    return base
