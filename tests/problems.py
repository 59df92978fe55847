"""Small problems with known answers, shared by the estimator tests."""
import torch
from torch import nn


def noisy_linear_classifier(d: int, label_noise: float, n: int = 400):
    """A two-class linear classifier that makes some mistakes on Gaussian data labelled by a noisy teacher;
    weights of mixed sizes. Returns (model (float64), x (n, d), y (n,))."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(d, generator=g, dtype=torch.float64)
    y = (x @ teacher + label_noise * torch.randn(n, generator=g, dtype=torch.float64) > 0).long()
    model = nn.Linear(d, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.stack([-0.4 * teacher, 0.6 * teacher]) + 0.2 * torch.randn(2, d, generator=g,
                                                                                           dtype=torch.float64))
        model.bias.copy_(torch.tensor([0.3, -0.2]))
    return model, x, y
