"""The model registry: shapes, exact parameter counts, seeding, torchvision and user factories, user errors."""
import json
import sys
import textwrap
import uuid

import pytest
import torch
import torchvision
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.models import MODEL_NAMES, ModelSpec, build_model, check_fits, count_parameters
from flatcli.models.resnet import PadShortcut

MNIST, CIFAR, FLAT = (1, 28, 28), (3, 32, 32), (784,)
IMAGE_NAMES = ("lenet", "convnet", "resnet20", "resnet110", "resnet18")


def build(name, shape, k=10, **size):
    return build_model(ModelSpec(name, **size), shape, k)


def out_shape(model, shape):
    with torch.no_grad():
        return tuple(model.eval()(torch.randn(2, *shape)).shape)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["linear", "mlp"])
@pytest.mark.parametrize("shape", [FLAT, (5,), MNIST, CIFAR])
def test_flat_models_take_any_shape(name, shape):
    model = build(name, shape, 7)
    assert out_shape(model, shape) == (2, 7)
    check_fits(model, shape, 7)


@pytest.mark.parametrize("name", IMAGE_NAMES)
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_image_models_output_shape(name, shape):
    model = build(name, shape, 10)
    assert out_shape(model, shape) == (2, 10)
    check_fits(model, shape, 10)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "convnet"])
def test_resnets_and_convnet_take_any_channel_count_and_small_images(name):
    shape = (5, 8, 8)
    assert out_shape(build(name, shape, 3), shape) == (2, 3)


# ---------------------------------------------------------------- parameter counts, by hand


def test_linear_parameter_count():
    # W: 10 x 784, b: 10
    assert count_parameters(build("linear", MNIST)) == 784 * 10 + 10 == 7850
    assert count_parameters(build("linear", (20,), 3)) == 20 * 3 + 3


def test_mlp_parameter_count():
    # 784 → 128 → 128 → 10, each layer with bias
    assert count_parameters(build("mlp", MNIST)) == (784 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10) == 118282
    assert count_parameters(build("mlp", (20,), 3, width=7, depth=3)) == (20 * 7 + 7) + 2 * (7 * 7 + 7) + (7 * 3 + 3)
    assert count_parameters(build("mlp", (20,), 3, depth=0)) == 20 * 3 + 3


def test_lenet_parameter_count():
    conv2, fc2 = 50 * 20 * 25 + 50, 500 * 10 + 10
    # 28 → conv5 24 → pool 12 → conv5 8 → pool 4: 50·4·4 = 800 features
    assert count_parameters(build("lenet", MNIST)) == (20 * 1 * 25 + 20) + conv2 + (800 * 500 + 500) + fc2 == 431080
    # 32 → 28 → 14 → 10 → 5: 50·5·5 = 1250 features
    assert count_parameters(build("lenet", CIFAR)) == (20 * 3 * 25 + 20) + conv2 + (1250 * 500 + 500) + fc2 == 657080


def test_convnet_parameter_count():
    # convs 3x3 without bias, BatchNorm weight + bias per channel, 32/64/128 channels at width 128
    convs = 3 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9
    bns = 2 * (32 + 64 + 128)
    assert count_parameters(build("convnet", CIFAR)) == convs + bns + 128 * 10 + 10 == 94762
    small = build("convnet", CIFAR, width=16)  # 4/8/16 channels
    assert count_parameters(small) == (3 * 4 + 4 * 8 + 8 * 16) * 9 + 2 * (4 + 8 + 16) + 16 * 10 + 10


def cifar_resnet_count(n, c_in=3, k=10):
    """He et al.'s 6n+2 ResNet with option-A (parameter-free) shortcuts, counted layer by layer."""
    def block(a, b):  # two 3x3 convs without bias, two BatchNorms
        return a * b * 9 + b * b * 9 + 4 * b
    stem = c_in * 16 * 9 + 2 * 16
    stages = sum(block(a, b) + (n - 1) * block(b, b) for a, b in [(16, 16), (16, 32), (32, 64)])
    return stem + stages + 64 * k + k


def resnet18_count(c_in=3, k=10):
    """CIFAR ResNet-18 with option-B shortcuts (1x1 conv + BN where the shape changes)."""
    def block(a, b):
        return a * b * 9 + b * b * 9 + 4 * b
    def proj(a, b):
        return a * b + 2 * b
    stem = c_in * 64 * 9 + 2 * 64
    stages = sum(block(a, b) + block(b, b) + (proj(a, b) if a != b else 0)
                 for a, b in [(64, 64), (64, 128), (128, 256), (256, 512)])
    return stem + stages + 512 * k + k


