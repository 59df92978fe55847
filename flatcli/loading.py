"""Turn any checkpoint into (model, data) ready to measure: the loader shared by info and the measurements."""
import dataclasses
from dataclasses import dataclass, field, replace

import torch

from flatcli.checkpoint import (RawCheckpoint, check_exported_batches, check_run_metadata, load_into,
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
        if raw.kind == "exported":
            check_exported_batches(model, data.input_shape, path)
    else:
        model = build_model(model_spec, data.input_shape, data.num_outputs)
        state = replica_state(raw, replica)
        try:
            load_into(model, state, path)
        except FlatcliError:
            check_data_fits_weights(model, state, data, path, own_model=meta is not None)
            raise
    check_fits(model, data.input_shape, data.num_outputs)
    label = str(path) if replica in (None, "center") else f"{path}#replica{replica}"
    return Loaded(raw, model.eval(), data, loss or default_loss(data), model_spec, label)


def check_data_fits_weights(model: torch.nn.Module, state: dict, data: Data, path, own_model: bool) -> None:
    """When weights do not fit the model built for ``data``, and the first layer (inputs) or the last (outputs)
    is where they differ, the data is the mismatch: say so, with the data's shape and the weights' input."""
    expected = model.state_dict()
    ours = [k for k, v in expected.items() if v.ndim >= 2]
    theirs = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.ndim >= 2]
    if not ours or not theirs:
        return
    problems = []
    first, last = ours[0], ours[-1]
    if theirs[0] == first and state[first].ndim == expected[first].ndim \
            and state[first].shape[1] != expected[first].shape[1]:  # the same first layer, reading other inputs
        unit = "channels" if expected[first].ndim == 4 else "numbers per example"
        problems.append(f"its first layer ({first}) reads {state[first].shape[1]} {unit}, the data give "
                        f"{expected[first].shape[1]}")
    if theirs[-1] == last and state[last].shape[0] != expected[last].shape[0] == data.num_outputs:
        problems.append(f"it has {state[last].shape[0]} outputs, the data need {data.num_outputs}")
    if not problems:
        return
    what = (f"data {data.spec.name} (x of shape {tuple(data.input_shape)} per example, "
            f"{f'{data.num_classes} classes' if data.num_classes is not None else f'{data.num_outputs} targets'}) "
            f"do not fit the weights in {str(path)!r}: {'; '.join(problems)}")
    fix = ("pass the --data the run was trained on (or drop --data to use it)" if own_model
           else "pass the --data the weights were trained on, or the --model that reads this data")
    raise FlatcliError(what, fix)
