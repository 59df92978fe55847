"""What a new user trips over in the first hour (issue 16): no flag ignored, errors that name the real
mistake, data and checkpoints in the forms people have, readable help and tables, files colleagues can read."""
import inspect
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer

from clitools import assert_user_error, invoke
from conftest import write_tensor_file
from flatcli.cli import pipeline
from flatcli.data import DataSpec, load_data

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
QUICK = ["--sigmas", "0,0.1", "--samples", "2", "--device", "cpu"]
ENTROPY = ["--gammas", "1,10", "--steps", "4", "--burn-in", "1", "--chains", "2", "--device", "cpu"]


def command(name: str):
    from flatcli.cli import app
    return typer.main.get_command(app).commands[name]


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


# -- silent or wrong behaviour --------------------------------------------------------------------------

def test_model_given_for_a_run_folder_is_checked_never_ignored(runs):
    assert_user_error(invoke("local-energy", runs / "sgd", "--model", "convnet", *QUICK),
                      "own model (mlp)", "'convnet'", "drop --model")
    assert invoke("local-energy", runs / "sgd", "--model", "mlp", *QUICK).exit_code == 0  # the run's own: fine


def test_data_that_do_not_fit_the_weights_are_named_as_the_mismatch(runs, tmp_path):
    path = tmp_path / "other.npz"
    write_tensor_file(path, {"x": torch.randn(20, 7), "y": torch.arange(20) % 3})
    assert_user_error(invoke("local-energy", runs / "sgd", "--data", path, *QUICK),
                      "x of shape (7,)", "reads 30 numbers", "3 classes", "10 outputs", "--data the run was trained on")
    torch.save(load_weights(runs / "sgd"), tmp_path / "w.pt")
    assert_user_error(invoke("local-energy", tmp_path / "w.pt", "--model", "mlp", "--width", "16", "--data", path,
                             *QUICK), "x of shape (7,)", "reads 30", "--data the weights were trained on")
    # the data fit, the width does not: still the weights' message
    assert_user_error(invoke("info", tmp_path / "w.pt", "--model", "mlp", "--width", "32", "--data", "teacher"),
                      "do not fit the model", "--width")


def load_weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channels_last_images_are_read_as_channels_first(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (12, 8, 6, 3), generator=g).to(dtype)  # H 8, W 6, C 3
    path = tmp_path / "hwc.npz"
    write_tensor_file(path, {"x": nhwc, "y": torch.arange(12) % 2, "x_test": nhwc[:4], "y_test": torch.arange(4) % 2})
    data = load_data(DataSpec(str(path)))
    assert data.input_shape == (3, 8, 6) and data.images
    assert torch.equal(data.train.x, nhwc.permute(0, 3, 1, 2)) and torch.equal(data.test.x, nhwc[:4].permute(0, 3, 1, 2))
    assert any("channels-last" in n and "(12, 8, 6, 3)" in n for n in data.notes)
    flat = tmp_path / "chw.npz"  # channels first stays as it is, without a note
    write_tensor_file(flat, {"x": nhwc.permute(0, 3, 1, 2), "y": torch.arange(12) % 2})
    assert load_data(DataSpec(str(flat))).notes == () and load_data(DataSpec(str(flat))).input_shape == (3, 8, 6)


