"""The data layer against oracles: the exact pixels and labels written by the fixtures (conftest.py) in each
real on-disk format, hand-computed normalization and statistics, and a per-example reference augmentation."""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import write_image_folder, write_tensor_file
from flatcli.data import DATA_NAMES, DataSpec, Split, augment_batch, channel_stats, load_data
from flatcli.errors import FlatcliError


def normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Reference normalization, in float64: (x / 255 − mean_c) / std_c."""
    mean = torch.as_tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).view(-1, 1, 1)
    return (x.double() / 255 - mean) / std


def reference_stats(x: torch.Tensor):
    """Per-channel mean and population std over (n, H, W) of x / 255, float64."""
    v = x.double() / 255
    return v.mean((0, 2, 3)), v.std((0, 2, 3), unbiased=False)


# -- DataSpec ------------------------------------------------------------------------------------------

def test_spec_to_dict_is_json_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = DataSpec("imagefolder:imgs", data_dir="sets", seed=3, n_train=10).to_dict()
    assert d == {"name": f"imagefolder:{tmp_path / 'imgs'}", "data_dir": str(tmp_path / "sets"), "seed": 3,
                 "n_train": 10, "n_test": None, "resize": None, "crop": None, "normalize": "data"}
    assert DataSpec.from_dict(json.loads(json.dumps(d))) == DataSpec(**d)
    assert DataSpec("set.npz").to_dict()["name"] == str(tmp_path / "set.npz")
    assert DataSpec("cifar10").to_dict()["name"] == "cifar10"


@pytest.mark.parametrize("bad", [
    "teacher", {"name": "teacher", "colour": 1}, {"seed": 0}, {"name": "teacher", "seed": -1},
    {"name": "teacher", "n_train": 0}, {"name": "teacher", "n_test": "5"}, {"name": 3},
])
def test_spec_from_dict_rejects_malformed(bad):
    with pytest.raises(FlatcliError):
        DataSpec.from_dict(bad)


# -- teacher --------------------------------------------------------------------------------------------

def test_teacher_defaults():
    data = load_data(DataSpec())
    assert data.train.x.shape == (4000, 30) and data.test.x.shape == (2000, 30)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.input_shape == (30,) and data.num_classes == data.num_outputs == 10 and not data.images
    assert data.train.mean is None and torch.equal(data.train.tensors()[0], data.train.x)
    counts = torch.bincount(data.train.y, minlength=10).float() / len(data.train)
    assert counts.min() > 0.07 and counts.max() < 0.13  # balanced classes: 0.1 ± sampling noise
    assert abs(float(data.train.x.mean())) < 0.02 and abs(float(data.train.x.std()) - 1) < 0.02  # N(0, I)


def test_teacher_is_learnable_but_not_trivially():
    """A least-squares linear classifier (closed form) ends well below chance (90%) and well above 0."""
    data = load_data(DataSpec(n_train=2000, n_test=1000))
    (x, y), (xt, yt) = data.train.tensors(), data.test.tensors()
    ones = torch.ones(len(x), 1)
    w = torch.linalg.lstsq(torch.cat([x, ones], 1), F.one_hot(y, 10).float()).solution
    test_error = float(((torch.cat([xt, torch.ones(len(xt), 1)], 1) @ w).argmax(1) != yt).float().mean())
    assert 0.08 < test_error < 0.4


def test_teacher_is_determined_by_the_seed():
    a, b, c = (load_data(DataSpec(seed=s, n_train=300, n_test=200)) for s in (5, 5, 6))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.allclose(a.train.x, c.train.x)
    assert float((a.train.y != c.train.y).float().mean()) > 0.5  # another teacher, not just other inputs


def test_teacher_sizes_are_nested_and_independent():
    small, large = load_data(DataSpec(n_train=100, n_test=50)), load_data(DataSpec(n_train=300, n_test=50))
    assert len(small.train) == 100 and len(small.test) == 50
    assert torch.equal(small.train.x, large.train.x[:100]) and torch.equal(small.train.y, large.train.y[:100])
    assert torch.equal(small.test.x, large.test.x) and torch.equal(small.test.y, large.test.y)


# -- Split ----------------------------------------------------------------------------------------------

def image_split(n=10, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 4, 5), generator=g, dtype=torch.uint8)
    return Split(x, torch.arange(n), torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1),
                 torch.tensor([0.1, 0.3, 0.25]).view(3, 1, 1))


def test_split_batch_normalizes_uint8_images():
    s = image_split()
    idx = torch.tensor([7, 2, 2])
    x, y = s.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 4, 5) and torch.equal(y, idx)
    torch.testing.assert_close(x.double(), normalized(s.x[idx], [0.2, 0.5, 0.7], [0.1, 0.3, 0.25]),
                               atol=1e-5, rtol=1e-5)
    xa, ya = s.tensors()
    torch.testing.assert_close(xa, s.batch(torch.arange(len(s)))[0], atol=0, rtol=0)
    assert torch.equal(ya, s.y)


def test_split_batch_keeps_float_features():
    x = torch.randn(6, 3)
    s = Split(x, torch.randn(6))
    xb, yb = s.batch(torch.tensor([4, 0]))
    assert torch.equal(xb, x[[4, 0]]) and torch.equal(yb, s.y[[4, 0]]) and len(s) == 6


def test_split_to_moves_everything():
    s = image_split().to("meta")
    assert {t.device.type for t in (s.x, s.y, s.mean, s.std)} == {"meta"}


def test_subset_is_seeded_nested_and_keeps_pairs():
    s = image_split(50)
    a = s.subset(10, torch.Generator().manual_seed(1))
    b = s.subset(10, torch.Generator().manual_seed(1))
    c = s.subset(10, torch.Generator().manual_seed(2))
    big = s.subset(20, torch.Generator().manual_seed(1))
    assert len(a) == 10 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)
    assert torch.equal(big.y[:10], a.y)
    assert torch.equal(a.x, s.x[a.y]) and len(set(a.y.tolist())) == 10  # y = row index: pairs intact, no repeats
    assert a.mean is s.mean and s.subset(50, torch.Generator()) is s and s.subset(99, torch.Generator()) is s
    with pytest.raises(FlatcliError):
        s.subset(0, torch.Generator())


def test_channel_stats_match_reference():
    x = image_split(7).x
    mean, std = channel_stats(x, chunk=3)  # several chunks
    ref_mean, ref_std = reference_stats(x)
    assert mean.shape == std.shape == (3, 1, 1)
    torch.testing.assert_close(mean.flatten().double(), ref_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(std.flatten().double(), ref_std, atol=1e-6, rtol=0)
    _, flat_std = channel_stats(torch.full((2, 1, 3, 3), 9, dtype=torch.uint8))
    assert float(flat_std) == pytest.approx(1 / 255)


# -- torchvision sets --------------------------------------------------------------------------------------

USUAL_STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,)),
               "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


@pytest.mark.parametrize("fixture", ["mnist_dir", "fashion_mnist_dir", "cifar10_dir", "cifar100_dir"])
def test_torchvision_sets_read_exact_pixels(fixture, request):
    fake = request.getfixturevalue(fixture)
    data = load_data(fake.spec(), download=False)
    for split, x, y in ((data.train, fake.train_x, fake.train_y), (data.test, fake.test_x, fake.test_y)):
        assert split.x.dtype == torch.uint8 and torch.equal(split.x, x)
        assert split.y.dtype == torch.int64 and torch.equal(split.y, y)
    channels = 1 if "mnist" in fake.name else 3
    assert data.input_shape == ((1, 28, 28) if channels == 1 else (3, 32, 32))
    assert data.num_classes == data.num_outputs == fake.num_classes
    assert data.images == (channels == 3)
    mean, std = USUAL_STATS[fake.name]
    x, y = data.train.batch(torch.tensor([1, 0]))
    torch.testing.assert_close(x.double(), normalized(fake.train_x[[1, 0]], mean, std), atol=1e-5, rtol=1e-5)


def test_torchvision_sets_do_not_download_when_files_exist(mnist_dir, monkeypatch):
    """With the files in place, torchvision never calls its downloader, even when download=True."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_download)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_download)
    for download in (False, True):
        assert len(load_data(mnist_dir.spec(), download=download).train) == 12