def test_resnet_parameter_counts():
    assert cifar_resnet_count(3) == 269722            # the paper's "0.27M"
    assert cifar_resnet_count(18) == 1727962          # "1.7M"
    assert resnet18_count() == 11173962               # "11.2M"
    assert count_parameters(build("resnet20", CIFAR)) == cifar_resnet_count(3)
    assert count_parameters(build("resnet110", CIFAR)) == cifar_resnet_count(18)
    assert count_parameters(build("resnet18", CIFAR)) == resnet18_count()
    assert count_parameters(build("resnet20", MNIST, 4)) == cifar_resnet_count(3, c_in=1, k=4)
    assert count_parameters(build("resnet18", MNIST, 4)) == resnet18_count(c_in=1, k=4)


@pytest.mark.parametrize("name,depth", [("resnet20", 20), ("resnet110", 110)])
def test_cifar_resnet_has_6n_plus_2_weighted_layers(name, depth):
    model = build(name, CIFAR)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == depth   # option A: no projection convolutions
    assert [m.out_channels for m in layers if isinstance(m, nn.Conv2d)][-1] == 64


# ---------------------------------------------------------------- forward against hand-written references


def test_mlp_forward_matches_reference():
    torch.manual_seed(0)
    model = build("mlp", (2, 3), 4, width=5, depth=2)
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in model if isinstance(m, nn.Linear)]
    x = torch.randn(6, 2, 3)
    h = torch.relu(x.reshape(6, 6) @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    torch.testing.assert_close(model(x), h @ w3.T + b3, rtol=1e-6, atol=1e-6)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)   # ⌈7/2⌉ = 4, as a 3x3 stride-2 padding-1 convolution gives
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 16:]) == 0


# ---------------------------------------------------------------- seeding


@pytest.mark.parametrize("name", ["mlp", "lenet", "convnet", "resnet20", "tv:resnet18"])
def test_same_seed_same_weights(name):
    shape = MNIST
    torch.manual_seed(3)
    a = build(name, shape).state_dict()
    torch.manual_seed(3)
    b = build(name, shape).state_dict()
    torch.manual_seed(4)
    c = build(name, shape).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a if a[key].is_floating_point())


def test_seed_argument_matches_global_seed_and_leaves_global_rng_alone():
    torch.manual_seed(11)
    expected = build("lenet", MNIST).state_dict()
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    got = build_model(ModelSpec("lenet"), MNIST, 10, seed=11).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


# ---------------------------------------------------------------- torchvision


def test_tv_resnet18_with_num_classes():
    model = build("tv:resnet18", CIFAR, 7)
    assert isinstance(model, torchvision.models.ResNet)
    assert out_shape(model, CIFAR) == (2, 7)
    assert count_parameters(model) == count_parameters(torchvision.models.resnet18(num_classes=7))


def test_tv_first_conv_adapted_to_channels():
    model = build("tv:resnet18", MNIST, 10)
    assert model.conv1.in_channels == 1
    assert (model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride) == (64, (7, 7), (2, 2))
    assert count_parameters(model) == 11181642 - 64 * 2 * 7 * 7   # torchvision's 3-channel count minus 2 channels
    check_fits(model, MNIST, 10)


def test_tv_unknown_name():
    with pytest.raises(FlatcliError, match="doesnotexist") as err:
        build("tv:doesnotexist", CIFAR)
    assert "resnet18" in str(err.value)   # the fix lists what exists


def test_tv_on_flat_vectors():
    with pytest.raises(FlatcliError, match=r"needs images .*flat vectors"):
        build("tv:resnet18", FLAT)


