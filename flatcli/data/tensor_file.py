"""A data set stored as a file of named tensors: .npz, .safetensors, or .pt (loaded with weights_only).

Keys: ``x`` (n, *input_shape) and ``y`` (n,), optionally ``x_test`` and ``y_test`` (both or neither).
The common other names are accepted too (``KEY_NAMES``: ``X``/``Y``, ``images``/``labels``, ``inputs``/``targets``,
``data``/``target``, ``features``, with ``_test``/``test_`` forms), and a note says which were used.
Integer ``y`` are class labels (num_classes = max label + 1 over train and test); floating ``y`` are
regression targets, (n,) or (n, k). uint8 ``x`` of shape (n, C, H, W) are images, normalized per channel
with the mean/std of the training images; any other ``x`` becomes float32 features, used as stored
(a 1-D ``x`` is read as (n, 1)). Images stored channels-last, (n, H, W, C) with C in 1, 3, 4 and H, W not,
uint8 or float, are transposed to (n, C, H, W) (with a note). No file is ever unpickled beyond tensors.
"""
import math
import os
import pickle
import warnings
import zipfile

import numpy as np
import torch
from torch import Tensor

from flatcli.data.core import Split, channel_stats
from flatcli.errors import FlatcliError
from flatcli.io import check_allocation, check_regular_file

MAX_CLASSES = 2 ** 24  # integer labels above this are not class indices (and would size a huge output layer)

KEYS = ("x", "y", "x_test", "y_test")
EXPECTED = "keys x, y and optionally x_test, y_test (x: (n, ...) numbers, y: (n,) integer labels or " \
           "(n,)/(n, k) float targets)"


def read_tensors(path: str) -> dict[str, Tensor]:
    """The named tensors in ``path``, on the CPU; unreadable or non-tensor content is a FlatcliError."""
    check_regular_file(path, "data file")  # missing, a FIFO or a device (reading /dev/zero never ends)
    if os.path.isdir(path):
        raise FlatcliError(f"data file {path!r} is a folder", "pass a .npz, .safetensors or .pt file")
    try:
        if path.lower().endswith(".npz"):
            check_npz_sizes(path)
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:  # our handle: closed even if corrupt
                arrays = {k: f[k] for k in f.files}
            return {k: numpy_tensor(k, a, path) for k, a in arrays.items()}
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        with warnings.catch_warnings():  # torch's warnings about the pickle protocol: flatcli's line says it
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except FlatcliError:
        raise
    except pickle.UnpicklingError:  # torch's message would advise weights_only=False: running the file's code
        raise FlatcliError(f"cannot read data file {path!r}: it holds pickled Python objects (numpy arrays? "
                           "lists?), not only tensors, and flatcli never unpickles a data file",
                           "save torch tensors (torch.save({'x': torch.as_tensor(x), 'y': torch.as_tensor(y)}, "
                           "PATH)) or write an .npz with numpy.savez") from None
    except Exception as e:  # any parse failure means a corrupt file or content that is not plain tensors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlatcliError(f"cannot read data file {path!r} ({reason})",
                           f"write it again with {EXPECTED}, tensors only") from None
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise FlatcliError(f"data file {path!r} holds a {type(content).__name__}, not a dict of tensors",
                           f"save a dict with {EXPECTED}")
    return content


def check_npz_sizes(path: str) -> None:
    """Before numpy allocates anything: every member's .npy header declares no more bytes than the member
    holds, and all of them together fit in memory (a small compressed file may expand to gigabytes)."""
    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size:
                    raise FlatcliError(f"{info.filename!r} in {path!r} declares shape {shape} ({declared} bytes) "
                                       f"but holds {info.file_size} bytes", "the file is damaged: write it again")
                total += info.file_size
    except FlatcliError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return  # not a readable archive: numpy's own reading says so
    check_allocation(total, f"data file {path!r} (its arrays uncompressed)", "use a smaller data file")


def numpy_tensor(key: str, a: np.ndarray, path: str) -> Tensor:
    if a.dtype.kind not in "biuf":
        raise FlatcliError(f"{key!r} in {path!r} has dtype {a.dtype}, not numbers", f"store {EXPECTED}")
    return torch.as_tensor(np.ascontiguousarray(a))


X_NAMES, Y_NAMES = ("x", "X", "images", "inputs", "data", "features"), ("y", "Y", "labels", "targets", "target", "label")
KEY_NAMES = {"x": X_NAMES, "y": Y_NAMES,
             "x_test": tuple(f for n in X_NAMES for f in (f"{n}_test", f"test_{n}")),
             "y_test": tuple(f for n in Y_NAMES for f in (f"{n}_test", f"test_{n}"))}
CHANNELS = (1, 3, 4)


