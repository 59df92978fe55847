"""Self-describing checkpoints, and the one loader every command uses.

A flatcli run folder holds ``model.safetensors`` (weights + JSON metadata under the key ``flatcli``),
``metrics.csv``, ``state.pt`` (resumable training state, tensors only) and, for rSGD,
``replicas.safetensors``. The loader also takes foreign weights: a plain state dict in ``.safetensors``,
``.pt`` or ``.pth`` (with ``--model`` and ``--data``), a TorchScript archive, and a whole pickled module
only when the user opts in with ``trust_pickle`` — nothing else is ever unpickled.
"""
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatcli.errors import FlatcliError
from flatcli.io import atomic_path, check_regular_file

WEIGHTS, REPLICAS, STATE, METRICS = "model.safetensors", "replicas.safetensors", "state.pt", "metrics.csv"
META_KEY = "flatcli"
NESTED_KEYS = ("state_dict", "model_state_dict", "model")
STRIP_PREFIXES = ("module.", "_orig_mod.")
LIGHTNING_PREFIXES = ("model.", "net.")  # the LightningModule attribute that holds the network, by convention


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
    """A training state written by ``save_torch`` (tensors and plain values only: ``weights_only``)."""
    check_regular_file(path, "training state")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise FlatcliError(f"{str(path)!r} is not a readable training state ({str(e).splitlines()[0][:120]})",
                           "the file is damaged: start a fresh run") from None


CODE_REGISTRIES = ("tv:", "timm:", "hf:", "committee:")  # model names with a colon that name a registry, not code to import


def is_code_model(name: str) -> bool:
    """Whether a model name is ``module:function``: the user's own code, imported to build the model."""
    return ":" in name and not name.startswith(CODE_REGISTRIES)


def check_model_permission(meta_name: str, user_model: str | None, source) -> None:
    """A checkpoint's metadata may name built-in and registry models freely; a ``module:function`` model is
    imported only when the user named that same factory on the command line (or in the call)."""
    if is_code_model(meta_name) and user_model != meta_name:
        raise FlatcliError(f"{str(source)!r} was made with the model factory {meta_name!r}, and flatcli imports "
                           "code only when you name it yourself",
                           f"pass --model {meta_name} if you trust that code")


def model_spec_from_metadata(meta: dict, user_model: str | None, source):
    """The ModelSpec a run's metadata names, checked against the ``--model`` the user gave (or None)."""
    from flatcli.models import ModelSpec
    spec = ModelSpec.from_dict(meta["model"])
    if user_model is not None and user_model != spec.name:
        raise FlatcliError(f"{str(source)!r} describes its own model ({spec.name}), but model={user_model!r} was "
                           "given", f"drop --model (or pass --model {spec.name})")
    check_model_permission(spec.name, user_model, source)
    return spec


_META_FIELDS = {"model": dict, "data": dict, "loss": str, "algo": str, "hyper": dict, "replicas": int,
                "metrics": dict, "step": int, "epoch": int, "complete": bool}


