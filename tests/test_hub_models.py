"""Checkpoints researchers already have: timm and Hugging Face models, Lightning .ckpt files, and --amp."""
import json
import sys

import numpy as np
import pytest
import torch

from clitools import assert_user_error, invoke

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, x=g.random((24, 3, 16, 16)).astype("float32"), y=g.integers(0, 3, 24),
             x_test=g.random((8, 3, 16, 16)).astype("float32"), y_test=g.integers(0, 3, 8))
    return path


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    net = transformers.ResNetForImageClassification(cfg).eval()
    net.save_pretrained(tmp_path / "hfres")
    return tmp_path / "hfres", net


def unperturbed(result) -> dict:
    rows = json.loads(result.stdout)["rows"]
    return next(r for r in rows if r["sigma"] == 0)


def test_hf_folder_is_measured_with_the_folders_own_weights(hf_folder, images):
    folder, net = hf_folder
    result = invoke("local-energy", folder, "--data", images, "--sigmas", "0,0.05", "--samples", "2", "--json", "-")
    assert result.exit_code == 0, result.stderr
    x, y = (torch.from_numpy(np.load(images)[k]) for k in ("x", "y"))
    with torch.no_grad():
        logits = net(pixel_values=x).logits
    expected = torch.nn.functional.cross_entropy(logits, y).item()
    row = unperturbed(result)
    assert row["loss_mean"] == pytest.approx(expected, rel=1e-5)
    assert row["error_mean"] == pytest.approx((logits.argmax(1) != y).float().mean().item())


def test_hf_model_trains_and_its_run_is_measured(hf_folder, images, tmp_path):
    folder, _ = hf_folder
    out = tmp_path / "run"
    result = invoke("train", "--model", f"hf:{folder}", "--data", images, "--steps", "2", "--batch-size", "8",
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(folder / "model.safetensors")).keys()
    result = invoke("local-energy", out, "--sigmas", "0,0.05", "--samples", "2", "--csv", "-")
    assert result.exit_code == 0, result.stderr


def test_hf_folder_that_needs_its_own_code_is_refused(hf_folder, images):
    folder, _ = hf_folder
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "evil.Net"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("open('pwned', 'w').close()\n")
    assert_user_error(invoke("local-energy", folder, "--data", images), "never runs code")
    assert not (folder / "pwned").exists()


def test_timm_resnet18_trains_and_is_measured(images, tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    result = invoke("train", "--model", "timm:resnet18", "--data", images, "--steps", "2", "--batch-size", "8",
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.stderr
    result = invoke("local-energy", out, "--sigmas", "0,0.01", "--samples", "1", "--max-examples", "8", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("checkpoint,split,sigma")


def test_timm_unknown_name_is_one_line(images, tmp_path):
    pytest.importorskip("timm")
    assert_user_error(invoke("train", "--model", "timm:resnet_nonesuch", "--data", images, "--steps", "1",
                             "--out", tmp_path / "r"), "timm has no model 'resnet_nonesuch'")


@pytest.mark.parametrize("model,extra", [("timm:resnet18", "timm"), ("hf:somewhere", "hf")])
def test_missing_optional_package_names_the_extra(monkeypatch, images, tmp_path, model, extra):
    monkeypatch.setitem(sys.modules, "timm" if extra == "timm" else "transformers", None)  # import fails
    assert_user_error(invoke("train", "--model", model, "--data", images, "--steps", "1", "--out", tmp_path / "r"),
                      f"pip install 'flatcli[{extra}]'")


def lightning_checkpoint(path, state, hyper):
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "hyper_parameters": hyper}, path)


def test_lightning_ckpt_loads_like_its_state_dict(runs, tmp_path):
    from safetensors.torch import load_file
    state = load_file(str(runs / "sgd" / "model.safetensors"))
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "epoch=3.ckpt"
    torch.save(state, plain)
    lightning_checkpoint(ckpt, state, {"lr": 0.1, "width": 16})
    args = ["--model", "mlp", "--width", "16", "--data", "teacher", "--sigmas", "0,0.1", "--samples", "3", "--csv", "-"]
    a, b = invoke("local-energy", plain, *args), invoke("local-energy", ckpt, *args)
    assert a.exit_code == 0 and b.exit_code == 0, b.stderr
    assert a.stdout.replace(str(plain), "X") == b.stdout.replace(str(ckpt), "X")


class Hyper:  # a hyper-parameter object Lightning pickles into the checkpoint
    pass


def test_lightning_ckpt_with_objects_needs_trust(runs, tmp_path):
    from safetensors.torch import load_file
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt, load_file(str(runs / "sgd" / "model.safetensors")), {"config": Hyper()})
    assert_user_error(invoke("local-energy", ckpt, "--model", "mlp", "--width", "16", "--data", "teacher"),
                      "--trust-pickle")


def test_amp_moves_local_energy_a_little(runs):
    """bfloat16 forwards: the same draws give nearly the same δε (recorded in the README)."""
    args = ["local-energy", runs / "sgd", "--sigmas", "0,0.05,0.2", "--samples", "4", "--json", "-"]
    full, amp = invoke(*args), invoke(*args, "--amp")
    assert full.exit_code == 0 and amp.exit_code == 0, amp.stderr
    a, b = (json.loads(r.stdout) for r in (full, amp))
    assert b["settings"]["amp"] is True and a["settings"]["amp"] is False
    for ra, rb in zip(a["rows"], b["rows"]):
        assert abs(ra["delta_error"] - rb["delta_error"]) < 0.02
        assert rb["loss_mean"] == pytest.approx(ra["loss_mean"], rel=0.02)
    assert any(ra["loss_mean"] != rb["loss_mean"] for ra, rb in zip(a["rows"], b["rows"]))  # bf16 did run