def test_a_channels_last_image_file_trains_a_convnet_and_says_so(tmp_path):
    path = tmp_path / "hwc.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), y=np.arange(16) % 2)
    result = invoke("train", "--data", path, "--model", "convnet", "--width", "8", "--steps", "1", "--batch-size", "8",
                    "--out", tmp_path / "r", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "note: data file" in result.stderr and "channels-last" in result.stderr


@pytest.mark.parametrize("names", [("X", "Y", "X_test", "Y_test"), ("images", "labels", "test_images", "test_labels"),
                                   ("inputs", "targets", "inputs_test", "targets_test")])
def test_common_key_names_are_accepted_and_named(tmp_path, names):
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    path = tmp_path / "d.npz"
    write_tensor_file(path, dict(zip(names, (x, y, x[:3], y[:3]))))
    data = load_data(DataSpec(str(path)))
    assert torch.equal(data.train.x, x) and torch.equal(data.train.y, y) and torch.equal(data.test.y, y[:3])
    assert data.notes == (f"data file {path}: using " + ", ".join(
        f"{k!r} as {role}" for k, role in zip(names, ("x", "y", "x_test", "y_test"))),)


def test_unknown_keys_name_what_is_read(tmp_path):
    path = tmp_path / "d.npz"
    write_tensor_file(path, {"pixels": torch.randn(4, 2), "y": torch.arange(4) % 2})
    assert_user_error(invoke("train", "--data", path, "--steps", "1", "--out", tmp_path / "r"),
                      "missing ['x']", "images", "X")


def test_start_stop_num_with_num_1_is_refused(runs):
    assert_user_error(invoke("local-energy", runs / "sgd", "--sigmas", "0:0.1:1", "--samples", "2"),
                      "--sigmas '0:0.1:1'", "num 1", "only σ = 0", "0:0.1:11")
    assert_user_error(invoke("local-entropy", runs / "sgd", "--gammas", "1:100:1"), "num 1", "1:100:5")
    rows = json.loads(invoke("local-energy", runs / "sgd", "--sigmas", "0:0.1:3", *QUICK[2:], "--json", "-").stdout)
    assert rows["settings"]["sigmas"] == [0.0, 0.05, 0.1]  # start:stop:num, both ends included


def test_max_examples_beyond_the_data_is_clamped_with_a_note_and_echoed_as_used(runs):
    result = invoke("local-energy", runs / "sgd", *QUICK, "--max-examples", "100000", "--json", "-")
    settings = json.loads(result.stdout)["settings"]
    assert settings["max_examples"] == 256
    assert "max examples 256" in result.stderr.replace("\n", " ")
    assert "note: --max-examples 100000 is more than the 256 train examples" in result.stderr
    asked = json.loads(invoke("local-energy", runs / "sgd", *QUICK, "--max-examples", "100", "--json", "-").stdout)
    assert asked["settings"]["max_examples"] == 100


MYNET = """import torch
class MyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(30, 10)
    def forward(self, x):
        return self.fc(x)
def make():
    torch.manual_seed(0)
    return MyNet()
"""


def test_a_whole_pickled_model_finds_its_class_in_the_current_folder(tmp_path, monkeypatch):
    """As ``--model mynet:make`` does; and an unpickling failure is one line."""
    import importlib
    (tmp_path / "mynet.py").write_text(MYNET)
    sys.path.insert(0, str(tmp_path))
    try:  # pickled as a user's script would: the class lives in the module mynet
        importlib.invalidate_caches()
        net = importlib.import_module("mynet").make()
        torch.save(net, tmp_path / "whole.pt")
        torch.save(net.state_dict(), tmp_path / "state.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    monkeypatch.chdir(tmp_path)
    pickled = invoke("info", "whole.pt", "--data", "teacher", "--trust-pickle", "--evaluate", "--json")
    assert pickled.exit_code == 0, pickled.stderr
    factory = invoke("info", "state.pt", "--model", "mynet:make", "--data", "teacher", "--evaluate", "--json")
    assert json.loads(pickled.stdout)["evaluation"] == json.loads(factory.stdout)["evaluation"]
    sys.modules.pop("mynet", None)
    (tmp_path / "mynet.py").unlink()
    importlib.invalidate_caches()
    assert_user_error(invoke("info", "whole.pt", "--data", "teacher", "--trust-pickle"),
                      "unpickling 'whole.pt' failed", "ModuleNotFoundError", "mynet")


def test_a_python_file_or_a_data_file_as_checkpoint_says_what_it_is(tmp_path):
    (tmp_path / "net.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(30, 10)\n")
    assert_user_error(invoke("local-energy", tmp_path / "net.py", "--model", "mlp", "--data", "teacher"),
                      "is python source code, not a checkpoint", "--model module:function")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), y=np.zeros(4))
    assert_user_error(invoke("local-energy", tmp_path / "d.npz", "--model", "mlp", "--data", "teacher"),
                      "numpy data file", "not a checkpoint", "data go to --data")


def test_missing_arguments_name_only_what_is_missing(runs, tmp_path):
    torch.save(load_weights(runs / "sgd"), tmp_path / "w.pt")
    for given, missing, present in ((["--model", "mlp"], "pass --data", "--model"),
                                    (["--data", "teacher"], "pass --model", "--data")):
        result = invoke("local-energy", tmp_path / "w.pt", *given)
        assert_user_error(result, missing)
        assert present not in last_line(result).split("—")[1]


def test_interrupting_train_before_its_first_step_says_nothing_was_saved(tmp_path, monkeypatch):
    from flatcli.cli import train as train_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cli, "new_trainer", interrupted)
    result = invoke("train", "--steps", "1", "--out", tmp_path / "r", "--device", "cpu")
    assert result.exit_code == 130 and "nothing was saved" in last_line(result), result.stderr
    (tmp_path / "r").mkdir()  # the folder a run stopped before its first save leaves
    assert_user_error(invoke("train", "--resume", tmp_path / "r"), "nothing was saved there", "without --resume")


# -- files --------------------------------------------------------------------------------------------------

