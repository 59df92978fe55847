"""The committee machine: a shallow network of K sign units and a majority vote (MATH.md §7).

    σ̂(W, x) = sign( Σ_k sign(w_k · x / √N) ),   W = (w_1 .. w_K) of shape (K, N), K odd, no biases

Specs: ``committee:K`` (continuous weights) and ``committee:K:binary`` (weights ±1). The one parameter is
``weight`` (K, N). The output is the vote s = ±1 as two logits (−s, +s), so class 1 ↔ +1 and the usual
cross-entropy and error plumbing apply to a binary task (``--classes A,B``).

Sign units have no gradient, so in train mode the network is a documented differentiable surrogate:

- each hidden field is made scale-free, h_k = w_k · x / |w_k| (continuous; the sign of w_k · x does not depend
  on |w_k|) or h_k = clip(w_k) · x / √N with clip(w) = min(1, max(−1, w)) (binary: a latent weight whose
  clipped value is used forward, with a straight-through gradient so that a latent weight beyond ±1 still
  learns and can come back);
- sign(h) becomes tanh(SHARPNESS · h), and the vote s = Σ_k tanh(SHARPNESS · h_k) (its sign is the majority
  when every unit saturates).

In eval mode the network is always the true sign network: binary weights are sign(w), s = sign(Σ_k sign(h_k)).
``flatcli train`` evaluates in eval mode, so its reported errors are the sign network's.
"""
import math

import torch
from torch import nn

from flatcli.errors import FlatcliError

PREFIX = "committee:"
SHARPNESS = 2.0  # slope of the tanh surrogate at 0, per unit of the scale-free field h


def parse_spec(name: str) -> tuple[int, bool]:
    """``committee:K`` → (K, False), ``committee:K:binary`` → (K, True); K must be a positive odd integer."""
    parts = name[len(PREFIX):].split(":")
    fix = "write committee:K or committee:K:binary with K odd, e.g. committee:3"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] != "binary") or not parts[0].isdigit():
        raise FlatcliError(f"model {name!r} is not a committee machine spec", fix)
    k = int(parts[0])
    if k < 1 or k % 2 == 0:
        raise FlatcliError(f"model {name!r}: the number of hidden units K={k} must be odd and positive "
                           "(a majority vote of an even committee can tie)", fix)
    return k, len(parts) == 2


class Committee(nn.Module):
    """K sign units over the flattened input and their majority vote, as two logits (−s, +s)."""

    def __init__(self, inputs: int, hidden: int, binary: bool = False):
        super().__init__()
        self.inputs, self.hidden, self.binary = inputs, hidden, binary
        init = torch.rand(hidden, inputs) * 2 - 1 if binary else torch.randn(hidden, inputs)
        self.weight = nn.Parameter(init)  # (K, N); binary: latent weights, sign(w) at evaluation

    def signed_weight(self) -> torch.Tensor:
        """The weights the sign network uses: w (continuous) or sign(w) (binary), shape (K, N)."""
        return torch.sign(self.weight) if self.binary else self.weight

    def forward(self, x):
        x = x.flatten(1)                                            # (B, N)
        if self.training:
            vote = torch.tanh(SHARPNESS * self.surrogate_fields(x)).sum(1)  # (B,)
        else:
            vote = torch.sign(torch.sign(x @ self.signed_weight().T).sum(1))  # (B,) in {−1, 0, +1}
        return torch.stack((-vote, vote), dim=1)                   # (B, 2)

    def surrogate_fields(self, x):
        """Scale-free hidden fields h (B, K) of the training surrogate (see the module docstring)."""
        w = self.weight
        if self.binary:
            clipped = w + (w.clamp(-1, 1) - w).detach()  # forward: clip(w); backward: identity
            return x @ clipped.T / math.sqrt(self.inputs)
        return x @ w.T / w.norm(dim=1).clamp_min(1e-12)


def committee(name: str, input_shape: tuple[int, ...], num_outputs: int) -> Committee:
    """The committee machine ``name`` names, for inputs of ``input_shape`` (flattened) and 2 classes."""
    k, binary = parse_spec(name)
    if num_outputs != 2:
        raise FlatcliError(f"model {name!r} is a binary classifier, but the data have {num_outputs} outputs",
                           "pick two classes with --classes A,B (e.g. --classes 0,1)")
    return Committee(math.prod(input_shape), k, binary)