def test_cifar_download_skipped_when_files_exist(cifar10_dir, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))
    assert len(load_data(cifar10_dir.spec(), download=True).test) == 6


def test_torchvision_caps_take_a_seeded_subset(cifar10_dir):
    a = load_data(cifar10_dir.spec(n_train=7, n_test=3, seed=1), download=False)
    b = load_data(cifar10_dir.spec(n_train=7, n_test=3, seed=1), download=False)
    c = load_data(cifar10_dir.spec(n_train=7, n_test=3, seed=2), download=False)
    assert len(a.train) == 7 and len(a.test) == 3
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    for img, label in zip(a.train.x, a.train.y):  # each kept image is a written one, with its own label
        rows = (cifar10_dir.train_x == img).flatten(1).all(1).nonzero().flatten()
        assert len(rows) == 1 and cifar10_dir.train_y[rows[0]] == label


@pytest.mark.parametrize("name, files", [
    ("mnist", ["MNIST", "raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("fashion-mnist", ["FashionMNIST", "raw", "train-labels-idx1-ubyte"]),
    ("cifar10", ["cifar-10-batches-py", "data_batch_5", "test_batch", "batches.meta", "cifar-10-python.tar.gz"]),
    ("cifar100", ["cifar-100-python", "train", "meta", "cifar-100-python.tar.gz"]),
])
def test_missing_torchvision_set_says_where_to_put_which_files(name, files, tmp_path):
    with pytest.raises(FlatcliError) as e:
        load_data(DataSpec(name, data_dir=str(tmp_path / "nowhere")), download=False)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and all(f in msg for f in files) and "downloading is off" in msg


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(FlatcliError) as e:
        load_data(DataSpec("cifar10", data_dir=str(tmp_path)), download=True)
    assert "download failed" in str(e.value) and "no network" in str(e.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(e.value)


def test_corrupt_cifar_file_fails_the_md5_check(cifar10_dir):
    path = os.path.join(cifar10_dir.data_dir, "cifar-10-batches-py", "data_batch_3")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(FlatcliError, match="not found or corrupt"):
        load_data(cifar10_dir.spec(), download=False)


def test_truncated_mnist_file_is_a_user_error(mnist_dir):
    path = os.path.join(mnist_dir.data_dir, "MNIST", "raw", "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FlatcliError, match="mnist not found or corrupt"):
        load_data(mnist_dir.spec(), download=False)


# -- image folders -----------------------------------------------------------------------------------------

def test_image_folder_reads_exact_pixels_and_train_stats(image_folder):
    data = load_data(image_folder.spec())
    assert torch.equal(data.train.x, image_folder.train_x) and torch.equal(data.train.y, image_folder.train_y)
    assert torch.equal(data.test.x, image_folder.test_x) and torch.equal(data.test.y, image_folder.test_y)
    assert data.input_shape == (3, 6, 8) and data.num_classes == 3 and data.images
    mean, std = reference_stats(image_folder.train_x)
    torch.testing.assert_close(data.test.mean.flatten().double(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(data.test.std.flatten().double(), std, atol=1e-6, rtol=0)
    x, _ = data.test.batch(torch.tensor([3]))
    torch.testing.assert_close(x.double(), normalized(image_folder.test_x[[3]], mean, std), atol=1e-5, rtol=1e-5)


def test_image_folder_test_subfolder_and_resizing(tmp_path):
    fake = write_image_folder(tmp_path / "imgs", held_out="test")
    odd = tmp_path / "imgs" / "test" / "dog" / "img_9.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 11, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(odd)
    data = load_data(fake.spec())
    assert len(data.test) == len(fake.test_x) + 1 and data.test.x.shape[1:] == (3, 6, 8)
    expected = np.array(Image.fromarray(pixels).resize((8, 6), Image.BILINEAR))  # (H, W, C)
    row = int((data.test.y == 1).nonzero()[-1])  # last file of class "dog", in sorted order
    assert torch.equal(data.test.x[row], torch.from_numpy(expected).permute(2, 0, 1))


def test_image_folder_errors(tmp_path, image_folder):
    root = image_folder.name.split(":", 1)[1]
    with pytest.raises(FlatcliError, match="does not exist"):
        load_data(DataSpec(f"imagefolder:{tmp_path / 'absent'}"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FlatcliError, match="val/"):
        load_data(DataSpec(f"imagefolder:{tmp_path / 'only_train'}"))
    os.rename(os.path.join(root, "val", "emu"), os.path.join(root, "val", "owl"))
    with pytest.raises(FlatcliError, match=r"only in train: \['emu'\], only in val: \['owl'\]"):
        load_data(image_folder.spec())
    os.rename(os.path.join(root, "val", "owl"), os.path.join(root, "val", "emu"))
    for f in os.listdir(os.path.join(root, "val", "emu")):
        os.remove(os.path.join(root, "val", "emu", f))
    with pytest.raises(FlatcliError, match="no images found"):
        load_data(image_folder.spec())


def test_image_folder_corrupt_image(image_folder):
    root = image_folder.name.split(":", 1)[1]
    bad = os.path.join(root, "train", "dog", "img_1.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(FlatcliError, match="img_1.png"):
        load_data(image_folder.spec())


# -- tensor files -----------------------------------------------------------------------------------------

SUFFIXES = [".npz", ".safetensors", ".pt"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tensor_file_classification(suffix, tensor_file_factory):
    x, xt = torch.randn(8, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    y, yt = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0]), torch.tensor([6, 0, 1, 2])  # the largest label only in test
    data = load_data(DataSpec(tensor_file_factory(suffix, x=x, y=y, x_test=xt, y_test=yt)))
    assert data.train.x.dtype == torch.float32 and torch.equal(data.train.x, x.float())
    assert data.train.y.dtype == torch.int64 and torch.equal(data.train.y, y) and torch.equal(data.test.y, yt)
    assert data.num_classes == data.num_outputs == 7 and data.input_shape == (5,) and not data.images


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tensor_file_regression_without_test(suffix, tensor_file_factory):
    one = load_data(DataSpec(tensor_file_factory(suffix, x=torch.randn(6, 2), y=torch.randn(6))))
    assert one.test is None and one.num_classes is None and one.num_outputs == 1
    assert one.train.y.dtype == torch.float32 and one.train.y.shape == (6,)
    wide = load_data(DataSpec(tensor_file_factory(suffix, x=torch.randn(6), y=torch.randn(6, 3, dtype=torch.float64))))
    assert wide.num_outputs == 3 and wide.input_shape == (1,) and wide.train.y.dtype == torch.float32


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tensor_file_uint8_images(suffix, tensor_file_factory):
    s = image_split(9)
    path = tensor_file_factory(suffix, x=s.x[:6], y=s.y[:6], x_test=s.x[6:], y_test=s.y[6:])
    data = load_data(DataSpec(path, n_train=4))
    assert data.images and data.input_shape == (3, 4, 5) and data.train.x.dtype == torch.uint8
    mean, std = reference_stats(s.x[:6])  # from all training images, before the cap
    x, _ = data.test.batch(torch.tensor([2]))
    torch.testing.assert_close(x.double(), normalized(s.x[[8]], mean, std), atol=1e-5, rtol=1e-5)
    assert len(data.train) == 4 and len(data.test) == 3


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("tensors, problem", [
    ({"x": torch.randn(4, 2)}, "missing \\['y'\\]"),
    ({"x": torch.randn(4, 2), "y": torch.zeros(4, dtype=torch.int64), "x_test": torch.randn(2, 2)},
     "only one of x_test, y_test"),
    ({"x": torch.randn(4, 2), "y": torch.zeros(4, dtype=torch.int64), "labels": torch.zeros(4)}, "unexpected keys"),
    ({"x": torch.randn(4, 2), "y": torch.zeros(3, dtype=torch.int64)}, "do not match"),
    ({"x": torch.randn(4, 2), "y": torch.tensor([0, 1, -1, 0])}, "class labels"),
    ({"x": torch.randn(4, 2), "y": torch.zeros(4, 2, dtype=torch.int64)}, "class labels"),
    ({"x": torch.randn(4, 2), "y": torch.zeros(4, dtype=torch.int64), "x_test": torch.randn(2, 3),
      "y_test": torch.zeros(2, dtype=torch.int64)}, "do not match the training data"),
])
def test_tensor_file_content_errors(suffix, tensors, problem, tensor_file_factory):
    path = tensor_file_factory(suffix, **tensors)
    with pytest.raises(FlatcliError, match=problem) as e:
        load_data(DataSpec(path))
    assert path in str(e.value)
    if "label" not in problem and "training data" not in problem:  # the key problems name the keys expected
        assert "keys x, y and optionally x_test, y_test" in str(e.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_tensor_file(suffix, tensor_file_factory):
    path = tensor_file_factory(suffix, x=torch.randn(50, 4), y=torch.zeros(50, dtype=torch.int64))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(FlatcliError, match="cannot read data file"):
        load_data(DataSpec(path))


class NotATensor:
    pass


def test_tensor_files_never_unpickle_objects(tmp_path):
    pt = tmp_path / "objects.pt"
    torch.save({"x": torch.randn(3, 2), "y": NotATensor()}, pt)
    with pytest.raises(FlatcliError, match="cannot read data file"):
        load_data(DataSpec(str(pt)))
    npz = tmp_path / "objects.npz"
    np.savez(npz, x=np.zeros((3, 2)), y=np.array([{"a": 1}, None, 3], dtype=object))
    with pytest.raises(FlatcliError, match="cannot read data file"):
        load_data(DataSpec(str(npz)))
    strings = tmp_path / "strings.npz"
    np.savez(strings, x=np.zeros((3, 2)), y=np.array(["a", "b", "c"]))
    with pytest.raises(FlatcliError, match="not numbers"):
        load_data(DataSpec(str(strings)))


@pytest.mark.parametrize("content, kind", [([torch.zeros(2)], "list"), ({"x": torch.zeros(2), "y": 3}, "dict")])
def test_pt_file_must_hold_a_dict_of_tensors(content, kind, tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(FlatcliError, match=f"holds a {kind}, not a dict of tensors"):
        load_data(DataSpec(str(path)))


def test_missing_tensor_file_and_unknown_names(tmp_path):
    with pytest.raises(FlatcliError, match="does not exist"):
        load_data(DataSpec(str(tmp_path / "absent.npz")))
    with pytest.raises(FlatcliError) as e:
        load_data(DataSpec("imagenet"))
    assert all(name in str(e.value) for name in DATA_NAMES) and "imagefolder:PATH" in str(e.value)
    with pytest.raises(FlatcliError, match="use imagefolder:"):
        load_data(DataSpec(str(tmp_path)))


def test_load_data_rejects_bad_sizes():
    with pytest.raises(FlatcliError, match="n_train"):
        load_data(DataSpec(n_train=0))


def test_write_tensor_file_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError):
        write_tensor_file(tmp_path / "t.csv", {"x": torch.zeros(1)})


# -- augment_batch ------------------------------------------------------------------------------------------

def reference_augment(x: torch.Tensor, seed: int, pad: int, mode: str) -> torch.Tensor:
    """One image at a time with numpy's padding and plain slicing, replaying augment_batch's documented draws."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = []
    for i in range(b):
        np_mode = "reflect" if mode == "reflect" else "constant"
        img = np.pad(x[i].numpy(), ((0, 0), (pad, pad), (pad, pad)), mode=np_mode)
        crop = img[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(torch.from_numpy(np.ascontiguousarray(crop[:, :, ::-1] if flip[i] else crop)))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("pad", [0, 1, 4])
def test_augment_matches_per_image_reference(mode, pad):
    x = torch.randn(40, 3, 6, 7)
    out = augment_batch(x, torch.Generator().manual_seed(11), pad=pad, padding_mode=mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_augment(x, 11, pad, mode))


def test_augment_flip_really_flips():
    x = torch.randn(64, 3, 5, 5)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)
    assert 16 < int(mirrored.sum()) < 48  # about half, and both occur


def test_augment_crop_shifts_content():
    x = torch.arange(36.0).view(1, 1, 6, 6).repeat(1000, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2, padding_mode="zeros")
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) == 2 * 25  # every offset in {0..4}² and both flips, over 1000 draws


def test_augment_is_reproducible_and_resumable():
    x = torch.randn(16, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    first, second = augment_batch(x, g), augment_batch(x, g)
    g.set_state(state)
    assert torch.equal(augment_batch(x, g), first) and torch.equal(augment_batch(x, g), second)
    assert not torch.equal(first, second)
    assert not torch.equal(augment_batch(x, torch.Generator().manual_seed(4)), first)
    with pytest.raises(ValueError):
        augment_batch(x, g, padding_mode="circular")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_and_batches_on_cuda():
    s = image_split(20).to("cuda")
    x, y = s.batch(torch.tensor([3, 1]))
    assert x.device.type == "cuda" and y.device.type == "cuda"
    g = torch.Generator(device="cuda").manual_seed(0)
    state = g.get_state()
    out = augment_batch(x, g)
    g.set_state(state)
    dy = torch.randint(0, 9, (2,), generator=g, device="cuda")
    dx = torch.randint(0, 9, (2,), generator=g, device="cuda")
    flip = torch.rand(2, generator=g, device="cuda") < 0.5
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(2):
        crop = padded[i, :, dy[i]:dy[i] + 4, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    sub = s.subset(5, torch.Generator(device="cuda").manual_seed(0))
    assert len(sub) == 5 and sub.x.device.type == "cuda"
