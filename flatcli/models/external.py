"""Networks defined outside flatcli: ``tv:NAME`` (torchvision) and ``module:function`` (the user's own code).

``module:function`` imports and runs the named factory: that executes the user's code, on purpose.
"""
import contextlib
import importlib
import inspect
import os
import sys

from torch import nn

from flatcli.errors import FlatcliError

# torchvision models whose default forward returns auxiliary outputs in train mode; flatcli wants one tensor.
TV_EXTRA_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def torchvision_names() -> list[str]:
    """The classification models torchvision can build (``torchvision.models.list_models``)."""
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_model(name: str, channels: int, num_outputs: int) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_outputs)``, no pretrained weights.

    When the images have ``channels`` ≠ 3, the first ``nn.Conv2d`` that reads 3 channels is replaced by one
    with the same settings reading ``channels``; it gets ``nn.Conv2d``'s default initialization (not the
    model's own scheme for that layer).
    """
    import torchvision
    names = torchvision_names()
    if name not in names:
        raise FlatcliError(f"torchvision has no classification model {name!r}",
                           f"use tv:NAME with one of: {', '.join(names)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_outputs,
                                         **TV_EXTRA_KWARGS.get(name, {}))
    if channels != 3:
        adapt_first_conv(model, channels, f"tv:{name}")
    return model


def adapt_first_conv(model: nn.Module, channels: int, label: str) -> None:
    """Swap the first 3-channel ``nn.Conv2d`` of ``model`` for an identical one reading ``channels`` channels."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                conv = nn.Conv2d(channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, bias=child.bias is not None,
                                 padding_mode=child.padding_mode)
                setattr(parent, child_name, conv)
                return
    raise FlatcliError(f"{label} has no 3-channel first convolution to adapt to {channels}-channel images",
                       "use a model made for this input, or convert the images to 3 channels")


@contextlib.contextmanager
def cwd_on_path():
    """Put the current directory first on ``sys.path`` while importing and calling a user factory."""
    cwd = os.getcwd()
    already = any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)
    if not already:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if not already and cwd in sys.path:
            sys.path.remove(cwd)


def import_factory(target: str):
    """Resolve ``"package.module:function"`` to the callable it names; FlatcliError saying why it cannot."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise FlatcliError(f"model {target!r} is not of the form module:function",
                           "name a factory as module:function, e.g. mynets:make_net for make_net in ./mynets.py")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise FlatcliError(f"cannot import module {module_name!r} for model {target!r} ({exc})",
                           "put the file in the current directory or add its folder to PYTHONPATH") from exc
    except Exception as exc:
        raise FlatcliError(f"importing module {module_name!r} for model {target!r} failed: "
                           f"{type(exc).__name__}: {exc}", f"fix the error in {module_name}") from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise FlatcliError(f"module {module_name!r} has no attribute {attr!r} (model {target!r})",
                               f"define {attr} in {getattr(module, '__file__', module_name)} or fix the name")
        factory = getattr(factory, part)
    if not callable(factory):
        raise FlatcliError(f"{target!r} is a {type(factory).__name__}, not a function",
                           "name a function or class that returns an nn.Module")
    return factory


def factory_kwargs(factory, target: str, num_outputs: int) -> dict:
    """``{"num_classes": num_outputs}`` if the factory's signature takes it (by name or **kwargs), else ``{}``."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    takes = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)
    required = [p.name for p in params if p.default is p.empty and p.name != "num_classes"
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise FlatcliError(f"model factory {target!r} requires arguments flatcli cannot give: {', '.join(required)}",
                           "give them defaults; flatcli passes only num_classes (when the factory accepts it)")
    return {"num_classes": num_outputs} if takes else {}


def user_model(target: str, num_outputs: int) -> nn.Module:
    """Import ``module:function`` (current directory or PYTHONPATH) and call it.

    Called as ``function(num_classes=num_outputs)`` when its signature accepts ``num_classes``, else as
    ``function()``. The result must be an ``nn.Module``.
    """
    with cwd_on_path():
        factory = import_factory(target)
        kwargs = factory_kwargs(factory, target, num_outputs)
        try:
            model = factory(**kwargs)
        except Exception as exc:
            call = f"{target}(num_classes={num_outputs})" if kwargs else f"{target}()"
            raise FlatcliError(f"calling {call} failed: {type(exc).__name__}: {exc}",
                               "fix the model factory") from exc
    if not isinstance(model, nn.Module):
        raise FlatcliError(f"model factory {target!r} returned a {type(model).__name__}, not a torch.nn.Module",
                           "make it return the network (an nn.Module instance)")
    return model
