"""Self-describing checkpoints, and the one loader every command uses.

A flatcli run folder holds ``model.safetensors`` (weights + JSON metadata under the key ``flatcli``),
``metrics.csv``, ``state.pt`` (resumable training state, tensors only) and, for rSGD,
``replicas.safetensors``. The loader also takes foreign weights: a plain state dict in ``.safetensors``,
``.pt`` or ``.pth`` (with ``--model`` and ``--data``), a TorchScript archive, and a whole pickled module
only when the user opts in with ``trust_pickle`` — nothing else is ever unpickled.
"""
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatcli.errors import FlatcliError
from flatcli.io import atomic_path

WEIGHTS, REPLICAS, STATE, METRICS = "model.safetensors", "replicas.safetensors", "state.pt", "metrics.csv"
META_KEY = "flatcli"
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def save_weights(path, state_dict: dict, meta: dict | None = None) -> None:
    """Write a state dict (plus JSON metadata) as safetensors, atomically. Tensors are cloned so tied weights save."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    metadata = {META_KEY: json.dumps(meta)} if meta is not None else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_torch(path, obj) -> None:
    """torch.save, atomically (used for the resumable state: tensors, numbers, lists and dicts only)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds, before a model is built: weights or a module, and metadata if any."""
    path: Path
    kind: str                          # "run", "safetensors", "state-dict", "torchscript", "pickle"
    meta: dict | None = None           # flatcli metadata (self-describing checkpoints only)
    state_dict: dict | None = None
    module: torch.nn.Module | None = None

    @property
    def replicas(self) -> int:
        return int((self.meta or {}).get("replicas", 0) or 0)


def read_safetensors(path: Path) -> tuple[dict, dict | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlatcliError(f"{str(path)!r} is not a readable safetensors file ({e})",
                           "the file may be truncated or corrupt: re-save or re-download it") from None
    meta = metadata.get(META_KEY)
    try:
        return tensors, (json.loads(meta) if meta else None)
    except json.JSONDecodeError:
        raise FlatcliError(f"{str(path)!r} has corrupt flatcli metadata", "re-save the checkpoint") from None


def unwrap_state_dict(obj, path: Path) -> dict:
    """A state dict, possibly nested under state_dict/model/model_state_dict, with DDP/compile prefixes stripped."""
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise FlatcliError(f"{str(path)!r} holds no tensors of a state dict",
                           "save the weights with torch.save(model.state_dict(), PATH)")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_torch_file(path: Path, trust_pickle: bool) -> RawCheckpoint:
    if is_torchscript(path):
        try:
            return RawCheckpoint(path, "torchscript", module=torch.jit.load(str(path), map_location="cpu"))
        except Exception as e:  # torch raises several unrelated types for a bad archive
            raise FlatcliError(f"{str(path)!r} is not a loadable TorchScript archive ({e})", "re-export it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise FlatcliError(f"{str(path)!r} is not a checkpoint (not a torch file)",
                               "pass a run folder, .safetensors, .pt or .pth file") from None
        if not trust_pickle:
            raise FlatcliError(
                f"{str(path)!r} holds pickled Python objects (a whole model?), and unpickling runs arbitrary code",
                "save its state_dict instead, or pass --trust-pickle if you trust the file's author") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FlatcliError(f"{str(path)!r} is not a readable checkpoint ({str(e).splitlines()[0][:120]})",
                           "the file may be truncated or corrupt: re-save it") from None
    if isinstance(obj, torch.nn.Module):
        return RawCheckpoint(path, "pickle", module=obj)
    return RawCheckpoint(path, "state-dict", state_dict=unwrap_state_dict(obj, path))


def read_checkpoint(path, trust_pickle: bool = False) -> RawCheckpoint:
    """Read any supported checkpoint without building a model. Never unpickles unless ``trust_pickle``."""
    path = Path(path)
    if not path.exists():
        raise FlatcliError(f"checkpoint {str(path)!r} does not exist", "check the path")
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise FlatcliError(f"{str(path)!r} is not a flatcli run folder (no {WEIGHTS})",
                               "pass a folder written by 'flatcli train --out' or a weights file")
        tensors, meta = read_safetensors(path / WEIGHTS)
        return RawCheckpoint(path, "run", meta=meta, state_dict=tensors)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        if meta is not None:
            return RawCheckpoint(path.parent if path.name == WEIGHTS else path, "run", meta=meta, state_dict=tensors)
        return RawCheckpoint(path, "safetensors", state_dict=unwrap_state_dict(tensors, path))
    return read_torch_file(path, trust_pickle)


def replica_state(raw: RawCheckpoint, replica) -> dict:
    """The weights of replica ``replica`` (an int) of an rSGD run, or the center (``None``/"center")."""
    if replica in (None, "center"):
        return raw.state_dict
    if raw.replicas == 0:
        raise FlatcliError(f"--replica {replica} asked for, but {str(raw.path)!r} is not an rSGD run with replicas",
                           "drop --replica")
    if not 0 <= int(replica) < raw.replicas:
        raise FlatcliError(f"--replica {replica} is out of range: this run has {raw.replicas} replicas",
                           f"use center or 0..{raw.replicas - 1}")
    tensors, _ = read_safetensors(Path(raw.path) / REPLICAS)
    prefix = f"{int(replica)}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_into(model: torch.nn.Module, state: dict, source) -> torch.nn.Module:
    """Load weights strictly, naming missing, unexpected and wrongly-shaped keys on a mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shaped:
        parts = [f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shaped)) if keys]
        raise FlatcliError(f"the weights in {str(source)!r} do not fit the model ({'; '.join(parts)})",
                           "pass the --model (and --width/--depth) the weights were trained with")
    with torch.no_grad():
        for k, v in expected.items():
            if k in state:
                v.copy_(state[k])
    return model
