"""flatcli train / info end to end: run folders, reproducibility, resume, divergence, and every user mistake."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clitools import assert_user_error, invoke, same_tensors, weights

TINY = ["--data", "teacher", "--n-train", "256", "--n-test", "128", "--batch-size", "32", "--device", "cpu"]


def test_version_and_help():
    assert invoke("--version").stdout.strip().startswith("flatcli ")
    top = invoke("--help")
    assert top.exit_code == 0 and "train" in top.stdout and "info" in top.stdout
    for command in ("train", "info"):
        text = invoke(command, "--help").stdout
        assert "Example: flatcli " + command in " ".join(text.split())


def test_train_writes_a_self_describing_run(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--epochs", "2", "--out", out, *TINY)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # the human view goes to stderr
    assert str(out) in result.stderr
    for name in ("model.safetensors", "metrics.csv", "state.pt"):
        assert (out / name).is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:8] == ["epoch", "step", "lr", "train_loss", "train_error", "test_loss", "test_error", "seconds"]
    assert len(rows) == 3
    info = json.loads(invoke("info", out, "--evaluate", "--json").stdout)
    meta = info["metadata"]
    assert meta["algo"] == "sgd" and meta["model"]["name"] == "mlp" and meta["data"]["name"] == "teacher"
    assert meta["epoch"] == 2 and meta["complete"] and meta["version"]
    for key in ("train_error", "test_error"):  # the recorded errors are reproduced exactly from the file alone
        assert info["evaluation"][key] == meta["metrics"][key]
    for key in ("train_loss", "test_loss"):
        assert info["evaluation"][key] == pytest.approx(meta["metrics"][key], rel=1e-5)
    assert 0 < meta["metrics"]["test_error"] < 0.9  # below chance (10 classes) after 16 steps
    # the run's .safetensors file is self-describing too
    assert json.loads(invoke("info", out / "model.safetensors", "--json").stdout)["kind"] == "run"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert invoke("train", "--steps", "12", "--seed", seed, "--out", tmp_path / name, *TINY).exit_code == 0
    a, b, c = (weights(tmp_path / n / "model.safetensors") for n in "abc")
    assert same_tensors(a, b)
    assert not same_tensors(a, c)


@pytest.mark.parametrize("algo", ["sgd", "esgd", "rsgd"])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, algo):
    from flatcli.data import DataSpec, load_data
    from flatcli.models import ModelSpec
    from flatcli.training import Interrupted, Trainer, TrainConfig

    data = load_data(DataSpec(n_train=256, n_test=64))
    cfg = dict(algo=algo, epochs=3, batch_size=16, momentum=0.9, lr_schedule="cosine", langevin_steps=2,
               noise=1e-3, gamma_growth=1e-2, coupling_every=2)
    full = Trainer(TrainConfig(**cfg), data, ModelSpec(width=16), torch.device("cpu"), out=tmp_path / "full")
    full.run()
    part = Trainer(TrainConfig(**cfg), data, ModelSpec(width=16), torch.device("cpu"), out=tmp_path / "part")
    with pytest.raises(Interrupted):
        part.run(should_stop=lambda: part.step == 11)  # mid-epoch: 8 steps per epoch (16 for sgd, rsgd)
    resumed = Trainer.resume(tmp_path / "part", torch.device("cpu"))
    assert resumed.step == 11
    resumed.run()
    assert same_tensors(weights(tmp_path / "full" / "model.safetensors"), weights(tmp_path / "part" / "model.safetensors"))
    full_rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    part_rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:7]) for r in rows]  # all but the seconds
    assert strip(full_rows) == strip(part_rows)


def test_sigint_saves_state_and_exits_130_then_resume_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "flatcli", "train", "--epochs", "400", "--out", str(out), *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.csv").is_file() or not (out / "metrics.csv").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = torch.load(out / "state.pt", weights_only=True)
    assert 0 < state["step"] < 400 * 8
    result = invoke("train", "--resume", out, "--epochs", state["epoch"] + 1, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert json.loads(invoke("info", out, "--json").stdout)["metadata"]["complete"]


def test_divergence_stops_with_the_step_and_keeps_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--lr", "1e12", "--epochs", "3", "--out", out, *TINY)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the training loss became nan at step ") and "smaller learning rate" in last
    saved = weights(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("args, fragments", [
    (["--model", "nosuchnet"], ["nosuchnet", "mlp", "resnet18"]),
    (["--data", "nosuchdata"], ["nosuchdata", "teacher", "cifar10"]),
    (["--model", "lenet"], ["lenet"]),                    # flat teacher vectors do not fit a conv net
    (["--epochs", "0"], ["--epochs", "0"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--lr", "0"], ["--lr", "0"]),
    (["--lr", "-0.1"], ["--lr", "-0.1"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--algo", "adam"], ["adam", "sgd"]),
    (["--init", "missing.safetensors"], ["missing.safetensors", "does not exist"]),
    (["--resume", "nowhere"], ["nowhere"]),
])
def test_train_user_mistakes(tmp_path, args, fragments):
    assert_user_error(invoke("train", "--steps", "1", "--out", tmp_path / "r", *TINY, *args), *fragments)


def test_unwritable_out(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert_user_error(invoke("train", "--steps", "1", "--out", locked / "run", *TINY), "run")
    finally:
        locked.chmod(0o700)


def test_out_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(invoke("train", "--steps", "1", "--out", blocker / "run", *TINY), "--out")


@pytest.mark.parametrize("fixture", ["mnist_dir", "fashion_mnist_dir", "cifar10_dir", "cifar100_dir", "image_folder"])
def test_every_image_source_trains(tmp_path, request, fixture):
    images = request.getfixturevalue(fixture)
    model = "lenet" if images.train_x.shape[-1] >= 16 else "resnet20"
    out = tmp_path / "run"
    result = invoke("train", "--data", images.name, "--data-dir", images.data_dir, "--model", model, "--width", "16",
                    "--steps", "2", "--batch-size", "4", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    meta = json.loads(invoke("info", out, "--evaluate", "--json").stdout)
    assert meta["metadata"]["num_classes"] == images.num_classes
    assert meta["evaluation"]["train_error"] == meta["metadata"]["metrics"]["train_error"]


def test_torchvision_model_trains(tmp_path, cifar10_dir):
    result = invoke("train", "--data", cifar10_dir.name, "--data-dir", cifar10_dir.data_dir, "--model", "tv:resnet18",
                    "--steps", "2", "--batch-size", "4", "--out", tmp_path / "tv", "--device", "cpu")
    assert result.exit_code == 0, result.stderr


FACTORY = '''
import torch.nn as nn

def small(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, num_classes))

def two_outputs():
    return nn.Sequential(nn.Flatten(), nn.Linear(30, 2))
'''


def test_module_function_factory_trains_and_measures(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--model", "mynets:small", "--steps", "3", "--out", "run", *TINY)
    assert result.exit_code == 0, result.stderr
    # the run's own factory is imported again only when the user names it (metadata never imports code)
    assert_user_error(invoke("info", "run", "--json"), "mynets:small", "pass --model mynets:small")
    assert json.loads(invoke("info", "run", "--json", "--model", "mynets:small").stdout)["metadata"]["model"][
        "name"] == "mynets:small"
    # labels 0..9 of the teacher data do not fit a model with two outputs
    assert_user_error(invoke("train", "--model", "mynets:two_outputs", "--steps", "1", "--out", "r2", *TINY),
                      "out of range", "10 outputs")


def test_no_arguments_shows_help_and_no_empty_error():
    result = invoke()
    assert "Usage" in result.stdout + result.stderr and "error:" not in result.stderr
