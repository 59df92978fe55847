"""Data sets as tensors: the built-in digits (real, 8×8) and teacher (synthetic) sets, torchvision image sets,
image folders, tensor files.

    load_data(DataSpec("cifar10", data_dir="data"))  →  Data(train=Split, test=Split, input_shape, ...)

A ``Split`` holds a whole split on one device; ``split.batch(idx)`` returns normalized float32 inputs and
labels, and ``augment_batch`` applies crop + flip on the device, so training needs no DataLoader.
Names: ``DATA_NAMES``, ``imagefolder:PATH`` (PATH/train/CLASS/*, PATH/val/CLASS/*), or a path ending
in .npz, .safetensors or .pt (see ``flatcli.data.tensor_file``).
"""
import os

from flatcli.data.augment import augment_batch
from flatcli.data.core import (DATA_NAMES, IMAGEFOLDER_PREFIX, TENSOR_SUFFIXES, Data, DataSpec, Split, absolute,
                               channel_stats, check_spec, make_data)
from flatcli.data.digits import NUM_CLASSES as DIGITS_CLASSES
from flatcli.data.digits import digits_splits
from flatcli.data.teacher import NUM_CLASSES as TEACHER_CLASSES
from flatcli.data.teacher import teacher_splits
from flatcli.data.tensor_file import tensor_file_contents
from flatcli.data.vision import TORCHVISION_SETS, imagefolder_splits, torchvision_splits
from flatcli.errors import FlatcliError

__all__ = ["DATA_NAMES", "Data", "DataSpec", "Split", "augment_batch", "channel_stats", "load_data"]


def load_data(spec: DataSpec, *, download: bool = True) -> Data:
    """The data set ``spec`` names, both splits in CPU memory. Any user mistake raises FlatcliError.

    ``download``: fetch a missing torchvision set into ``spec.data_dir`` (never for the other sources).
    """
    name = check_spec(spec).name
    if name == "teacher":
        train, test = teacher_splits(spec)
        return make_data(spec, train, test, TEACHER_CLASSES)
    if name == "digits":
        train, test = digits_splits(spec)
        return make_data(spec, train, test, DIGITS_CLASSES)
    if name in TORCHVISION_SETS:
        train, test, classes = torchvision_splits(name, absolute(spec.data_dir), download)
    elif name.startswith(IMAGEFOLDER_PREFIX):
        train, test, classes = imagefolder_splits(os.path.expanduser(name[len(IMAGEFOLDER_PREFIX):]), spec)
    elif name.lower().endswith(TENSOR_SUFFIXES):
        train, test, classes, notes = tensor_file_contents(os.path.expanduser(name))
        return make_data(spec, train, test, classes, notes=notes)
    else:
        hint = f" (a directory: use imagefolder:{name})" if os.path.isdir(name) else ""
        raise FlatcliError(f"unknown data {name!r}{hint}",
                           f"use one of: {', '.join(DATA_NAMES)}, imagefolder:PATH, or a .npz/.safetensors/.pt file")
    return make_data(spec, train, test, classes)