def find_keys(t: dict, path: str) -> tuple[dict, list[str]]:
    """{x, y[, x_test, y_test]: the file's key for it} and notes naming the keys used when not the usual ones."""
    found, notes = {}, []
    for role, names in KEY_NAMES.items():
        present = [n for n in names if n in t]
        if names[0] in present:  # the usual name wins; another name for the same role is then unexpected
            present = [names[0]]
        if len(present) > 1:
            raise FlatcliError(f"data file {path!r} has several keys for {role}: {', '.join(present)}",
                               f"keep one of them, or rename it {role}")
        if present:
            found[role] = present[0]
    missing = [k for k in ("x", "y") if k not in found]
    unknown = sorted(set(t) - set(found.values()))
    if missing or unknown or (("x_test" in found) != ("y_test" in found)):
        problem = (f"missing {missing} (also read as: {'; '.join('/'.join(KEY_NAMES[k][1:]) for k in missing)})"
                   if missing
                   else f"unexpected keys {unknown}" if unknown else "only one of x_test, y_test")
        raise FlatcliError(f"data file {path!r} has keys {sorted(t)}: {problem}", f"store {EXPECTED}")
    if any(role != key for role, key in found.items()):
        notes.append(f"data file {path}: using " + ", ".join(f"{key!r} as {role}" for role, key in found.items()))
    return found, notes


def channels_last(x: Tensor) -> bool:
    """(n, H, W, C) images: 4-d, C (the last) in 1, 3, 4 and the would-be channel axis (the second) not."""
    return x.ndim == 4 and x.shape[-1] in CHANNELS and x.shape[1] not in CHANNELS


def tensor_file_splits(path: str) -> tuple[Split, Split | None, int | None]:
    """(train, test or None, num_classes or None for regression) of a tensor file."""
    train, test, classes, _ = tensor_file_contents(path)
    return train, test, classes


def tensor_file_contents(path: str) -> tuple[Split, Split | None, int | None, list[str]]:
    """(train, test or None, num_classes or None, notes): the notes say which keys and layout were read."""
    raw = read_tensors(path)
    keys, notes = find_keys(raw, path)
    t = {role: raw[key] for role, key in keys.items()}
    if channels_last(t["x"]):
        shape = tuple(t["x"].shape)
        for role in ("x", "x_test"):
            if role in t and t[role].ndim == 4:
                t[role] = t[role].permute(0, 3, 1, 2).contiguous()
        notes.append(f"data file {path}: x {shape} read as channels-last images (n, H, W, C), used as "
                     f"(n, C, H, W) {(shape[0], shape[3], shape[1], shape[2])}")
    train = make_split(t["x"], t["y"], "x", "y", path)
    test = make_split(t["x_test"], t["y_test"], "x_test", "y_test", path) if "x_test" in t else None
    if test is not None:
        check_alike(train, test, path)
    if train.x.dtype == torch.uint8:
        mean, std = channel_stats(train.x)
        train.mean, train.std = mean, std
        if test is not None:
            test.mean, test.std = mean, std
    if train.y.is_floating_point():
        return train, test, None, notes
    top = max(int(s.y.max()) for s in (train, test) if s is not None)
    if top >= MAX_CLASSES:
        raise FlatcliError(f"data file {path!r} has the integer label {top}: {top + 1} classes", f"integer y are "
                           f"class labels 0..K-1 with K at most {MAX_CLASSES}; store regression targets as floats")
    return train, test, top + 1, notes


def make_split(x: Tensor, y: Tensor, xk: str, yk: str, path: str) -> Split:
    """Checked, converted tensors: uint8 (n, C, H, W) images or float32 x; int64 labels or float32 targets y."""
    if x.is_complex() or y.is_complex():
        raise FlatcliError(f"{xk!r}/{yk!r} in {path!r} hold complex numbers", f"store {EXPECTED}")
    if x.ndim == 0 or y.ndim not in (1, 2) or len(x) != len(y) or len(x) == 0:
        raise FlatcliError(f"{xk!r} {tuple(x.shape)} and {yk!r} {tuple(y.shape)} in {path!r} do not match",
                           f"store {EXPECTED}, with as many rows in y as in x, at least one")
    if not (x.dtype == torch.uint8 and x.ndim == 4):
        x = x.float().reshape(len(x), -1) if x.ndim == 1 else x.float()
    if y.is_floating_point():
        return Split(x, y.float())
    if y.ndim != 1 or int(y.min()) < 0:
        raise FlatcliError(f"{yk!r} in {path!r} holds integers of shape {tuple(y.shape)} (min {int(y.min())})",
                           "integer y are class labels: store them as (n,) with values 0..K-1")
    return Split(x, y.long())


def check_alike(train: Split, test: Split, path: str) -> None:
    """The test split must have the train split's example shape, x type and kind of target."""
    if (train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype
            or train.y.dtype != test.y.dtype or train.y.shape[1:] != test.y.shape[1:]):
        raise FlatcliError(f"test data in {path!r} (x_test {tuple(test.x.shape)} {test.x.dtype}, y_test "
                           f"{tuple(test.y.shape)} {test.y.dtype}) do not match the training data (x "
                           f"{tuple(train.x.shape)} {train.x.dtype}, y {tuple(train.y.shape)} {train.y.dtype})",
                           "store x_test, y_test with the same shapes per example and types as x, y")
