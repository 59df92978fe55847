"""Turn any checkpoint into (model, data) ready to measure: the loader shared by info and the measurements."""
import dataclasses
from dataclasses import dataclass, field, replace

import torch

from flatcli.checkpoint import (RawCheckpoint, check_run_metadata, load_into,
                                model_spec_from_metadata, read_checkpoint, replica_state)
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

    def get(self, spec: DataSpec, download: bool = True) -> Data:
        key = repr((sorted(spec.to_dict().items()), spec.in_memory, spec.workers))
        if key not in self.loaded:
            self.loaded[key] = load_data(spec, download=download)
        return self.loaded[key]


def default_loss(data: Data) -> str:
    return "cross-entropy" if data.num_classes is not None else "mse"


def load_checkpoint(path, *, model_spec: ModelSpec | None = None, data_spec: DataSpec | None = None,
                    loss: str | None = None, trust_pickle: bool = False, replica=None,
                    cache: DataCache | None = None, reading: dict | None = None,
                    classes: tuple[int, int] | None = None) -> Loaded:
    """Any supported checkpoint → a model with its weights and the data to measure it on.

    A flatcli run describes itself (its model and data; ``data_spec`` may still override the data, and a
    ``model_spec`` must name the run's own model). A foreign state dict needs ``model_spec`` and ``data_spec``;
    a TorchScript or (trusted) pickled module needs ``data_spec``. Metadata is data: it selects built-in
    models and data sets, but never imports code (a ``module:function`` model only when ``model_spec`` names
    it), downloads or creates anything. ``classes`` = (A, B) replaces the data's class selection (a binary
    task of classes A → 0, B → 1; see ``DataSpec``); None keeps the run's own.
    """
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
    meta, download = raw.meta, True
    if raw.kind == "hf" and model_spec is None:
        model_spec = ModelSpec(f"hf:{raw.path}")
    if meta is not None:
        check_run_metadata(meta, path)
        model_spec = model_spec_from_metadata(meta, model_spec.name if model_spec else None, path)
        download = data_spec is not None  # the user named the data: a missing torchvision set may be fetched
        # how to read (in memory or not, workers) is the user's to choose; what the data are is the run's
        data_spec = data_spec or dataclasses.replace(DataSpec.from_dict(meta["data"]), **(reading or {}))
        loss = loss or meta.get("loss")
    elif data_spec is None or (raw.module is None and model_spec is None):
        missing = [f"--{k}" for k, v in (("model", model_spec), ("data", data_spec)) if v is None
                   and not (k == "model" and raw.module is not None)]
        raise FlatcliError(f"{str(path)!r} does not describe its model and data", f"pass {' and '.join(missing)}")
    if classes is not None:
        data_spec = replace(data_spec, classes=classes)
    data = (cache or DataCache()).get(data_spec, download=download)
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