# ---------------------------------------------------------------- module:function


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a uniquely named module into tmp_path, chdir there, and forget it after the test."""
    name = f"usernets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from torch import nn

        def with_classes(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))

        def with_kwargs(**kwargs):
            return nn.Linear(4, kwargs["num_classes"])

        def fixed():
            return nn.Linear(4, 3)

        class Net(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.fc = nn.Linear(4, num_classes)

            def forward(self, x):
                return self.fc(x)

        def needs_hidden(hidden, num_classes=10):
            return nn.Linear(hidden, num_classes)

        def boom():
            raise RuntimeError("kaboom")

        def not_a_module():
            return 3

        NOT_CALLABLE = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def test_user_factory_with_num_classes(user_module):
    path_before = list(sys.path)
    model = build(f"{user_module}:with_classes", (4,), 6)
    assert out_shape(model, (4,)) == (2, 6)
    check_fits(model, (4,), 6)
    assert sys.path == path_before   # the current directory was on sys.path only for the import
    assert out_shape(build(f"{user_module}:with_kwargs", (4,), 5), (4,)) == (2, 5)
    assert out_shape(build(f"{user_module}:Net", (4,), 2), (4,)) == (2, 2)


def test_user_factory_without_num_classes(user_module):
    model = build(f"{user_module}:fixed", (4,), 3)
    assert out_shape(model, (4,)) == (2, 3)
    with pytest.raises(FlatcliError, match=r"need 10 outputs but model Linear has 3: labels 3..9 are out of range"):
        check_fits(model, (4,), 10)


def test_user_factory_same_seed_same_weights(user_module):
    a = build_model(ModelSpec(f"{user_module}:with_classes"), (4,), 3, seed=5).state_dict()
    b = build_model(ModelSpec(f"{user_module}:with_classes"), (4,), 3, seed=5).state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("target,pattern", [
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz'.*No module named"),
    ("{m}:missing", r"has no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", r"is a int, not a function"),
    ("{m}:not_a_module", r"returned a int, not a torch.nn.Module"),
    ("{m}:needs_hidden", r"requires arguments .*hidden"),
    ("{m}:boom", r"failed: RuntimeError: kaboom"),
    ("{m}:", r"not of the form module:function"),
])
def test_user_factory_errors(user_module, target, pattern):
    with pytest.raises(FlatcliError, match=pattern):
        build(target.format(m=user_module), (4,), 3)


def test_user_module_that_fails_to_import(tmp_path, monkeypatch):
    name = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def make(:\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlatcliError, match=rf"importing module '{name}'.*SyntaxError"):
        build(f"{name}:make", (4,), 3)


# ---------------------------------------------------------------- user errors


def test_unknown_name_lists_valid_names():
    with pytest.raises(FlatcliError, match="unknown model 'transformer'") as err:
        build("transformer", CIFAR)
    for name in MODEL_NAMES + ("tv:NAME", "module:function"):
        assert name in str(err.value)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_models_refuse_flat_vectors(name):
    with pytest.raises(FlatcliError, match=rf"'{name}' needs images of shape \(C, H, W\).*flat vectors.*use linear or mlp"):
        build(name, FLAT)


@pytest.mark.parametrize("name,least", [("lenet", 16), ("convnet", 8)])
def test_smallest_image_is_exact(name, least):
    check_fits(build(name, (1, least, least)), (1, least, least), 10)
    with pytest.raises(FlatcliError, match=rf"at least {least}x{least}, got {least - 1}x{least}"):
        build(name, (1, least - 1, least))


@pytest.mark.parametrize("spec,pattern", [
    (ModelSpec("mlp", width=0), "mlp width must be at least 1"),
    (ModelSpec("mlp", depth=-1), "mlp depth must be at least 0"),
    (ModelSpec("convnet", width=3), "convnet width must be at least 4"),
])
def test_bad_sizes(spec, pattern):
    with pytest.raises(FlatcliError, match=pattern):
        build_model(spec, CIFAR, 10)
    with pytest.raises(FlatcliError, match="number of outputs must be at least 1"):
        build_model(ModelSpec(), CIFAR, 0)


def test_check_fits_reports_a_shape_the_model_cannot_take():
    model = build("lenet", MNIST)
    with pytest.raises(FlatcliError, match=r"model LeNet cannot take inputs of shape \(784,\).*use linear or mlp"):
        check_fits(model, FLAT, 10)
    with pytest.raises(FlatcliError, match=r"cannot take inputs of shape \(3, 32, 32\)"):
        check_fits(model, CIFAR, 10)
    with pytest.raises(FlatcliError, match=r"expected \(2, 5\)"):
        check_fits(model, MNIST, 5)
    with pytest.raises(FlatcliError, match=r"model lenet cannot take"):
        check_fits(model, FLAT, 10, label="lenet")


def test_check_fits_restores_modes_and_touches_no_state():
    model = build("convnet", CIFAR)
    model.train()
    model.features[1].eval()                     # a mixed state must survive as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_fits(model, CIFAR, 10)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())   # BN running stats included
    assert all(p.grad is None for p in model.parameters())


def test_check_fits_rejects_non_tensor_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(FlatcliError, match="returns a tuple, not a tensor"):
        check_fits(Pair(), (4,), 3)


# ---------------------------------------------------------------- spec


def test_spec_round_trip_through_json():
    spec = ModelSpec("convnet", width=64, depth=5)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {"name": "convnet", "width": 64, "depth": 5}
    assert ModelSpec.from_dict(d) == spec
    assert ModelSpec.from_dict({"name": "lenet", "future_field": 1}) == ModelSpec("lenet", 128, 2)


@pytest.mark.parametrize("bad", [{"name": 3}, {"width": "64"}, {"depth": True}, ["mlp"]])
def test_spec_from_dict_rejects_damaged_metadata(bad):
    with pytest.raises(FlatcliError, match="model spec"):
        ModelSpec.from_dict(bad)
