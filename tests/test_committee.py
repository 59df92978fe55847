"""The committee machine model (``committee:K[:binary]``) and binary tasks from any data (``--classes A,B``)."""
import math

import pytest
import torch

from clitools import assert_user_error, invoke, weights
from flatcli.data import DataSpec, load_data
from flatcli.data.core import parse_classes
from flatcli.errors import FlatcliError
from flatcli.models import ModelSpec, build_model
from flatcli.models.committee import SHARPNESS, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spec_parsing_and_mistakes():
    assert parse_spec("committee:3") == (3, False) and parse_spec("committee:1:binary") == (1, True)
    for bad in ("committee:2", "committee:0", "committee:x", "committee:3:ternary", "committee:3:binary:1"):
        with pytest.raises(FlatcliError):
            parse_spec(bad)
    with pytest.raises(FlatcliError, match="--classes"):
        build_model(ModelSpec("committee:3"), (5,), 10)


def test_eval_is_the_sign_network_and_train_the_documented_surrogate():
    model = build_model(ModelSpec("committee:3"), (4, 2), 2, seed=1)
    assert [n for n, _ in model.named_parameters()] == ["weight"] and model.weight.shape == (3, 8)
    x = torch.randn(50, 4, 2)
    w, flat = model.weight.detach(), x.flatten(1)
    vote = torch.sign(torch.sign(flat @ w.T).sum(1))                       # σ̂(W, x), by hand
    assert torch.equal(model.eval()(x), torch.stack((-vote, vote), 1))
    surrogate = torch.tanh(SHARPNESS * (flat @ w.T) / w.norm(dim=1)).sum(1)
    torch.testing.assert_close(model.train()(x)[:, 1], surrogate)
    model.weight.data *= 7.0  # sign units are scale-free: neither mode changes
    torch.testing.assert_close(model(x)[:, 1], surrogate)


def test_binary_weights_are_signs_at_evaluation_and_clipped_latents_in_training():
    model = build_model(ModelSpec("committee:1:binary"), (6,), 2, seed=0)
    model.weight.data = torch.tensor([[0.3, -2.0, 1.5, -0.1, 0.7, -0.6]])
    x = torch.randn(20, 6)
    s = torch.sign(x @ torch.sign(model.weight.detach()).T).squeeze(1)
    assert torch.equal(model.eval()(x)[:, 1], s)
    clipped = model.weight.detach().clamp(-1, 1)
    out = model.train()(x)[:, 1]
    torch.testing.assert_close(out, torch.tanh(SHARPNESS * (x @ clipped.T).squeeze(1) / math.sqrt(6)))
    out.sum().backward()  # straight-through: the weight at −2 (clipped) still gets its gradient
    assert model.weight.grad[0, 1] != 0


def test_classes_select_and_relabel(tensor_file_factory):
    x, y = torch.arange(12.0).view(12, 1), torch.tensor([0, 1, 2, 3] * 3)
    path = tensor_file_factory(".npz", x=x, y=y, x_test=x[:4], y_test=y[:4])
    data = load_data(DataSpec(path, classes=(3, 1)))
    assert data.num_classes == 2 and data.num_outputs == 2
    assert data.train.x.flatten().tolist() == [1, 3, 5, 7, 9, 11] and data.train.y.tolist() == [1, 0] * 3
    assert data.test.y.tolist() == [1, 0]
    assert DataSpec.from_dict(DataSpec(path, classes=(3, 1)).to_dict() | {"classes": [3, 1]}).classes == (3, 1)
    assert parse_classes(" 0, 7") == (0, 7) and parse_classes(None) is None
    for bad in ("1", "1,1", "a,b", "1,2,3", "-1,2", "01,1"):
        with pytest.raises(FlatcliError):
            parse_classes(bad)
    with pytest.raises(FlatcliError, match="0..3"):
        load_data(DataSpec(path, classes=(0, 4)))


def test_train_and_measure_a_committee_on_two_teacher_classes(tmp_path):
    for algo in ("sgd", "esgd", "rsgd"):
        out = tmp_path / algo
        result = invoke("train", "--model", "committee:3", "--data", "teacher", "--classes", "0,1", "--n-train", "200",
                        "--n-test", "50", "--steps", "3", "--algo", algo, "--out", out)
        assert result.exit_code == 0, result.stderr
        assert weights(out / "model.safetensors")["weight"].shape == (3, 30)
    csv = tmp_path / "e.csv"
    result = invoke("local-energy", tmp_path / "sgd", "--sigmas", "0.1", "--samples", "2", "--csv", csv)
    assert result.exit_code == 0, result.stderr
    assert_user_error(invoke("train", "--model", "committee:3", "--steps", "1", "--out", tmp_path / "x"),
                      "--classes")
    assert_user_error(invoke("train", "--model", "committee:4", "--classes", "0,1", "--steps", "1",
                             "--out", tmp_path / "y"), "odd")
    assert_user_error(invoke("local-energy", tmp_path / "sgd", "--classes", "0,10"), "--classes", "0..9")
