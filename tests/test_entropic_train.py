"""flatcli train --algo esgd|rsgd end to end: default data, tensor files, BatchNorm nets, replicas in the run."""
import json

import pytest
import torch

from clitools import assert_user_error, invoke, weights

TINY = ["--data", "teacher", "--n-train", "256", "--n-test", "64", "--batch-size", "32", "--device", "cpu"]


@pytest.mark.parametrize("algo", ["esgd", "rsgd"])
def test_default_data_end_to_end(tmp_path, algo):
    out = tmp_path / algo
    result = invoke("train", "--algo", algo, "--epochs", "2", "--out", out, *TINY)
    assert result.exit_code == 0, result.stderr
    meta = json.loads(invoke("info", out, "--json").stdout)["metadata"]
    assert meta["algo"] == algo and meta["complete"]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "gamma" in header
    if algo == "rsgd":
        for column in ("replica_distance", "center_train_error", "center_test_error",
                       "replicas_train_error", "replicas_test_error"):
            assert column in header
        assert meta["replicas"] == 3
        assert meta["step"] == 2 * (256 // 32)   # an epoch is one pass of every replica over the data
    else:
        L = meta["hyper"]["langevin_steps"]
        assert meta["step"] == 2 * ((256 // 32) // L)  # L minibatch gradients per outer step


def test_esgd_budget_matches_sgd_gradients(tmp_path):
    out = tmp_path / "e"
    assert invoke("train", "--algo", "esgd", "--langevin-steps", "4", "--epochs", "1", "--out", out, *TINY).exit_code == 0
    assert json.loads(invoke("info", out, "--json").stdout)["metadata"]["step"] == 8 // 4


@pytest.mark.parametrize("algo", ["esgd", "rsgd"])
def test_tensor_file_regression_and_classification(tmp_path, tensor_file_factory, algo):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g)
    path = tensor_file_factory(".npz", x=x, y=(x[:, 0] > 0).long(), x_test=x[:32], y_test=(x[:32, 0] > 0).long())
    assert invoke("train", "--algo", algo, "--data", path, "--steps", "4", "--batch-size", "16",
                  "--out", tmp_path / "c", "--device", "cpu").exit_code == 0
    reg = tensor_file_factory(".safetensors", x=x, y=x @ torch.ones(5))
    result = invoke("train", "--algo", algo, "--data", reg, "--model", "linear", "--steps", "4",
                    "--batch-size", "16", "--out", tmp_path / "r", "--device", "cpu", "--lr", "0.01")
    assert result.exit_code == 0, result.stderr
    assert json.loads(invoke("info", tmp_path / "r", "--json").stdout)["metadata"]["loss"] == "mse"


def test_rsgd_convnet_with_batchnorm_center_and_replicas(tmp_path, cifar10_dir):
    out = tmp_path / "bn"
    result = invoke("train", "--algo", "rsgd", "--replicas", "2", "--model", "convnet", "--width", "16",
                    "--data", cifar10_dir.name, "--data-dir", cifar10_dir.data_dir, "--steps", "3",
                    "--batch-size", "4", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    center = weights(out / "model.safetensors")
    replicas = weights(out / "replicas.safetensors")
    means = [k for k in center if k.endswith("running_mean")]
    assert means
    for k in means:  # BatchNorm statistics of the center are the replicas' average
        torch.testing.assert_close(center[k], (replicas[f"0.{k}"] + replicas[f"1.{k}"]) / 2)
    for k in center:
        if k.endswith("weight") and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(center[k], (replicas[f"0.{k}"] + replicas[f"1.{k}"]) / 2)
    one = json.loads(invoke("info", out, "--replica", "1", "--evaluate", "--json").stdout)
    assert one["evaluation"]["train_error"] >= 0
    assert_user_error(invoke("info", out, "--replica", "2"), "out of range", "0..1")


def test_esgd_convnet_with_batchnorm(tmp_path, cifar10_dir):
    result = invoke("train", "--algo", "esgd", "--langevin-steps", "2", "--model", "convnet", "--width", "16",
                    "--data", cifar10_dir.name, "--data-dir", cifar10_dir.data_dir, "--steps", "2",
                    "--batch-size", "4", "--out", tmp_path / "e", "--device", "cpu")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--algo", "esgd", "--alpha", "1"], "--alpha"),
    (["--algo", "esgd", "--langevin-lr", "-1"], "--langevin-lr"),
    (["--algo", "rsgd", "--replicas", "1"], "--replicas"),
    (["--algo", "rsgd", "--coupling-every", "0"], "--coupling-every"),
])
def test_entropic_user_mistakes(tmp_path, args, fragment):
    assert_user_error(invoke("train", "--steps", "1", "--out", tmp_path / "x", *TINY, *args), fragment)


def test_rsgd_batched_replicas_match_the_loop():
    """The vmapped all-replicas-at-once gradient (used on CUDA) gives the loop's steps, to float tolerance."""
    from flatcli.data import DataSpec, load_data
    from flatcli.models import ModelSpec
    from flatcli.training import Trainer, TrainConfig

    data = load_data(DataSpec(n_train=128, n_test=32))
    runs = []
    for batched in (False, True):
        t = Trainer(TrainConfig(algo="rsgd", replicas=3, steps=6, batch_size=16, momentum=0.9), data,
                    ModelSpec(width=16), torch.device("cpu"))
        t.algorithm.batched = batched
        t.run()
        runs.append([p.detach().clone() for m in t.algorithm.models for p in m.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