def check_run_metadata(meta, source) -> dict:
    """The metadata of a flatcli run, checked once: every field present with its type, or one line naming it."""
    fix = "the run's metadata is damaged: retrain, or pass the weights with --model and --data"
    if not isinstance(meta, dict):
        raise FlatcliError(f"{str(source)!r} has flatcli metadata that is a {type(meta).__name__}, not a mapping", fix)
    for key, kind in _META_FIELDS.items():
        if key not in meta:
            raise FlatcliError(f"{str(source)!r}: the metadata has no {key!r} field", fix)
        value = meta[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FlatcliError(f"{str(source)!r}: metadata field {key!r} is {value!r}, not a {kind.__name__}", fix)
    if meta["replicas"] < 0:
        raise FlatcliError(f"{str(source)!r}: metadata field 'replicas' is {meta['replicas']}, below 0", fix)
    return meta


@dataclass
class RawCheckpoint:
    """What a checkpoint file holds, before a model is built: weights or a module, and metadata if any."""
    path: Path
    kind: str                          # "run", "safetensors", "state-dict", "torchscript", "exported", "pickle", "hf"
    meta: dict | None = None           # flatcli metadata (self-describing checkpoints only)
    state_dict: dict | None = None
    module: torch.nn.Module | None = None

    @property
    def replicas(self) -> int:
        return int((self.meta or {}).get("replicas", 0) or 0)


def read_safetensors(path: Path) -> tuple[dict, dict | None]:
    check_regular_file(path, "checkpoint")
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
    lightning = isinstance(obj, dict) and "pytorch-lightning_version" in obj
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise FlatcliError(f"{str(path)!r} holds no tensors of a state dict",
                           "save the weights with torch.save(model.state_dict(), PATH)")
    for prefix in STRIP_PREFIXES + (LIGHTNING_PREFIXES if lightning else ()):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


EXPECTED_CHECKPOINT = "pass a run folder, a .safetensors/.pt/.pth state dict, a TorchScript archive or a .pt2 program"


def is_exported_program(path: Path) -> bool:
    """A ``torch.export.save`` archive (.pt2): a zip with an ``archive_format`` entry."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "archive_format" or n.endswith("/archive_format") for n in z.namelist())


class ExportedModule(torch.nn.Module):
    """A ``torch.export`` program as a module flatcli can evaluate and perturb: its parameters are real
    parameters, and ``train``/``eval`` only set the flag (an exported program's mode was fixed when it was
    exported, and it refuses to be switched)."""

    def __init__(self, program: torch.nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x):
        return self.program(x)

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = mode
        return self


def read_exported_program(path: Path, trust_pickle: bool) -> RawCheckpoint:
    """A .pt2 program: torch.export.load may unpickle objects stored in it, so only with ``trust_pickle``; it
    must run on batches of any size (a batch dimension exported as dynamic)."""
    what = f"{str(path)!r} is a torch.export program (.pt2)"
    if not trust_pickle:
        raise FlatcliError(f"{what}, and loading one may unpickle objects, which runs arbitrary code",
                           "pass --trust-pickle if you trust the file's author, or save its state_dict instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = ExportedModule(torch.export.load(str(path)).module())
    except Exception as e:  # torch raises several unrelated types for a bad archive
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise FlatcliError(f"{what} that cannot be loaded ({reason})",
                           "re-export it with torch.export.save(torch.export.export(model, ...), PATH)") from None
    if not any(True for _ in module.parameters()):
        raise FlatcliError(f"{what} without parameters (its weights were folded into constants), so it "
                           "cannot be perturbed", "export the model itself, not a frozen or compiled graph")
    return RawCheckpoint(path, "exported", module=module)


def check_exported_batches(module: torch.nn.Module, input_shape: tuple, path) -> None:
    """An exported program must take any batch size (flatcli evaluates the data in slices): try 3 and 5."""
    x = torch.zeros((3, *input_shape))
    try:
        with torch.no_grad():
            module(x), module(torch.zeros((5, *input_shape)))
    except Exception as e:
        reason = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        raise FlatcliError(f"{str(path)!r} is a torch.export program (.pt2) that cannot run on batches of "
                           f"shape {tuple(x.shape)} ({reason}): it was exported with a fixed batch size",
                           "re-export it with dynamic_shapes marking the batch dimension, e.g. "
                           "dynamic_shapes=({0: torch.export.Dim('batch')},)") from None


def read_torch_file(path: Path, trust_pickle: bool) -> RawCheckpoint:
    kind = what_file(path)
    if kind is not None:
        hint = (" (a model defined in Python is named with --model MODULE:FUNCTION, e.g. --model net:make for "
                "make() in net.py, and its weights are passed as the checkpoint)") if kind == "Python source code" \
            else " (data go to --data)" if kind.startswith("a numpy") else ""
        raise FlatcliError(f"{str(path)!r} is {kind}, not a checkpoint", EXPECTED_CHECKPOINT + hint)
    if is_exported_program(path):
        return read_exported_program(path, trust_pickle)
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation warning, on every call
                warnings.simplefilter("ignore")
                return RawCheckpoint(path, "torchscript", module=torch.jit.load(str(path), map_location="cpu"))
        except Exception as e:  # torch raises several unrelated types for a bad archive
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise FlatcliError(f"{str(path)!r} is not a loadable TorchScript archive ({reason})",
                               "re-export it with torch.jit.script(model).save(PATH)") from None
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return RawCheckpoint(path, "pickle", module=obj)
    return RawCheckpoint(path, "state-dict", state_dict=unwrap_state_dict(obj, path))


def what_file(path: Path) -> str | None:
    """What a file that is not a torch checkpoint seems to be, from its first bytes (for the error message)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") and path.suffix.lower() == ".npz" or head.startswith(b"\x93NUMPY"):
        return "a numpy data file (.npy/.npz)"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image"
    if path.suffix == ".py" or head.lstrip().startswith((b"import ", b"from ", b"def ", b"#!", b'"""')):
        return "Python source code"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON/text file"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file"
    return None


def _torch_load(path: Path, trust_pickle: bool):
    """torch.load with weights_only (tensors and plain containers); a whole pickled object only with trust,
    its classes imported from the current directory as ``--model module:function`` factories are. Torch's
    own warnings are silenced: flatcli says what went wrong in one line."""
    from flatcli.models.external import cwd_on_path
    expected = EXPECTED_CHECKPOINT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            kind = what_file(path)
            raise FlatcliError(f"{str(path)!r} is not a torch checkpoint" + (f" (it is {kind})" if kind else ""),
                               expected) from None
        if not trust_pickle:
            raise FlatcliError(
                f"{str(path)!r} holds pickled Python objects (a whole model?), and unpickling runs arbitrary code",
                "save its state_dict instead, or pass --trust-pickle if you trust the file's author") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        kind = what_file(path)
        if kind:
            raise FlatcliError(f"{str(path)!r} is not a torch checkpoint (it is {kind})", expected) from None
        raise FlatcliError(f"{str(path)!r} is not a readable checkpoint ({str(e).splitlines()[0][:120]})",
                           "the file may be truncated or corrupt: re-save it") from None
    try:
        with warnings.catch_warnings(), cwd_on_path():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # anything the unpickled code raises
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise FlatcliError(f"unpickling {str(path)!r} failed: {type(e).__name__}: {reason}",
                           "run flatcli from the folder that holds the model's code (or put it on PYTHONPATH), "
                           "or save a state_dict instead") from None


def read_checkpoint(path, trust_pickle: bool = False) -> RawCheckpoint:
    """Read any supported checkpoint without building a model. Never unpickles unless ``trust_pickle``."""
    path = check_regular_file(path, "checkpoint")
    if path.is_dir():
        if (path / "config.json").is_file() and (path / WEIGHTS).is_file():
            tensors, meta = read_safetensors(path / WEIGHTS)
            if meta is None:  # a Hugging Face folder: its model is hf:FOLDER unless --model says otherwise
                return RawCheckpoint(path, "hf", state_dict=tensors)
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
