"""The model registry: a ``ModelSpec`` names a network, ``build_model`` makes it for the data's shape.

Names (``MODEL_NAMES``), with what ``width`` and ``depth`` mean for each:

- ``linear``: flatten + one ``nn.Linear`` with bias. Ignores width, depth.
- ``mlp``: flatten, ``depth`` hidden ReLU layers of ``width`` units, linear head. Any input shape.
- ``lenet``: LeNet-5 (conv 20 → pool → conv 50 → pool → fc 500 → out), images of 16x16 or more. Ignores width, depth.
- ``convnet``: three conv-BN-ReLU-maxpool blocks of width/4, width/2, width channels (32/64/128 at the
  default width 128), global pool, linear; images of 8x8 or more. Ignores depth.
- ``resnet20``, ``resnet110``: He et al.'s CIFAR ResNets (16/32/64 channels, option-A shortcuts).
- ``resnet18``: the CIFAR-style ResNet-18 (64-128-256-512, option-B shortcuts). ResNets ignore width, depth.
- ``tv:NAME``: any torchvision classification model, untrained, with ``num_classes`` outputs; its first
  convolution is rebuilt for the images' channel count when that is not 3. Ignores width, depth.
- ``timm:NAME``, ``hf:FOLDER``: a timm model or a local Hugging Face image classifier, untrained (see ``hub``).
- ``committee:K``, ``committee:K:binary``: a committee machine of K (odd) sign units and a majority vote,
  continuous or ±1 weights, no biases, two logits (−s, +s) for a binary task (see ``flatcli.models.committee``).
  Ignores width, depth.
- ``module:function``: the user's own factory, imported from the current directory or PYTHONPATH and called
  with ``num_classes=`` when it accepts it. Ignores width, depth.

Image models take inputs of shape (C, H, W), any C. Weights get PyTorch's default initialization drawn from
the global RNG, so ``torch.manual_seed(s); build_model(...)`` is reproducible; or pass ``seed=`` to draw them
from a private stream that leaves the global RNG untouched.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.io import check_allocation
from flatcli.models import committee, external, hub, resnet, small

MODEL_NAMES = ("linear", "mlp", "lenet", "convnet", "resnet20", "resnet110", "resnet18")
IMAGE_MODELS = {"lenet": 16, "convnet": 8, "resnet20": 1, "resnet110": 1, "resnet18": 1}  # name → least H, W

__all__ = ["MODEL_NAMES", "ModelSpec", "build_model", "check_fits", "count_parameters"]


@dataclass
class ModelSpec:
    """Which network: a name from ``MODEL_NAMES``, ``tv:NAME`` or ``module:function``, and its size.

    ``width``: hidden units of ``mlp``; channels of the last block of ``convnet``. ``depth``: hidden layers
    of ``mlp``. Other models ignore both (see the module docstring).
    """
    name: str = "mlp"
    width: int = 128
    depth: int = 2

    def to_dict(self) -> dict:
        """JSON-safe ``{"name": str, "width": int, "depth": int}`` for checkpoint metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Inverse of ``to_dict``; missing keys take the defaults, unknown keys are ignored."""
        if not isinstance(d, dict):
            raise FlatcliError(f"model spec must be a mapping, got {type(d).__name__}",
                               "the checkpoint metadata is damaged; rebuild it or retrain")
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for key, value in values.items():
            wanted = str if key == "name" else int
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise FlatcliError(f"model spec field {key!r} must be {wanted.__name__}, got {value!r}",
                                   "the checkpoint metadata is damaged; rebuild it or retrain")
        return cls(**values)


def describe_names() -> str:
    """The valid model names, for error messages."""
    return ", ".join(MODEL_NAMES) + (", tv:NAME (a torchvision model), timm:NAME, hf:FOLDER (a local Hugging Face "
                                     "folder), committee:K[:binary] (a committee machine), module:function (your own factory)")


def image_shape(name: str, input_shape: tuple[int, ...], least: int) -> tuple[int, int, int]:
    """Check that ``input_shape`` is (C, H, W) with H, W ≥ ``least``, and return it."""
    if len(input_shape) != 3:
        kind = "flat vectors" if len(input_shape) == 1 else f"{len(input_shape)}-d inputs"
        raise FlatcliError(f"model {name!r} needs images of shape (C, H, W), but the data are {kind} "
                           f"of shape {tuple(input_shape)}",
                           "use linear or mlp for this data, or load the data as images")
    c, h, w = input_shape
    if h < least or w < least:
        raise FlatcliError(f"model {name!r} needs images of at least {least}x{least}, got {h}x{w}",
                           "use a model made for small inputs (mlp, convnet, resnet20) or larger images")
    return c, h, w


def check_spec(spec: ModelSpec, input_shape: tuple[int, ...], num_outputs: int) -> None:
    """User-fixable mistakes in the sizes: non-positive shape or outputs; width, depth where they are used."""
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise FlatcliError(f"input shape {tuple(input_shape)} has no entries or a non-positive one",
                           "check the data: each example must have at least one number")
    if num_outputs < 1:
        raise FlatcliError(f"number of outputs must be at least 1, got {num_outputs}", "check the data's labels")
    least_width = {"mlp": 1, "convnet": 4}.get(spec.name)
    if least_width is not None and spec.width < least_width:
        raise FlatcliError(f"{spec.name} width must be at least {least_width}, got {spec.width}",
                           "pass a larger --width")
    if spec.name == "mlp" and spec.depth < 0:
        raise FlatcliError(f"mlp depth must be at least 0, got {spec.depth}", "pass --depth 0 or more")
    check_allocation(4 * estimated_parameters(spec, input_shape, num_outputs),
                     f"model {spec.name} of width {spec.width} and depth {spec.depth}", "pass a smaller --width/--depth")


def estimated_parameters(spec: ModelSpec, input_shape: tuple[int, ...], num_outputs: int) -> int:
    """Parameters of the sized models (mlp, convnet) from their sizes alone, before any is allocated; 0 else."""
    w, inputs = spec.width, math.prod(input_shape)
    if spec.name == "mlp":
        return (inputs * w + (spec.depth - 1) * w * w + w * num_outputs) if spec.depth else inputs * num_outputs
    if spec.name == "convnet":
        c = input_shape[0] if len(input_shape) == 3 else 1
        return 9 * (c * w // 4 + (w // 4) * (w // 2) + (w // 2) * w) + w * num_outputs
    return 0


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_outputs: int,
                *, seed: int | None = None) -> nn.Module:
    """A freshly initialized network for examples of ``input_shape`` and ``num_outputs`` outputs.

    ``seed=None`` draws the weights from the global RNG (seed it first for reproducibility); an int draws
    them under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` so the global state is unchanged.
    Shape mistakes that can be seen without running the model raise FlatcliError here; ``check_fits``
    catches the rest with one dry forward.
    """
    input_shape = tuple(int(s) for s in input_shape)
    check_spec(spec, input_shape, num_outputs)
    if seed is None:
        return make(spec, input_shape, num_outputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(spec, input_shape, num_outputs)


def make(spec: ModelSpec, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Dispatch on ``spec.name``."""
    name = spec.name
    if name.startswith("tv:"):
        channels, _, _ = image_shape(name, input_shape, 1)
        return external.torchvision_model(name[3:], channels, num_outputs)
    if name.startswith(("timm:", "hf:")):
        channels, _, _ = image_shape(name, input_shape, 1)
        kind, _, target = name.partition(":")
        return (hub.timm_model if kind == "timm" else hub.hf_model)(target, channels, num_outputs)
    if name.startswith(committee.PREFIX):
        return committee.committee(name, input_shape, num_outputs)
    if ":" in name:
        return external.user_model(name, num_outputs)
    if name == "linear":
        return small.linear(input_shape, num_outputs)
    if name == "mlp":
        return small.mlp(input_shape, num_outputs, spec.width, spec.depth)
    if name not in IMAGE_MODELS:
        raise FlatcliError(f"unknown model {name!r}", f"use one of: {describe_names()}")
    c, h, w = image_shape(name, input_shape, IMAGE_MODELS[name])
    if name == "lenet":
        return small.LeNet(c, h, w, num_outputs)
    if name == "convnet":
        return small.ConvNet(c, num_outputs, spec.width)
    if name == "resnet18":
        return resnet.resnet18(c, num_outputs)
    return resnet.cifar_resnet(c, num_outputs, depth=int(name.removeprefix("resnet")))


def count_parameters(model: nn.Module) -> int:
    """N, the number of trainable numbers in ``model.parameters()``."""
    return sum(p.numel() for p in model.parameters())


def first_tensor(model: nn.Module) -> torch.Tensor | None:
    """The first parameter or buffer of ``model`` (its device and dtype stand for the model's), or None."""
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        return tensor
    return None


def check_fits(model: nn.Module, input_shape: tuple[int, ...], num_outputs: int, device=None,
               *, label: str | None = None) -> None:
    """One dry forward of a (2, *input_shape) batch of zeros, in eval mode, without gradients.

    Raises FlatcliError when the forward fails or its output is not of shape (2, num_outputs). Each
    submodule's train/eval mode is restored afterwards. ``device=None`` uses the model's own device.
    ``label`` names the model in messages (e.g. ``spec.name``); by default its class name.
    """
    label = label or type(model).__name__
    shape = tuple(int(s) for s in input_shape)
    ref = first_tensor(model)
    device = torch.device(device) if device is not None else (ref.device if ref is not None else None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.zeros((2, *shape), device=device, dtype=dtype)  # (2, *input_shape)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatcliError(f"model {label} cannot take inputs of shape {shape} ({reason})",
                           "use linear or mlp for flat vectors, an image model (lenet, convnet, resnet20, "
                           "resnet110, resnet18, tv:NAME) for (C, H, W) images, or change the data") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(out, torch.Tensor):
        raise FlatcliError(f"model {label} returns a {type(out).__name__}, not a tensor of logits",
                           "make its forward return one tensor of shape (batch, outputs)")
    if out.ndim == 2 and out.shape[0] == 2 and out.shape[1] < num_outputs:
        raise FlatcliError(f"the labels (or targets) need {num_outputs} outputs but model {label} has "
                           f"{out.shape[1]}: labels {out.shape[1]}..{num_outputs - 1} are out of range for it",
                           f"give the model {num_outputs} outputs (a factory can take num_classes)")
    if tuple(out.shape) != (2, num_outputs):
        raise FlatcliError(f"model {label} maps a batch of shape (2, *{shape}) to outputs of shape "
                           f"{tuple(out.shape)}, expected (2, {num_outputs})",
                           f"give the model {num_outputs} outputs (a factory can take num_classes)")
