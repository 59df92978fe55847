"""The shared loader: every checkpoint format, the refusal to unpickle, and clear mismatch errors."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from clitools import assert_user_error, invoke
from flatcli.data import DataSpec, load_data
from flatcli.models import ModelSpec, build_model

DATA = ["--data", "teacher", "--model", "mlp", "--width", "16"]


@pytest.fixture(scope="module")
def reference():
    """An mlp of width 16 for the default teacher data, and its error on the training set."""
    data = load_data(DataSpec())
    torch.manual_seed(0)
    model = build_model(ModelSpec(width=16), data.input_shape, data.num_outputs)
    from flatcli.training import evaluate_model
    return model, evaluate_model(model, data.train, "cross-entropy")


def evaluated(*args):
    result = invoke("info", *args, "--evaluate", "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["evaluation"]["train_error"]


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth", "nested-state_dict", "nested-model",
                                 "nested-model_state_dict", "ddp-prefix"])
def test_plain_state_dicts(tmp_path, reference, fmt):
    model, (_, error) = reference
    sd = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / ("w.pth" if fmt == "pth" else "w.pt")
        obj = sd
        if fmt.startswith("nested-"):
            obj = {fmt.split("-", 1)[1]: sd, "epoch": 7}
        elif fmt == "ddp-prefix":
            obj = {f"module.{k}": v for k, v in sd.items()}
        torch.save(obj, path)
    assert evaluated(path, *DATA) == error


def test_torchscript_archive(tmp_path, reference):
    model, (_, error) = reference
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    assert evaluated(path, "--data", "teacher") == error


class Boom:
    """Unpickling this creates a file: the loader must never do that unasked."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_objects_are_refused_without_trust(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": Boom(str(target))}, path)
    assert_user_error(invoke("info", path, *DATA), "pickle", "--trust-pickle")
    assert not target.exists()
    raw = tmp_path / "evil.pth"
    raw.write_bytes(pickle.dumps(Boom(str(target))))
    result = invoke("info", raw, *DATA)
    assert result.exit_code == 2 and not target.exists()


def test_pickled_module_needs_trust_pickle(tmp_path, reference):
    model, (_, error) = reference
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    assert_user_error(invoke("info", path, "--data", "teacher"), "--trust-pickle")
    assert evaluated(path, "--data", "teacher", "--trust-pickle") == error


def test_mismatch_names_the_keys(tmp_path, reference):
    model, _ = reference
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    result = invoke("info", path, "--data", "teacher", "--model", "mlp", "--width", "32")
    assert_user_error(result, "wrong shape", "net.0.weight" if "net.0.weight" in model.state_dict() else "weight")
    result = invoke("info", path, "--data", "teacher", "--model", "mlp", "--width", "16", "--depth", "3")
    assert_user_error(result, "missing")
    result = invoke("info", path, "--data", "teacher", "--model", "linear")
    assert_user_error(result, "unexpected")


def test_loader_mistakes(tmp_path, reference):
    model, _ = reference
    assert_user_error(invoke("info", tmp_path / "nope.pt", *DATA), "does not exist")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all\n")
    assert_user_error(invoke("info", text, *DATA), "notes.pt")
    good = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_user_error(invoke("info", cut, *DATA), "truncated")
    assert_user_error(invoke("info", good), "--model and --data")
    (tmp_path / "emptydir").mkdir()
    assert_user_error(invoke("info", tmp_path / "emptydir"), "not a flatcli run folder")


def test_replica_errors_on_plain_run(tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--data", "teacher", "--steps", "2", "--out", out, "--n-train", "128",
                  "--device", "cpu").exit_code == 0
    assert_user_error(invoke("info", out, "--replica", "0"), "not an rSGD run")
    assert_user_error(invoke("info", out, "--replica", "x"), "--replica")