def test_output_files_get_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        result = invoke("train", "--steps", "2", "--n-train", "64", "--n-test", "16", "--batch-size", "32",
                        "--width", "8", "--save-every", "1", "--out", tmp_path / "r", "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        energy = invoke("local-energy", tmp_path / "r", *QUICK, "--csv", tmp_path / "e.csv", "--json", tmp_path / "e.json")
        assert energy.exit_code == 0, energy.stderr
    finally:
        os.umask(old)
    for path in [tmp_path / "r" / n for n in ("model.safetensors", "state.pt", "metrics.csv")] + \
            [tmp_path / "e.csv", tmp_path / "e.json"]:
        assert path.stat().st_mode & 0o777 == 0o640, (path.name, oct(path.stat().st_mode))


# -- help --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["local-energy", "--help"]])
def test_flags_show_no_value_hint(args):
    result = invoke(*args)
    assert result.exit_code == 0 and "--version" in invoke("--help").stdout
    assert "<bool>" not in result.stdout


def test_train_help_shows_the_defaults_and_panels():
    params = {p.name: p for p in command("train").params}
    for name in ("epochs", "model", "data", "lr", "loss"):
        assert params[name].show_default not in (None, False, ""), name
    assert "mlp" in str(params["model"].show_default) and "digits" in str(params["data"].show_default)
    for name in ("gamma", "gamma_growth"):
        assert "esgd" in params[name].rich_help_panel and "rsgd" in params[name].rich_help_panel
        assert params[name].rich_help_panel != "Replicated SGD (--algo rsgd)"
    assert "--langevin-noise" in params["langevin_noise"].opts and params["noise"].hidden


def test_old_noise_spelling_still_sets_the_langevin_noise(tmp_path):
    metas = []
    for flag in ("--noise", "--langevin-noise"):
        out = tmp_path / flag.strip("-")
        result = invoke("train", "--algo", "esgd", flag, "0.003", "--steps", "1", "--n-train", "64", "--n-test", "16",
                        "--batch-size", "32", "--width", "8", "--out", out, "--device", "cpu")
        assert result.exit_code == 0, result.stderr
        metas.append(json.loads(invoke("info", out, "--json").stdout)["metadata"]["hyper"]["noise"])
    assert metas == [0.003, 0.003]


@pytest.mark.parametrize("args, what, fix", [
    (["local-energy", "RUN", "--samples", "0"], "--samples 0 is below 1", "give --samples 1 or more"),
    (["local-energy", "RUN", "--noise", "val"], "--noise val is not one of multiplicative, additive",
     "use one of: multiplicative, additive"),
    (["local-energy", "RUN", "--split=val"], "--split val is not one of train, test", "use one of: train, test"),
    (["train", "--batch-size", "x"], "--batch-size x is not a whole number", "an integer"),
    (["train", "--momentum", "-1"], "--momentum -1 is below 0", "--momentum 0 or more"),
])
def test_option_errors_are_in_flatclis_words(args, what, fix):
    result = invoke(*args)
    assert_user_error(result, what, fix, "--help")
    line = last_line(result)
    assert "Input should" not in line and "Value error" not in line and line.index(what) < line.index("—") < line.index(fix)


# -- tables --------------------------------------------------------------------------------------------------

def test_tiny_values_print_in_scientific_notation():
    from flatcli.cli.render import fmt, plus_minus
    assert plus_minus(-9.3e-8, 1.1e-8) == "(-9.3 ± 1.1)e-08"
    assert plus_minus(0.0465, 0.0016) == "+0.0465 ± 0.0016"
    assert fmt(3.82e-7, 3) == "3.82e-07" and fmt(0.25) == "0.2500"


def rendered(renderable, width: int = 100) -> str:
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_title_and_settings_are_lines_of_their_own_not_wrapped_into_a_narrow_table():
    from flatcli.cli.render import table
    title, caption = "δε ± sem: rise of the error (a fraction)", "multiplicative noise · 50 draws · split train (256 examples)"
    lines = rendered(table(title, ["σ", "runs/x"], [["0.1", "+0.01 ± 0.02"]], caption=caption)).splitlines()
    assert lines[0] == title and lines[-1] == caption  # one line each, though the table is narrower


def test_local_entropy_names_each_checkpoint_once_and_flags_non_minima(runs, monkeypatch):
    monkeypatch.chdir(runs)  # short labels
    monkeypatch.setenv("COLUMNS", "200")  # a terminal wide enough that no cell wraps
    result = invoke("local-entropy", "sgd", "rsgd", *ENTROPY, "--json", "-")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    table_rows = [line for line in result.stderr.splitlines() if line.startswith("│")]
    header = "".join(line for line in result.stderr.splitlines() if line.startswith("┃"))
    for run in ("sgd", "rsgd"):
        assert header.count(f" {run} ") == 1
    for i, gamma in enumerate([1.0, 10.0]):  # cells: γ, then (s, distance, loss) per checkpoint
        cells = [c.strip() for c in table_rows[i].strip("│").split("│")]
        for k, run in enumerate(("sgd", "rsgd")):
            row = next(r for r in rows if r["checkpoint"] == run and r["gamma"] == gamma)
            assert ("↓" in cells[1 + 3 * k].split()) == (row["loss_mean"] < row["checkpoint_loss"]), (cells, row)


def test_the_version_in_the_settings_line_is_not_split_by_the_highlighter():
    import flatcli
    from rich.console import Console
    console = Console(file=io.StringIO(), width=300, force_terminal=True, color_system="truecolor")
    settings = {"command": "local-energy", "version": "0.12.3", "checkpoints": ["a"], "seed": 0, "sigmas": [0.1]}
    console.print(pipeline.settings_text(settings))
    text = console.file.getvalue()
    assert "local-energy 0.12.3 on 1 checkpoint(s)" in text
    assert "\x1b[" in text.split("checkpoint(s):")[1]  # the settings' numbers are still highlighted
    assert flatcli.__version__


# -- the Python API, TorchScript, torch.export ---------------------------------------------------------------

def test_the_python_api_and_the_cli_share_the_samples_default():
    from flatcli.measure import local_energy
    from flatcli.measure.local_energy import EnergySettings
    cli = {p.name: p.default for p in command("local-energy").params}["samples"]
    assert inspect.signature(local_energy).parameters["samples"].default == cli == EnergySettings.samples


def test_torchscript_loads_without_torchs_future_warning(runs, tmp_path):
    from flatcli.checkpoint import read_checkpoint
    from flatcli.loading import load_checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(load_checkpoint(runs / "sgd").model).save(str(tmp_path / "m.ts"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_checkpoint(tmp_path / "m.ts").kind == "torchscript"
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_torch_export_programs_are_measured_like_their_weights(runs, tmp_path):
    from flatcli.loading import load_checkpoint
    model = load_checkpoint(runs / "sgd").model
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.export.export(model, (torch.zeros(2, 30),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(dynamic, str(tmp_path / "m.pt2"))
        torch.export.save(torch.export.export(model, (torch.zeros(2, 30),)), str(tmp_path / "fixed.pt2"))
    args = ["--data", "teacher", "--max-examples", "300", "--sigmas", "0,0.1", "--samples", "3", "--json", "-"]
    ref = json.loads(invoke("local-energy", tmp_path / "w.pt", "--model", "mlp", "--width", "16", *args).stdout)["rows"]
    got = invoke("local-energy", tmp_path / "m.pt2", "--trust-pickle", *args)
    assert got.exit_code == 0, got.stderr
    for a, b in zip(ref, json.loads(got.stdout)["rows"]):
        assert a["error_mean"] == pytest.approx(b["error_mean"], abs=1e-12)
        assert a["loss_mean"] == pytest.approx(b["loss_mean"], rel=1e-5)
    assert_user_error(invoke("local-energy", tmp_path / "m.pt2", "--data", "teacher"), "torch.export program (.pt2)",
                      "--trust-pickle")
    assert_user_error(invoke("local-energy", tmp_path / "fixed.pt2", "--data", "teacher", "--trust-pickle"),
                      ".pt2", "fixed batch size", "dynamic_shapes")


# -- threads -------------------------------------------------------------------------------------------------

def test_the_settings_line_says_how_many_threads_are_used(runs):
    torch.set_num_threads(2)  # whatever torch would use, the CPU default is one thread
    default = invoke("local-energy", runs / "sgd", *QUICK, "--json", "-")
    assert json.loads(default.stdout)["settings"]["threads"] == 1 and "threads 1 ·" in default.stderr
    two = invoke("local-energy", runs / "sgd", *QUICK, "--threads", "2", "--json", "-")
    assert json.loads(two.stdout)["settings"]["threads"] == 2 and "threads 2 ·" in two.stderr
    torch.set_num_threads(1)


def test_train_says_how_many_threads_it_uses(tmp_path):
    torch.set_num_threads(2)
    result = invoke("train", "--steps", "1", "--n-train", "64", "--n-test", "16", "--batch-size", "32",
                    "--width", "8", "--out", tmp_path / "r", "--device", "cpu")
    assert result.exit_code == 0 and "(1 thread(s))" in result.stderr, result.stderr
    assert torch.get_num_threads() == 1
