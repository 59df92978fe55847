"""One forward pass over the data for K nets at once: loss and error sums kept on the device, no host sync."""
import itertools

import torch
import torch.nn as nn

from flatcli.errors import FlatcliError
from flatcli.losses import batch_sums, per_example_error, per_example_loss, tensor_batches


def _is_tensor_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


class DataSource:
    """Batches of (x, y) on ``device``, iterable as many times as needed.

    A tensor pair is moved to the device once and cut into views; a re-iterable (a DataLoader, a list) is
    iterated again on each pass, each batch moved as it comes; a one-shot iterator is stored on the device.
    """

    def __init__(self, data, batch_size: int, device: torch.device):
        self.device, self.iterable, self.batches = device, None, None
        if _is_tensor_pair(data):
            x, y = data
            if len(x) != len(y):
                raise FlatcliError(f"{len(x)} inputs but {len(y)} targets", "pass x and y of the same length")
            self.batches = list(tensor_batches(x.to(device), y.to(device), batch_size))
            return
        try:
            it = iter(data)
        except TypeError:
            raise FlatcliError(f"cannot read data of type {type(data).__name__}",
                               "pass an (x, y) tensor pair or an iterable of (x, y) batches") from None
        if it is data:  # one pass only: keep it
            self.batches = [self._move(b) for b in it]
        else:
            self.iterable = data

    def _move(self, batch):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __iter__(self):
        if self.batches is not None:
            return iter(self.batches)
        return map(self._move, self.iterable)


def batch_list(data, batch_size: int, device: torch.device, limit: int) -> list[torch.Tensor]:
    """The inputs x of the first ``limit`` batches, on the device (for BatchNorm re-estimation)."""
    source = data if isinstance(data, DataSource) else DataSource(data, batch_size, device)
    xs = [x for x, _ in itertools.islice(source, limit)]
    if not xs:
        raise FlatcliError("no batches to re-estimate BatchNorm statistics on", "pass bn_data with examples")
    return xs


def draw_sums(forward, batches, loss: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """(Σ_examples loss, Σ_examples error) for each of K nets, shape (K, 2), and the number of examples n.

    ``forward(x)`` returns outputs of shape (K, B, C). Batch sums are float32, their total float64 (not on MPS).
    """
    losses, errors, n = [], [], 0
    for x, y in batches:
        out = forward(x).float()  # (K, B, C); float32 even under bfloat16 autocast
        k, b = out.shape[:2]
        if k == 1:  # the common case, with no extra work per batch
            l, e = batch_sums(out[0], y, loss)  # 0-d, 0-d
        else:
            out, yk = out.flatten(0, 1), y.expand(k, *y.shape).flatten(0, 1)  # (K·B, C), (K·B, ...)
            l = per_example_loss(out, yk, loss).view(k, b).sum(1)  # (K,)
            e = per_example_error(out, yk).view(k, b).sum(1)
        losses.append(l)
        errors.append(e)
        n += b
    if not losses:
        return torch.zeros(1, 2, device=device), 0
    total = torch.float32 if device.type == "mps" else torch.float64
    sums = [torch.stack(parts).to(total).sum(0) for parts in (losses, errors)]
    return torch.stack(sums, -1).view(-1, 2), n


def vmap_forward(model: nn.Module, params: dict[str, torch.Tensor]):
    """x ↦ outputs of K nets, (K, B, C), from stacked parameters {name: (K, *shape)} via torch.func."""
    buffers = dict(model.named_buffers())

    def one(p, x):
        return torch.func.functional_call(model, (p, buffers), (x,))

    batched = torch.func.vmap(one, in_dims=(0, None))
    return lambda x: batched(params, x)


def vmap_works(model: nn.Module, source: DataSource) -> bool:
    """Whether vmap can run the model: a trial on two examples of the first batch, two copies of w."""
    try:
        x, _ = next(iter(source))
        params = {name: torch.stack([p, p]) for name, p in model.named_parameters()}
        out = vmap_forward(model, params)(x[:2])
        return out.dim() >= 2 and out.shape[0] == 2
    except Exception:  # any failure inside vmap means: run one draw at a time
        return False



def perturbation_setup(model: nn.Module, data, batch_size: int, bn: str, bn_batches: int, bn_data=None):
    """What every estimator that perturbs the weights starts with: the model checked (it has parameters, all
    finite), the data as re-iterable batches on its device, the state to restore and the perturbation, and, with
    ``bn="recompute"``, the BatchNorm layers and the inputs to re-estimate them on.

    Returns (device, source, state, pert, bns, bn_x).
    """
    from flatcli.measure import _perturb
    from flatcli.measure._guard import check_finite_parameters
    params = list(model.parameters())
    if not params:
        raise FlatcliError("the model has no parameters to perturb", "pass a model with weights")
    check_finite_parameters(model)
    device = params[0].device
    source = DataSource(data, batch_size, device)
    state, pert = _perturb.ModelState(model), _perturb.Perturbation(model)
    bns = _perturb.batchnorms(model) if bn == "recompute" else []
    bn_x = batch_list(source if bn_data is None else bn_data, batch_size, device, bn_batches) if bns else []
    return device, source, state, pert, bns, bn_x
