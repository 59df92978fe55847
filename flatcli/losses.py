"""Training loss L and 0-1 error ε of a batch, and their means over a data set (MATH.md, notation).

Two losses: ``cross-entropy`` (integer class labels) and ``mse`` (float regression targets, or integer
labels compared as one-hot vectors). The 0-1 error is defined only for class labels; for regression
targets it is NaN.
"""
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from flatcli.choices import LOSS_NAMES, check_loss  # noqa: F401 (re-exported)
from flatcli.errors import FlatcliError


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each example, shape (B,). mse averages over the output dimensions, as torch's mse_loss does."""
    outputs = outputs.float()
    if loss == "cross-entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    if loss == "mse":
        if not targets.is_floating_point():  # class labels: regress onto one-hot vectors
            targets = F.one_hot(targets, outputs.shape[-1]).float()
        targets = targets.reshape(outputs.shape).float()
        return (outputs - targets).pow(2).reshape(len(outputs), -1).mean(1)
    raise FlatcliError(f"unknown loss {loss!r}", f"use one of: {', '.join(LOSS_NAMES)}")


def per_example_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-1 error of each example, shape (B,); NaN for float regression targets.

    An example whose outputs are not all finite counts as a mistake (argmax would pick a NaN's index).
    """
    if targets.is_floating_point():
        return torch.full((len(outputs),), float("nan"), device=outputs.device)
    return ((outputs.argmax(-1) != targets) | ~torch.isfinite(outputs).all(-1)).float()


def loss_sum(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Sum of the batch's losses, in one op for cross-entropy (the training hot path)."""
    if loss == "cross-entropy":
        return F.cross_entropy(outputs.float(), targets, reduction="sum")
    return per_example_loss(outputs, targets, loss).sum()


def error_count(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of misclassified examples (NaN for float regression targets), without a float copy per example."""
    if targets.is_floating_point():
        return torch.tensor(float("nan"), device=outputs.device)
    return (outputs.argmax(-1) != targets).sum()


def batch_sums(outputs, targets, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, sum of errors) over a batch, as 0-d tensors (no host sync)."""
    return per_example_loss(outputs, targets, loss).sum(), per_example_error(outputs, targets).sum()


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Batches:
    """Consecutive slices (views, no copies) of a tensor pair."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, loss: str = "cross-entropy",
             forward: Callable | None = None) -> tuple[float, float]:
    """Mean loss and mean 0-1 error of ``model`` over ``batches`` (in the model's current train/eval mode)."""
    forward = forward or model
    loss_sum = err_sum = 0.0
    n = 0
    for x, y in batches:
        l, e = batch_sums(forward(x), y, loss)
        loss_sum, err_sum, n = loss_sum + l, err_sum + e, n + len(x)
    if n == 0:
        raise FlatcliError("no examples to evaluate on", "check the data set and --max-examples")
    return float(loss_sum) / n, float(err_sum) / n
