"""Image sets read through torchvision: MNIST, Fashion-MNIST, CIFAR-10/100, and ImageFolder trees.

Each split is read whole into a uint8 tensor (n, C, H, W) from the torchvision dataset's ``.data`` and
``.targets`` (the dataset classes parse the idx files and pickled batches themselves); no DataLoader.
torchvision is imported on first use, which keeps ``import flatcli`` (and the CLI's start) quick.
"""
import contextlib
import os
import pickle
import sys
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from flatcli.data.core import Split, channel_stats
from flatcli.errors import FlatcliError


@dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision data set class (by name) and the usual per-channel statistics of its training images."""
    cls_name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


TORCHVISION_SETS = {
    "mnist": TorchvisionSet("MNIST", 10, (0.1307,), (0.3081,)),
    "fashion-mnist": TorchvisionSet("FashionMNIST", 10, (0.2860,), (0.3530,)),
    "cifar10": TorchvisionSet("CIFAR10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TorchvisionSet("CIFAR100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# What the dataset constructors raise for missing, corrupt or undownloadable files (URLError is an OSError).
READ_ERRORS = (RuntimeError, OSError, ValueError, TypeError, AssertionError, EOFError, KeyError,
               pickle.UnpicklingError)


def expected_files(cls: type, root: str) -> tuple[str, str]:
    """(the files torchvision reads, where to get them) for a data set class under ``root``."""
    from torchvision import datasets
    if issubclass(cls, datasets.MNIST):
        folder = os.path.join(root, cls.__name__, "raw")
        names = [os.path.splitext(name)[0] for name, _ in cls.resources]
        source = f"{cls.mirrors[0]}{{{','.join(name for name, _ in cls.resources)}}}, unzipped"
    else:  # CIFAR10 and its subclass CIFAR100
        folder = os.path.join(root, cls.base_folder)
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        source = f"{cls.url}, extracted into {root}"
    return f"{folder}{os.sep}{{{', '.join(names)}}}", source


def torchvision_splits(name: str, root: str, download: bool) -> tuple[Split, Split, int]:
    """(train, test, num_classes) of a ``TORCHVISION_SETS`` entry stored (or to be downloaded) under ``root``."""
    from torchvision import datasets
    tv = TORCHVISION_SETS[name]
    cls = getattr(datasets, tv.cls_name)
    mean = torch.tensor(tv.mean).view(-1, 1, 1)
    std = torch.tensor(tv.std).view(-1, 1, 1)
    splits = []
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # torchvision announces downloads on stdout
                ds = cls(root, train=train, download=download)
        except READ_ERRORS as e:
            files, source = expected_files(cls, root)
            reason = f"download failed ({' '.join(str(e).split())})" if download else "downloading is off"
            raise FlatcliError(f"{name} not found or corrupt: expected {files}; {reason}",
                               f"put those files there (from {source}), or allow the download") from None
        splits.append(Split(images_nchw(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64), mean, std))
    return splits[0], splits[1], tv.num_classes


def images_nchw(data) -> Tensor:
    """uint8 images as (n, C, H, W): MNIST's (n, H, W) tensor or CIFAR's (n, H, W, C) numpy array."""
    x = torch.as_tensor(data)
    if x.ndim == 3:
        return x.unsqueeze(1).contiguous()
    return x.permute(0, 3, 1, 2).contiguous()


def imagefolder_splits(path: str, spec=None) -> tuple:
    """(train, test, num_classes) of an ImageFolder tree ``path/train/CLASS/*`` and ``path/val/CLASS/*``.

    ``path/test`` stands in for a missing ``path/val``. Every image is read as RGB and transformed by
    ``spec.resize``/``spec.crop`` (see ``flatcli.data.stream``; with neither, resized (bilinear) to the size of
    the first training image, first class, first file in sorted order). ``spec.in_memory`` "yes" reads every
    image into a uint8 ``Split``; "no" gives a ``StreamedSplit`` that reads images when used; "auto" streams
    when the images would take more than a quarter of the available memory. mean/std: ``spec.normalize``
    (the training images' own — on the streamed path from a seeded sample of 1000 of them —, ImageNet's, or none).
    """
    from flatcli.data import stream
    if not os.path.isdir(path):
        raise FlatcliError(f"image folder {path!r} does not exist", "give the directory that holds train/ and val/")
    held = [d for d in ("val", "test") if os.path.isdir(os.path.join(path, d))]
    if not os.path.isdir(os.path.join(path, "train")) or not held:
        raise FlatcliError(f"image folder {path!r} lacks a train/ or a val/ (or test/) subfolder",
                           "lay it out as PATH/train/CLASS/image.png and PATH/val/CLASS/image.png")
    train_set, test_set = open_folder(os.path.join(path, "train")), open_folder(os.path.join(path, held[0]))
    if train_set.classes != test_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))[:5]
        only_test = sorted(set(test_set.classes) - set(train_set.classes))[:5]
        raise FlatcliError(f"class folders of train/ and {held[0]}/ in {path!r} differ (only in train: {only_train}, "
                           f"only in {held[0]}: {only_test})",
                           f"give {held[0]}/ one subfolder per class, named as in train/ (Tiny ImageNet's val/ "
                           "needs sorting into class folders by val_annotations.txt)")
    resize, crop, normalize = (spec.resize, spec.crop, spec.normalize) if spec else (None, None, "data")
    in_memory, workers, seed = (spec.in_memory, spec.workers, spec.seed) if spec else ("auto", 0, 0)
    first = load_image(train_set, train_set.samples[0][0])
    transform = stream.transform_of(resize, crop, first.size)
    w, h = transform(first).size
    shape = (3, h, w)
    streamed = in_memory == "no" or (in_memory == "auto" and not stream.fits_in_memory(
        stream.folder_bytes(len(train_set) + len(test_set), shape)))
    labels = [torch.tensor(ds.targets, dtype=torch.int64) for ds in (train_set, test_set)]
    if streamed:
        train, test = (stream.StreamedSplit([f for f, _ in ds.samples], y, ds.loader, transform, shape, None, None,
                                            workers) for ds, y in zip((train_set, test_set), labels))
        mean, std = stream.stats(train, normalize, seed)
    else:
        train_x, test_x = read_images(train_set, transform, shape), read_images(test_set, transform, shape)
        mean, std = channel_stats(train_x) if normalize == "data" else stream.stats(None, normalize, seed)
        train, test = Split(train_x, labels[0]), Split(test_x, labels[1])
    for split in (train, test):
        split.mean, split.std = mean, std
    return train, test, len(train_set.classes)


def open_folder(root: str):
    """torchvision's ImageFolder over ``root``; no class folders or no images is a FlatcliError."""
    from torchvision import datasets
    try:
        return datasets.ImageFolder(root)
    except (FileNotFoundError, ValueError) as e:
        raise FlatcliError(f"no images found in {root!r} ({e})",
                           "put images (png, jpg, ...) in one subfolder per class") from None


def read_images(ds, transform, shape: tuple[int, int, int]) -> Tensor:
    """All images of the ImageFolder ``ds`` as uint8 (n, *shape), each through ``transform`` (PIL → PIL)."""
    from torchvision.transforms.functional import pil_to_tensor
    x = torch.empty((len(ds), *shape), dtype=torch.uint8)
    for i, (file, _) in enumerate(ds.samples):
        img = pil_to_tensor(transform(load_image(ds, file)))
        if tuple(img.shape) != tuple(shape):
            raise FlatcliError(f"image {file!r} is {tuple(img.shape[1:])} after the transform, not {tuple(shape[1:])}",
                               "give --crop so that every image ends the same size")
        x[i] = img
    return x


def load_image(ds, file: str) -> Image.Image:
    """One image of ``ds`` as RGB; an unreadable file is a FlatcliError naming it."""
    try:
        return ds.loader(file)
    except OSError as e:
        raise FlatcliError(f"cannot read image {file!r} ({e})", "replace or remove that file") from None
