"""Fixtures that build tiny data sets in the real on-disk formats, so that tests never download.

Each image fixture returns a ``FakeImages``: where the set lives (``name`` and ``data_dir``, as ``--data`` and
``--data-dir`` or ``DataSpec`` take them) and the exact pixels and labels written, as uint8 (n, C, H, W)
and int64 (n,) tensors in the order torchvision reads them.

    mnist_dir, fashion_mnist_dir   idx files in DATA_DIR/{MNIST,FashionMNIST}/raw/ (28 × 28, 10 classes)
    cifar10_dir, cifar100_dir      pickled python batches in DATA_DIR/cifar-10-batches-py/ and
                                   DATA_DIR/cifar-100-python/ (32 × 32 RGB); see ``cifar_checksums``
    image_folder                   PNGs in ROOT/train/CLASS/ and ROOT/val/CLASS/ (3 classes, 6 × 8 RGB)
    tensor_file_factory            make(".npz" | ".safetensors" | ".pt", x=..., y=..., ...) -> path
"""
import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets


@dataclass
class FakeImages:
    """A tiny image set written to disk, with the exact tensors a correct reader must return."""
    name: str              # the data name: "mnist", "cifar10", "imagefolder:/abs/path", ...
    data_dir: str          # the data directory (for torchvision sets; the tmp dir otherwise)
    train_x: torch.Tensor  # (n, C, H, W) uint8
    train_y: torch.Tensor  # (n,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def spec(self, **kw):
        """A ``DataSpec`` pointing at this set (extra fields: seed, n_train, n_test)."""
        from flatcli.data import DataSpec
        return DataSpec(self.name, data_dir=self.data_dir, **kw)


def random_images(rng: np.random.Generator, n: int, c: int, h: int, w: int, classes: int):
    """(uint8 images (n, C, H, W), int64 labels (n,)) drawn from ``rng``; labels cycle so every class shows up."""
    x = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
    y = (np.arange(n) + rng.integers(0, classes)) % classes
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


# -- MNIST / Fashion-MNIST: idx files ------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic 0x0000 0x08 (uint8) ndim, then each dimension as big-endian int32, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(data_dir: Path, folder: str = "MNIST", n_train: int = 12, n_test: int = 6, seed: int = 0,
                name: str = "mnist") -> FakeImages:
    """The four unzipped idx files torchvision's MNIST reads from DATA_DIR/<folder>/raw/.

    torchvision only ever reads the unzipped files (``train-images-idx3-ubyte``, ...); the ``.gz`` archives
    matter only to its downloader, which is why none are written here.
    """
    raw = data_dir / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = random_images(rng, n, 1, 28, 28, 10)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0].numpy())
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.numpy().astype(np.uint8))
        sets[prefix] = (x, y)
    return FakeImages(name, str(data_dir), *sets["train"], *sets["t10k"], 10)


@pytest.fixture
def mnist_dir(tmp_path) -> FakeImages:
    """12 training and 6 test MNIST-format digits under ``tmp_path/data/MNIST/raw``."""
    return write_mnist(tmp_path / "data")


@pytest.fixture
def fashion_mnist_dir(tmp_path) -> FakeImages:
    """12 training and 6 test Fashion-MNIST-format images under ``tmp_path/data/FashionMNIST/raw``."""
    return write_mnist(tmp_path / "data", folder="FashionMNIST", seed=1, name="fashion-mnist")


# -- CIFAR-10 / CIFAR-100: pickled python batches --------------------------------------------------

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def cifar_batch(x: torch.Tensor, labels_key: str, y: torch.Tensor, extra: dict) -> dict:
    """One batch as the CIFAR python version stores it: rows of 3072 bytes (R plane, G plane, B plane)."""
    return {"batch_label": "fake", "data": x.reshape(len(x), -1).numpy(), labels_key: y.tolist(),
            "filenames": [f"img{i}.png" for i in range(len(x))], **extra}


def cifar_checksums(monkeypatch, cls: type, folder: Path) -> None:
    """Make torchvision's md5 checks accept the fake files, by declaring the fake files' own md5s.

    ``CIFAR10.__init__`` refuses any file whose md5 differs from the one listed in the class attributes
    ``train_list``, ``test_list`` and ``meta``. We cannot forge files with the real checksums, so for the
    duration of a test we list the checksums of the files we wrote. The real check (``check_integrity``,
    reading and hashing every file) still runs, and a file changed afterwards still fails it.
    """
    for attr in ("train_list", "test_list"):
        monkeypatch.setattr(cls, attr, [[name, md5(folder / name)] for name, _ in getattr(cls, attr)])
    meta = dict(cls.meta, md5=md5(folder / cls.meta["filename"]))
    monkeypatch.setattr(cls, "meta", meta)


