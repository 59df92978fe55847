"""The built-in digits against their source (scikit-learn's load_digits, values copied here by hand), the
split's sizes, balance and seeding, the normalization, and `flatcli train --data digits` with no network."""
import hashlib
import socket
import tomllib
from pathlib import Path

import pytest
import torch

from clitools import invoke
from flatcli.checkpoint import read_checkpoint
from flatcli.data import DATA_NAMES, DataSpec, load_data
from flatcli.data import digits as D

pytestmark = pytest.mark.usefixtures("one_thread")

# sklearn.datasets.load_digits() (scikit-learn 1.9.1): class sizes, and the SHA-256 of data.astype(uint8).tobytes()
SOURCE_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
SOURCE_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
SOURCE_SUM = 561718  # data.sum()
# (index, label, row, the 8 pixels of that row) read from load_digits().images
SOURCE_ROWS = [
    (0, 0, 0, [0, 0, 5, 13, 9, 1, 0, 0]),
    (0, 0, 3, [0, 4, 12, 0, 0, 8, 8, 0]),
    (1, 1, 3, [0, 7, 15, 16, 16, 2, 0, 0]),
    (100, 4, 4, [0, 4, 16, 2, 9, 16, 8, 0]),
    (1796, 8, 6, [0, 8, 16, 10, 8, 16, 8, 0]),
]


def test_the_file_holds_sklearns_digits_exactly():
    x, y = D.read_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 16
    assert torch.bincount(y).tolist() == SOURCE_COUNTS
    assert int(x.sum()) == SOURCE_SUM
    assert hashlib.sha256(x.reshape(1797, 64).numpy().tobytes()).hexdigest() == SOURCE_SHA256
    for i, label, row, pixels in SOURCE_ROWS:
        assert int(y[i]) == label and x[i, 0, row].tolist() == pixels


def test_the_file_names_its_source_and_licence():
    import gzip
    with gzip.open(D.FILE, "rt") as f:
        head = f.readline() + f.readline()
    assert "UCI" in head and "CC BY 4.0" in head and "load_digits" in head


def test_split_sizes_shapes_and_that_it_partitions_the_images():
    data = load_data(DataSpec("digits"))
    assert (len(data.train), len(data.test)) == (1297, 500)
    assert data.input_shape == (1, 8, 8) and data.num_classes == data.num_outputs == 10 and not data.images
    train_idx, test_idx = D.split_indices(D.read_digits()[1], 0)
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    x, y = D.read_digits()
    assert torch.equal(data.train.x, x[train_idx]) and torch.equal(data.test.y, y[test_idx])


def test_the_split_is_stratified():
    # 500 · n_c / 1797, floors 49 50 49 50 50 50 50 49 48 50 (495); the 5 largest remainders
    # (.918 c3, .805 c7, .640 c1, .640 c5, .527 c0) get one more
    expected = [50, 51, 49, 51, 50, 51, 50, 50, 48, 50]
    for seed in (0, 7):
        data = load_data(DataSpec("digits", seed=seed))
        assert torch.bincount(data.test.y, minlength=10).tolist() == expected
        assert torch.bincount(data.train.y, minlength=10).tolist() == [n - t for n, t in zip(SOURCE_COUNTS, expected)]


def test_same_seed_same_split_another_seed_another():
    a, b, c = (load_data(DataSpec("digits", seed=s)) for s in (3, 3, 4))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.x, c.test.x)
    ia, ic = (set(D.split_indices(D.read_digits()[1], s)[1].tolist()) for s in (3, 4))
    assert 0 < len(ia & ic) < 500  # overlapping by chance (about 500²/1797 ≈ 140), not equal


def test_normalization_is_the_sets_own():
    data = load_data(DataSpec("digits"))
    x, _ = data.train.batch(torch.arange(len(data.train)))
    raw = data.train.x.double()
    expected = (raw / 16 - 0.3053) / 0.3760
    assert torch.allclose(x.double(), expected, atol=1e-6)
    assert float(x.max()) == pytest.approx((1 - 0.3053) / 0.3760, abs=1e-6)  # a pixel at level 16
    whole = (D.read_digits()[0].double() / 16)
    assert float(whole.mean()) == pytest.approx(D.MEAN, abs=5e-5)
    assert float(whole.std(unbiased=False)) == pytest.approx(D.STD, abs=5e-5)


def test_caps_take_nested_subsets():
    small, big = (load_data(DataSpec("digits", n_train=n, n_test=20)) for n in (100, 200))
    assert len(small.train) == 100 and len(small.test) == 20
    assert torch.equal(small.train.x, big.train.x[:100])


def test_digits_is_listed_and_shipped_as_package_data():
    assert "digits" in DATA_NAMES
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "data/digits.csv.gz" in pyproject["tool"]["setuptools"]["package-data"]["flatcli"]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("flatcli tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("data", [["--data", "digits"], []])  # named, and as the default
def test_train_on_digits_runs_offline_and_is_the_default(tmp_path, offline, data):
    out = tmp_path / "run"
    result = invoke("train", *data, "--steps", "3", "--batch-size", "32", "--width", "16", "--device", "cpu",
                    "--data-dir", tmp_path / "nothing-here", "--out", out)
    assert result.exit_code == 0, result.stderr
    meta = read_checkpoint(out).meta
    assert meta["data"]["name"] == "digits" and meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert "1297 examples" in result.stderr
