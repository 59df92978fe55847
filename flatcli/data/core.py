"""What a data set is once loaded: its spec, its splits held as tensors, and what a model needs to know.

Images stay uint8 in memory (a quarter of the float32 size, so CIFAR fits on any device) and are
normalized per batch: ``x̂ = (x / scale − mean_c) / std_c`` with ``mean_c, std_c`` in units of [0, 1] pixels
and ``scale`` the brightest level (255; 16 for the digits).
Feature sets (the teacher, float tensor files) are float32 and used as they are.
"""
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor

from flatcli.errors import FlatcliError

DATA_NAMES = ("digits", "teacher", "mnist", "fashion-mnist", "cifar10", "cifar100")
IMAGEFOLDER_PREFIX = "imagefolder:"
READING = ("in_memory", "workers")  # DataSpec fields that say how to read the data, not which data
TENSOR_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")


def absolute(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute against the current directory."""
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class DataSpec:
    """Which data: a ``DATA_NAMES`` entry, ``imagefolder:PATH`` or a tensor file path (.npz/.safetensors/.pt).

    ``data_dir``: where the torchvision sets live or are downloaded to. ``seed``: generates the teacher
    set, draws the digits' train/test split and picks the capped subsets. ``n_train``/``n_test``: the
    teacher's sizes (None: the defaults); for every other set an optional cap, the first n examples after a
    shuffle seeded by ``seed``.
    """
    name: str = "teacher"
    data_dir: str = "data"
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    classes: tuple[int, int] | None = None
    # image folders only (see flatcli.data.stream): the evaluation transform, the normalization, and how to read
    resize: int | None = None       # shorter side resized to this many pixels (bilinear)
    crop: int | None = None         # then a centre crop of crop x crop
    normalize: str = "data"         # data (mean/std of the training images) | imagenet | none (x / 255)
    in_memory: str = "auto"         # yes: read every image up front; no: read images when used; auto: by size
    workers: int = 0                # DataLoader processes when streaming

    def resolved(self) -> "DataSpec":
        """The same spec with every path absolute, so that it still points at its data from elsewhere."""
        name = self.name
        if name.startswith(IMAGEFOLDER_PREFIX):
            name = IMAGEFOLDER_PREFIX + absolute(name[len(IMAGEFOLDER_PREFIX):])
        elif name not in DATA_NAMES and name.lower().endswith(TENSOR_SUFFIXES):
            name = absolute(name)
        return replace(self, name=name, data_dir=absolute(self.data_dir))

    def to_dict(self) -> dict:
        """JSON-safe ``{"name", "data_dir", "seed", "n_train", "n_test", "resize", "crop", "normalize"}`` with
        absolute paths (and ``"classes": [A, B]`` for a binary task): what the data are. How they are read (``in_memory``, ``workers``) is left out."""
        d = {k: v for k, v in asdict(self.resolved()).items() if k not in READING}
        if d["classes"] is None:  # absent unless a binary task is selected, as in older runs
            del d["classes"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        """Inverse of ``to_dict``; a malformed dict (e.g. from a damaged checkpoint) is a FlatcliError."""
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not set(d) <= names or "name" not in d:
            raise FlatcliError(f"malformed data spec {d!r}", f"expected a dict with keys {', '.join(sorted(names))}")
        spec = cls(**d)
        if isinstance(spec.classes, list):  # JSON has no tuples
            spec.classes = tuple(spec.classes)
        check_spec(spec)
        return spec


def check_spec(spec: DataSpec) -> DataSpec:
    """Types and ranges of the fields (sizes positive or None)."""
    if not isinstance(spec.name, str) or not isinstance(spec.data_dir, str):
        raise FlatcliError(f"data name and directory must be strings, got {spec.name!r}, {spec.data_dir!r}",
                           "pass text, e.g. --data cifar10 --data-dir data")
    # the teacher seeds its generators with 3 * seed + 2: below 2^62 that stays within 64 bits
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or not 0 <= spec.seed < 2 ** 62:
        raise FlatcliError(f"data seed must be an integer in 0..2^62−1, got {spec.seed!r}", "pass e.g. 0")
    for key in ("n_train", "n_test"):
        n = getattr(spec, key)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 2 ** 62):
            raise FlatcliError(f"{key} must be a positive integer or unset, got {n!r}", "pass e.g. 1000, or omit it")
    from flatcli.data.stream import check_stream_options
    check_stream_options(spec.in_memory, spec.resize, spec.crop, spec.normalize, spec.workers)
    c = spec.classes
    if c is not None and (not isinstance(c, tuple) or len(c) != 2 or len(set(c)) != 2 or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in c)):
        raise FlatcliError(f"classes={c!r} is not two different class labels", "pass two labels, e.g. --classes 0,1")
    return spec


def parse_classes(text: str | None) -> tuple[int, int] | None:
    """``"3,8"`` → (3, 8); None → None. Anything but two different non-negative integers is a FlatcliError."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or parts[0] == parts[1] or int(parts[0]) == int(parts[1]):
        raise FlatcliError(f"classes={text!r} is not two different class labels A,B", "pass e.g. --classes 0,1")
    return int(parts[0]), int(parts[1])


@dataclass
class Split:
    """One split held as tensors: ``x`` (n, *input_shape), ``y`` (n,) int64 labels or (n,)/(n, k) float targets.

    ``mean``/``std`` (C, 1, 1), in units of [0, 1] pixels, are set for uint8 images and None for float x;
    ``scale`` is the pixel value that stands for 1 (255, or 16 for the digits' 17 grey levels).
    """
    x: Tensor
    y: Tensor
    mean: Tensor | None = None
    std: Tensor | None = None
    scale: float = 255.0

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to(self, device) -> "Split":
        move = (lambda t: None if t is None else t.to(device))
        return Split(move(self.x), move(self.y), move(self.mean), move(self.std), self.scale)

    def normalize(self, x: Tensor) -> Tensor:
        """float32 ``(x / scale − mean) / std`` for uint8 images; float32 ``x`` otherwise."""
        if self.mean is None:
            return x.float()
        return (x.float() / self.scale - self.mean) / self.std

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The examples at ``idx`` (moved to the split's device): normalized float32 x, y."""
        idx = idx.to(self.x.device)
        return self.normalize(self.x[idx]), self.y[idx]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole split, normalized (for measurements)."""
        return self.normalize(self.x), self.y

    def subset(self, n: int, generator: torch.Generator) -> "Split":
        """The first ``n`` examples of a permutation drawn from ``generator``; ``self`` when n >= len.

        Subsets drawn from equal generator states are nested: the smaller is a prefix of the larger.
        """
        if n < 1:
            raise FlatcliError(f"subset size must be positive, got {n}", "ask for at least one example")
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator, device=generator.device)[:n].to(self.x.device)
        return Split(self.x[idx], self.y[idx], self.mean, self.std, self.scale)


@dataclass
class Data:
    """A loaded data set and what a model needs to know about it.

    ``num_classes`` is None for regression (float y); ``num_outputs`` is the number of classes or the
    regression target width. ``images`` is True for 3-channel images (n, 3, H, W), where crop+flip
    augmentation applies.
    """
    spec: DataSpec
    train: Split
    test: Split | None
    input_shape: tuple[int, ...]
    num_classes: int | None
    num_outputs: int
    images: bool
    notes: tuple[str, ...] = ()  # what was inferred while reading (key names, layout), for the user to see


def channel_stats(x: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of uint8 images (n, C, H, W), in [0, 1] units, shape (C, 1, 1).

    Accumulated in float64 over chunks, so a large set never exists in float at once. A constant channel
    gets std 1/255, so normalizing it cannot divide by zero.
    """
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].to(torch.float64) / 255
        s += part.sum((0, 2, 3))
        s2 += part.pow(2).sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    mean = s / count
    std = (s2 / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1 / 255)
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def select_classes(split: Split, classes: tuple[int, int], num_classes: int | None, name: str) -> Split:
    """The examples of ``classes`` = (A, B) only, labels A → 0 and B → 1."""
    if num_classes is None:
        raise FlatcliError(f"classes={classes} asked for, but {name!r} holds regression targets, not classes",
                           "drop --classes, or use data with integer labels")
    if max(classes) >= num_classes:
        raise FlatcliError(f"classes={classes}: {name!r} has classes 0..{num_classes - 1} only",
                           f"pick two labels below {num_classes}")
    keep = (split.y == classes[0]) | (split.y == classes[1])
    if not bool(keep.any()):
        raise FlatcliError(f"classes={classes}: no examples of either class in {name!r}", "pick other labels")
    labels = (split.y[keep] == classes[1]).long()
    if not isinstance(split, Split):  # a streamed image folder: keep the files of the two classes
        return split._with([f for f, k in zip(split.files, keep.tolist()) if k], labels)
    return replace(split, x=split.x[keep], y=labels)


def make_data(spec: DataSpec, train: Split, test: Split | None, num_classes: int | None,
              notes: tuple[str, ...] | list[str] = ()) -> Data:
    """Assemble ``Data``: the two ``spec.classes`` when given (as labels 0, 1), then the n_train/n_test caps
    (first n after a shuffle seeded by spec.seed)."""
    if spec.classes is not None:
        train = select_classes(train, spec.classes, num_classes, spec.name)
        test = None if test is None else select_classes(test, spec.classes, num_classes, spec.name)
        num_classes = 2
    if spec.n_train is not None:
        train = train.subset(spec.n_train, torch.Generator().manual_seed(spec.seed))
    if test is not None and spec.n_test is not None:
        test = test.subset(spec.n_test, torch.Generator().manual_seed(spec.seed))
    input_shape = tuple(train.input_shape)
    if num_classes is not None:
        num_outputs = num_classes
    else:
        num_outputs = 1 if train.y.ndim == 1 else train.y.shape[1]
    images = len(input_shape) == 3 and input_shape[0] == 3
    return Data(spec, train, test, input_shape, num_classes, num_outputs, images, tuple(notes))
