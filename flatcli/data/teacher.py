"""The built-in synthetic set: Gaussian inputs labelled by a fixed random teacher network.

    x ~ N(0, I_d),   h = tanh(W1 x + b1),   y = argmax_c ( (W2 h − μ) / σ + b2 )_c

with ``W1 (H × d) ~ N(0, gain²/d)``, ``b1 ~ N(0, 0.25)``, ``W2 (K × H) ~ N(0, 1/H)``. ``μ`` and ``σ``
standardize each teacher output over a reference sample, and the class offsets ``b2`` are tuned on that
sample until every class wins about 1/K of the inputs, so the classes are balanced.

With the defaults (d = 30, K = 10, a teacher H = 128 units wide, 4000 training and 2000 test examples),
an MLP student of width 128 and depth 2 trained by SGD (lr 0.1, batch 64) for 10 epochs reaches about
10% training error and 18-21% test error (data seeds 0-4; chance is 90%) in about a second on two CPU
cores: learnable, but not trivially.

Everything is drawn on the CPU from generators seeded by the data seed s: the teacher from ``3s``, the
training inputs from ``3s + 1``, the test inputs from ``3s + 2``. So a smaller training set is a prefix
of a larger one, and the test set does not depend on the training size.
"""
import math

import numpy as np
import torch
from torch import Tensor

from flatcli.data.core import DataSpec, Split
from flatcli.io import check_allocation

INPUT_DIM = 30
NUM_CLASSES = 10
TEACHER_WIDTH = 128
GAIN = 0.5              # scale of the first layer's pre-activations: small = nearly linear teacher
N_TRAIN, N_TEST = 4000, 2000
REFERENCE_SIZE = 20000  # inputs on which the outputs are standardized and the classes balanced
BALANCE_STEPS, BALANCE_RATE = 100, 0.1


class Teacher:
    """A random 2-layer tanh network whose argmax output is the class of an input (see the module docstring)."""

    def __init__(self, generator: torch.Generator, dim: int = INPUT_DIM, classes: int = NUM_CLASSES,
                 width: int = TEACHER_WIDTH, gain: float = GAIN):
        g = generator
        self.w1 = torch.randn(width, dim, generator=g) * gain / math.sqrt(dim)
        self.b1 = torch.randn(width, generator=g) * 0.5
        self.w2 = torch.randn(classes, width, generator=g) / math.sqrt(width)
        raw = self.raw(torch.randn(REFERENCE_SIZE, dim, generator=g))      # (R, K)
        self.mean, self.std = raw.mean(0), raw.std(0)
        self.offset = balance((raw - self.mean) / self.std)

    def raw(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T

    def logits(self, x: Tensor) -> Tensor:
        """(W2 tanh(W1 x + b1) − μ) / σ + b2, shape (n, K)."""
        return (self.raw(x) - self.mean) / self.std + self.offset

    def labels(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)


def balance(z: Tensor, steps: int = BALANCE_STEPS, rate: float = BALANCE_RATE) -> Tensor:
    """Offsets b (K,) such that argmax(z + b) picks each of the K classes about equally often.

    Iterates b_c ← b_c − rate · (K · freq_c − 1): a class that wins too often is pushed down. Done in
    numpy: the many tiny steps run single-threaded there, far faster than torch's threaded small ops.
    """
    z_np = z.numpy()
    k = z_np.shape[1]
    b = np.zeros(k, dtype=z_np.dtype)
    for _ in range(steps):
        freq = np.bincount((z_np + b).argmax(1), minlength=k) / len(z_np)
        b -= (rate * (k * freq - 1)).astype(b.dtype)
    return torch.from_numpy(b)


def teacher_splits(spec: DataSpec) -> tuple[Split, Split]:
    """Train and test splits of the teacher set for ``spec.seed`` and sizes ``spec.n_train``/``spec.n_test``."""
    teacher = Teacher(torch.Generator().manual_seed(3 * spec.seed))
    splits, sizes = [], (spec.n_train or N_TRAIN, spec.n_test or N_TEST)
    check_allocation(4 * INPUT_DIM * sum(sizes), f"the teacher data of {sizes[0]} + {sizes[1]} examples",
                     "ask for fewer examples (n_train, n_test)")
    for stream, n in zip((1, 2), sizes):
        x = gaussian_rows(n, INPUT_DIM, torch.Generator().manual_seed(3 * spec.seed + stream))
        splits.append(Split(x, teacher.labels(x)))
    return splits[0], splits[1]


def gaussian_rows(n: int, dim: int, generator: torch.Generator, block: int = 256) -> Tensor:
    """n rows of N(0, I_dim), drawn in whole blocks of ``block`` rows so that fewer rows are a prefix of more
    (one ``randn`` call of another size would draw different numbers)."""
    blocks = [torch.randn(block, dim, generator=generator) for _ in range(-(-n // block))]
    return torch.cat(blocks)[:n]
