"""Image folders too large for memory: a split that reads its images when they are asked for.

``StreamedSplit`` has ``Split``'s interface (``len``, ``subset``, ``to``, ``batch``, ``tensors``), but holds only
the file list and the labels. ``subset(n, generator)`` draws the same permutation as ``Split.subset``, so a fixed
``--max-examples`` subset is the same examples on both paths, and ``tensors()`` then reads just those n images
(through a ``DataLoader`` with ``workers`` processes): measuring 256 examples of ImageNet's validation set
holds 256 images, not 50 000. ``batch(idx)`` reads the images at ``idx`` (training reads each minibatch).

The evaluation transform: shorter side resized to ``resize`` (bilinear), then a centre crop of ``crop``; with
neither, every image is resized to the first training image's size, as the in-memory path does. Pixels are
uint8 until normalized on the device by the split's ``mean``/``std`` (the same formula as ``Split``).
"""
import os

import torch
from torch import Tensor

from flatcli.errors import FlatcliError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZE = ("data", "imagenet", "none")
STATS_IMAGES = 1000  # training images the "data" mean/std are computed on (a seeded sample)


def transform_of(resize: int | None, crop: int | None, size: tuple[int, int]):
    """PIL image → PIL image: the evaluation transform above (``size`` = (W, H) of the first image)."""
    from PIL import Image
    from torchvision.transforms import functional as F

    def apply(img):
        if resize is None and crop is None:
            return img if img.size == size else img.resize(size, Image.BILINEAR)
        if resize is not None:
            img = F.resize(img, resize, interpolation=F.InterpolationMode.BILINEAR)
        return F.center_crop(img, crop) if crop is not None else img
    return apply


class _Images(torch.utils.data.Dataset):
    """The images at ``files`` as uint8 (3, H, W) tensors, for a DataLoader."""

    def __init__(self, files, loader, transform):
        self.files, self.loader, self.transform = files, loader, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.transforms.functional import pil_to_tensor
        try:
            img = self.loader(self.files[i])
        except OSError as e:
            raise FlatcliError(f"cannot read image {self.files[i]!r} ({e})", "replace or remove that file") from None
        return pil_to_tensor(self.transform(img))


class StreamedSplit:
    """A split of an image folder read on demand; see the module docstring."""

    def __init__(self, files: list[str], y: Tensor, loader, transform, shape: tuple[int, ...],
                 mean: Tensor | None, std: Tensor | None, workers: int = 0, device=None):
        self.files, self.y, self.loader, self.transform = files, y, loader, transform
        self.input_shape, self.mean, self.std, self.workers = shape, mean, std, workers
        self.device = torch.device("cpu") if device is None else torch.device(device)

    def __len__(self) -> int:
        return len(self.files)

    def _with(self, files, y, device=None) -> "StreamedSplit":
        return StreamedSplit(files, y, self.loader, self.transform, self.input_shape, self.mean, self.std,
                             self.workers, self.device if device is None else device)

    def to(self, device) -> "StreamedSplit":
        moved = self._with(self.files, self.y.to(device), device)
        moved.mean = None if self.mean is None else self.mean.to(device)
        moved.std = None if self.std is None else self.std.to(device)
        return moved

    def subset(self, n: int, generator: torch.Generator) -> "StreamedSplit":
        """The first ``n`` of a permutation drawn from ``generator``: the same examples as ``Split.subset``."""
        if n < 1:
            raise FlatcliError(f"subset size must be positive, got {n}", "ask for at least one example")
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator, device=generator.device)[:n].cpu()
        return self._with([self.files[i] for i in idx.tolist()], self.y[idx.to(self.y.device)])

    def read(self, idx: Tensor | None = None) -> Tensor:
        """uint8 (n, C, H, W) of the images at ``idx`` (all when None), read by ``workers`` processes."""
        files = self.files if idx is None else [self.files[i] for i in idx.cpu().tolist()]
        loader = torch.utils.data.DataLoader(_Images(files, self.loader, self.transform), batch_size=256,
                                             num_workers=self.workers if len(files) > 256 else 0,
                                             pin_memory=self.device.type == "cuda")
        parts = [b.to(self.device, non_blocking=True) for b in loader]
        return torch.cat(parts) if parts else torch.empty((0, *self.input_shape), dtype=torch.uint8)

    def normalize(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x.float() / 255
        return (x.float() / 255 - self.mean) / self.std

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.normalize(self.read(idx)), self.y[idx.to(self.y.device)]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.normalize(self.read()), self.y


def folder_bytes(n: int, shape: tuple[int, ...]) -> int:
    return n * int(torch.tensor(shape).prod())


def available_memory() -> int:
    """Bytes of memory the kernel says are available (MemAvailable), or 4 GiB when it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def fits_in_memory(nbytes: int) -> bool:
    """``--in-memory auto``: hold the images when they take under a quarter of the available memory (and of
    the free memory of the GPU, when there is one: the in-memory path moves the whole split there)."""
    budget = available_memory() // 4
    if torch.cuda.is_available():
        budget = min(budget, torch.cuda.mem_get_info()[0] // 4)
    return nbytes <= budget


def stats(split: StreamedSplit, normalize: str, seed: int) -> tuple[Tensor | None, Tensor | None]:
    """(mean, std) (C, 1, 1) in [0, 1] pixel units: ImageNet's, none (x / 255), or from a seeded sample."""
    if normalize == "none":  # x / 255, as Split and StreamedSplit compute it with mean 0, std 1
        return torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    if normalize == "imagenet":
        return torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sample = split.subset(STATS_IMAGES, torch.Generator().manual_seed(seed))
    s1 = s2 = count = 0
    for start in range(0, len(sample), 64):  # 64 images at a time: memory does not grow with the sample
        part = sample.read(torch.arange(start, min(start + 64, len(sample)))).to(torch.float64) / 255
        s1, s2 = s1 + part.sum((0, 2, 3)), s2 + part.pow(2).sum((0, 2, 3))
        count += part.numel() // part.shape[1]
    mean = s1 / count
    std = (s2 / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1 / 255)  # as channel_stats computes them
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def check_stream_options(in_memory: str, resize, crop, normalize: str, workers: int) -> None:
    if in_memory not in ("auto", "yes", "no"):
        raise FlatcliError(f"in_memory={in_memory!r} is not auto, yes or no", "use in_memory='auto'")
    if normalize not in NORMALIZE:
        raise FlatcliError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZE)}", "use normalize='data'")
    for name, v in (("resize", resize), ("crop", crop)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise FlatcliError(f"{name}={v!r} is not a positive number of pixels", f"give e.g. {name}=224, or leave it out")
    if not isinstance(workers, int) or workers < 0 or workers > (os.cpu_count() or 1) * 4:
        raise FlatcliError(f"workers={workers!r} is not a number of processes from 0 to {(os.cpu_count() or 1) * 4}",
                           "give e.g. workers=4, or 0 to read in this process")
