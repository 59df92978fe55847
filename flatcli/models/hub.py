"""Models from the two hubs researchers train with: ``timm:NAME`` and ``hf:FOLDER``. Never downloads, never runs
code from a file.

- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`` (the ``timm``
  extra). The weights come from the checkpoint flatcli is given, never from the hub.
- ``hf:FOLDER``: a local Hugging Face folder of an image-classification model (``config.json``, and usually
  its ``model.safetensors``), built by ``AutoModelForImageClassification.from_config`` with
  ``trust_remote_code`` off (the ``hf`` extra), so only architectures that ship inside ``transformers`` load.
  The number of labels and of input channels come from the data; the network's logits are ``.logits``.
  Its state dict keys are the folder's own (no wrapper prefix), so a folder's ``model.safetensors`` and a
  flatcli run of the same model load into each other.
"""
import json
from pathlib import Path

from torch import nn

from flatcli.errors import FlatcliError


def need(package: str, extra: str, model: str):
    """Import an optional package, or one line naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError:
        raise FlatcliError(f"model {model!r} needs the {package!r} package, which is not installed",
                           f"pip install 'flatcli[{extra}]'") from None


def timm_model(name: str, channels: int, num_outputs: int) -> nn.Module:
    timm = need("timm", "timm", f"timm:{name}")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:8]
        raise FlatcliError(f"timm has no model {name!r}",
                           f"use timm:NAME with a name from timm.list_models(), e.g. {', '.join(close) or 'resnet18'}")
    return timm.create_model(name, pretrained=False, num_classes=num_outputs, in_chans=channels)


class HFClassifier(nn.Module):
    """A ``transformers`` image classifier whose forward returns the logits tensor; state dict keys unprefixed."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def forward(self, x):
        return self.net(pixel_values=x).logits


def _strip_prefix(module, state, prefix, local_metadata):
    for key in [k for k in state if k.startswith(prefix + "net.")]:
        state[prefix + key[len(prefix) + 4:]] = state.pop(key)


def _add_prefix(state, prefix, *args):
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + "net.")]:
        state[prefix + "net." + key[len(prefix):]] = state.pop(key)


def hf_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FlatcliError(f"model 'hf:{folder}': no config.json in {folder!r}",
                           "point hf: at a folder written by save_pretrained (config.json + model.safetensors)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise FlatcliError(f"{str(path)!r} is not readable JSON ({e})", "re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FlatcliError(f"{str(path)!r} names no model_type", "re-save the model with save_pretrained")
    return config


def hf_model(folder: str, channels: int, num_outputs: int) -> nn.Module:
    transformers = need("transformers", "hf", f"hf:{folder}")
    config = hf_config(folder)
    if config.get("auto_map"):
        raise FlatcliError(f"'hf:{folder}' needs code from the folder (auto_map in config.json), and flatcli "
                           "never runs code from a model folder", "use a model whose architecture ships with transformers")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise FlatcliError(f"'hf:{folder}': transformers cannot read its config ({str(e).splitlines()[0][:120]})",
                           "upgrade transformers or re-save the model") from None
    cfg.num_labels, cfg.num_channels = num_outputs, channels
    try:
        net = transformers.AutoModelForImageClassification.from_config(cfg, trust_remote_code=False)
    except ValueError as e:
        raise FlatcliError(f"'hf:{folder}' is not an image-classification model ({str(e).splitlines()[0][:120]})",
                           "use a model saved by an AutoModelForImageClassification class") from None
    return HFClassifier(net)
