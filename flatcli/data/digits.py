"""The built-in real set: 1 797 handwritten digits, 8×8 pixels with 17 grey levels (0..16), ten classes.

The images are the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and C. Kaynak, UCI
Machine Learning Repository, 1998, https://doi.org/10.24432/C50P49; licence CC BY 4.0), the copy that
scikit-learn bundles as ``load_digits``, shipped with flatcli as ``digits.csv.gz`` (54 kB: the label, then
the 64 pixels in row-major order, one image a row). So ``--data digits`` needs no download and no scikit-learn.

Split: a fixed stratified split of 1 297 training and 500 test images drawn from the data seed s. Each class c
(n_c images) gives ``t_c`` test images, ``t_c`` the largest-remainder apportionment of 500 by n_c / 1797
(49 to 51 per class, the same for every seed); which images those are is the first ``t_c`` of a permutation
of the class drawn from a generator seeded by ``s`` (classes in order 0..9). Both splits keep the file's order.

Normalization: ``x̂ = (x / 16 − 0.3053) / 0.3760``, the mean and standard deviation of all 1 797 images in
units of [0, 1] pixels (fixed constants, like torchvision's sets, so that the split does not change them).
"""
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatcli.data.core import DataSpec, Split

FILE = Path(__file__).with_name("digits.csv.gz")
N_IMAGES, N_TEST, NUM_CLASSES, SIDE, LEVELS = 1797, 500, 10, 8, 16
MEAN, STD = 0.3053, 0.3760  # of x / 16 over all 1797 images


def read_digits() -> tuple[Tensor, Tensor]:
    """All 1797 images as uint8 (n, 1, 8, 8) with values 0..16, and their int64 labels (n,), in file order."""
    with gzip.open(FILE, "rt", encoding="ascii") as f:
        rows = np.loadtxt(f, delimiter=",", comments="#", dtype=np.uint8)  # (n, 65)
    x = torch.from_numpy(rows[:, 1:].copy()).view(-1, 1, SIDE, SIDE)
    return x, torch.from_numpy(rows[:, 0].astype(np.int64))


def held_out_counts(y: Tensor, n_test: int = N_TEST) -> list[int]:
    """Test images per class: n_test apportioned by class size, largest remainder first (ties: lower class)."""
    counts = torch.bincount(y, minlength=NUM_CLASSES).tolist()
    quotas = [n_test * c / len(y) for c in counts]
    taken = [int(q) for q in quotas]
    by_remainder = sorted(range(NUM_CLASSES), key=lambda c: (-(quotas[c] - taken[c]), c))
    for c in by_remainder[:n_test - sum(taken)]:
        taken[c] += 1
    return taken


def split_indices(y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) indices, each sorted: per class, the first t_c of a seeded permutation go to test."""
    g = torch.Generator().manual_seed(seed)
    test = []
    for c, t in enumerate(held_out_counts(y)):
        members = torch.nonzero(y == c).flatten()
        test.append(members[torch.randperm(len(members), generator=g)[:t]])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def digits_splits(spec: DataSpec) -> tuple[Split, Split]:
    """Train (1297) and test (500) splits of the digits for the data seed ``spec.seed``."""
    x, y = read_digits()
    train, test = split_indices(y, spec.seed)
    mean, std = torch.tensor(MEAN).view(1, 1, 1), torch.tensor(STD).view(1, 1, 1)
    return (Split(x[train], y[train], mean, std, float(LEVELS)),
            Split(x[test], y[test], mean, std, float(LEVELS)))
