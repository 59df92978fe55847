"""Turn any checkpoint into (model, data) ready to measure: the loader shared by info and the measurements."""
from dataclasses import dataclass, field

import torch

from flatcli.checkpoint import RawCheckpoint, load_into, read_checkpoint, replica_state
from flatcli.data import Data, DataSpec, load_data
from flatcli.errors import FlatcliError
from flatcli.models import ModelSpec, build_model, check_fits


@dataclass
class Loaded:
    raw: RawCheckpoint
    model: torch.nn.Module          # in eval mode, on the CPU
    data: Data
    loss: str
    model_spec: ModelSpec | None
    label: str                      # how the checkpoint is named in tables and CSV


@dataclass
class DataCache:
    """Loads each data spec once when several checkpoints share it."""
    loaded: dict = field(default_factory=dict)

    def get(self, spec: DataSpec) -> Data:
        key = repr(sorted(spec.to_dict().items()))
        if key not in self.loaded:
            self.loaded[key] = load_data(spec)
        return self.loaded[key]


def default_loss(data: Data) -> str:
    return "cross-entropy" if data.num_classes is not None else "mse"


def load_checkpoint(path, *, model_spec: ModelSpec | None = None, data_spec: DataSpec | None = None,
                    loss: str | None = None, trust_pickle: bool = False, replica=None,
                    cache: DataCache | None = None) -> Loaded:
    """Any supported checkpoint → a model with its weights and the data to measure it on.

    A flatcli run describes itself (its model and data; ``data_spec`` may still override the data). A foreign
    state dict needs ``model_spec`` and ``data_spec``; a TorchScript or (trusted) pickled module needs ``data_spec``.
    """
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
    meta = raw.meta
    if meta is not None:
        model_spec = ModelSpec.from_dict(meta["model"])
        data_spec = data_spec or DataSpec.from_dict(meta["data"])
        loss = loss or meta.get("loss")
    elif data_spec is None or (raw.module is None and model_spec is None):
        need = "--data" if raw.module is not None else "--model and --data"
        raise FlatcliError(f"{str(path)!r} does not describe its model and data", f"pass {need}")
    data = (cache or DataCache()).get(data_spec)
    if raw.module is not None:
        if replica not in (None, "center"):
            raise FlatcliError(f"--replica {replica} asked for, but {str(path)!r} is a single model", "drop --replica")
        model = raw.module
    else:
        model = build_model(model_spec, data.input_shape, data.num_outputs)
        load_into(model, replica_state(raw, replica), path)
    check_fits(model, data.input_shape, data.num_outputs)
    label = str(path) if replica in (None, "center") else f"{path}#replica{replica}"
    return Loaded(raw, model.eval(), data, loss or default_loss(data), model_spec, label)