def write_cifar10(data_dir: Path, per_batch: int = 4, n_test: int = 6, seed: int = 2) -> FakeImages:
    """data_batch_1..5 (``per_batch`` images each), test_batch and batches.meta in DATA_DIR/cifar-10-batches-py/."""
    folder = data_dir / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for name, _ in datasets.CIFAR10.train_list:
        x, y = random_images(rng, per_batch, 3, 32, 32, 10)
        write_pickle(folder / name, cifar_batch(x, "labels", y, {}))
        xs.append(x), ys.append(y)
    test_x, test_y = random_images(rng, n_test, 3, 32, 32, 10)
    write_pickle(folder / "test_batch", cifar_batch(test_x, "labels", test_y, {}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return FakeImages("cifar10", str(data_dir), torch.cat(xs), torch.cat(ys), test_x, test_y, 10)


def write_cifar100(data_dir: Path, n_train: int = 10, n_test: int = 6, seed: int = 3) -> FakeImages:
    """train, test (fine and coarse labels) and meta in DATA_DIR/cifar-100-python/."""
    folder = data_dir / datasets.CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x, y = random_images(rng, n, 3, 32, 32, 100)
        coarse = {"coarse_labels": (y // 5).tolist()}
        write_pickle(folder / name, cifar_batch(x, "fine_labels", y, coarse))
        splits[name] = (x, y)
    write_pickle(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                   "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return FakeImages("cifar100", str(data_dir), *splits["train"], *splits["test"], 100)


@pytest.fixture
def cifar10_dir(tmp_path, monkeypatch) -> FakeImages:
    """20 training (5 batches of 4) and 6 test CIFAR-10-format images under ``tmp_path/data``; md5s declared."""
    fake = write_cifar10(tmp_path / "data")
    cifar_checksums(monkeypatch, datasets.CIFAR10, tmp_path / "data" / datasets.CIFAR10.base_folder)
    return fake


@pytest.fixture
def cifar100_dir(tmp_path, monkeypatch) -> FakeImages:
    """10 training and 6 test CIFAR-100-format images under ``tmp_path/data``; md5s declared."""
    fake = write_cifar100(tmp_path / "data")
    cifar_checksums(monkeypatch, datasets.CIFAR100, tmp_path / "data" / datasets.CIFAR100.base_folder)
    return fake


# -- ImageFolder trees ---------------------------------------------------------------------------------

def write_image_folder(root: Path, classes=("cat", "dog", "emu"), n_train: int = 4, n_val: int = 2,
                       size: tuple[int, int] = (8, 6), held_out: str = "val", seed: int = 4) -> FakeImages:
    """PNGs ROOT/train/CLASS/img_i.png and ROOT/<held_out>/CLASS/img_i.png, ``size`` = (W, H), RGB.

    PNG is lossless, so the expected tensors are exactly the pixels written; they are listed in
    ImageFolder's order (classes sorted, files sorted within a class).
    """
    rng = np.random.default_rng(seed)
    splits = []
    for split, n in (("train", n_train), (held_out, n_val)):
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)  # (H, W, C)
                Image.fromarray(pixels).save(root / split / cls / f"img_{i}.png")
                xs.append(torch.from_numpy(pixels).permute(2, 0, 1))
                ys.append(label)
        splits += [torch.stack(xs), torch.tensor(ys, dtype=torch.int64)]
    return FakeImages(f"imagefolder:{root}", str(root.parent), *splits, len(classes))


@pytest.fixture
def image_folder(tmp_path) -> FakeImages:
    """3 classes × (4 train + 2 val) RGB PNGs of 6 × 8 (H × W) pixels under ``tmp_path/images``."""
    return write_image_folder(tmp_path / "images")


# -- tensor files -------------------------------------------------------------------------------------

def write_tensor_file(path: Path, tensors: dict) -> None:
    """Write named tensors (torch or numpy) as .npz, .safetensors or .pt, chosen by the suffix of ``path``."""
    if path.suffix == ".npz":
        np.savez(path, **{k: np.asarray(v) for k, v in tensors.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(path))
    elif path.suffix in (".pt", ".pth"):
        torch.save({k: torch.as_tensor(v) for k, v in tensors.items()}, path)
    else:
        raise ValueError(f"unknown tensor file suffix {path.suffix!r}")


@pytest.fixture
def tensor_file_factory(tmp_path):
    """``make(suffix, **tensors) -> str``: a fresh file ``tmp_path/tensors_<i><suffix>`` holding ``tensors``.

    Example: ``make(".npz", x=torch.randn(8, 3), y=torch.arange(8) % 2)``.
    """
    count = [0]

    def make(suffix: str, **tensors) -> str:
        count[0] += 1
        path = tmp_path / f"tensors_{count[0]}{suffix}"
        write_tensor_file(path, tensors)
        return str(path)
    return make


# -- shared runs and settings -----------------------------------------------------------------------

TINY_TRAIN = ["--data", "teacher", "--n-train", "256", "--n-test", "128", "--batch-size", "32", "--width", "16",
              "--device", "cpu"]


@pytest.fixture(scope="module")
def one_thread():
    """The nets in these tests are tiny: one thread avoids thread-pool stalls on a busy machine.
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tiny trained runs on teacher data (256 train / 128 test examples, mlp 16x2): ``sgd`` (8 steps) and
    ``rsgd`` (2 replicas, 2 steps). Read-only: copy a run before changing it."""
    from clitools import invoke
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in (("sgd", ["--steps", "8"]), ("rsgd", ["--algo", "rsgd", "--replicas", "2", "--steps", "2"])):
            result = invoke("train", *extra, "--out", root / name, *TINY_TRAIN)
            assert result.exit_code == 0, result.stderr
    finally:
        torch.set_num_threads(threads)
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than ~40 s on a busy 2-core machine (deselect with -m 'not slow')")
