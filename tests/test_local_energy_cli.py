"""flatcli local-energy end to end: the linear closed form through the CLI, the library's numbers unchanged, common
random numbers, reproducibility, every checkpoint format, BatchNorm, replicas, outputs, and every user mistake."""
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clitools import assert_user_error, invoke
from flatcli.data import DataSpec, load_data
from flatcli.loading import load_checkpoint
from flatcli.measure import local_energy
from flatcli.training import evaluate_model

HEADER = "checkpoint,split,sigma,samples,error_mean,error_sem,delta_error,loss_mean,loss_sem,delta_loss"
NUMBERS = ["sigma", "samples", "error_mean", "error_sem", "delta_error", "loss_mean", "loss_sem", "delta_loss"]
TINY = ["--data", "teacher",
        "--n-train", "256", "--n-test", "128", "--batch-size", "32", "--width", "16", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")



def energy(*args):
    """Run local-energy with --csv - on the CPU; (rows as dicts with numbers parsed, stdout text)."""
    result = invoke("local-energy", *args, "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    return read_rows(result.stdout), result.stdout


def read_rows(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        for key in NUMBERS:
            row[key] = float(row[key])
    return rows


def numbers(rows, keys=NUMBERS):
    return [[row[k] for k in keys] for row in rows]


def normal_cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(t / math.sqrt(2)))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``write(name, source)``: a module in tmp_path, importable as a --model factory (cwd = tmp_path)."""
    names = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
    monkeypatch.chdir(tmp_path)
    yield write
    for name in names:  # a later test may write a module of the same name elsewhere
        sys.modules.pop(name, None)


LINEAR = """from torch import nn

def two_class(num_classes):
    return nn.Linear({d}, num_classes)

def fixed():
    return nn.Linear({d}, 2)
"""


@pytest.fixture
def linear_problem(tmp_path, user_module):
    """A two-class linear classifier saved as a plain state dict, and its own Gaussian data in a tensors file."""
    g = torch.Generator().manual_seed(1)
    d, n = 5, 400
    x = torch.randn(n, d, generator=g)
    teacher = torch.randn(d, generator=g)
    y = (x @ teacher + 0.7 * torch.randn(n, generator=g) > 0).long()  # noisy labels: some mistakes at σ = 0
    weight = torch.stack([-0.4 * teacher, 0.6 * teacher]) + 0.2 * torch.randn(2, d, generator=g)
    bias = torch.tensor([0.3, -0.2])
    torch.save({"weight": weight, "bias": bias}, tmp_path / "W.pt")
    np.savez(tmp_path / "linear.npz", x=x.numpy(), y=y.numpy())
    user_module("le_linear", LINEAR.format(d=d))
    return weight.double(), bias.double(), x.double(), y


def exact_error(weight, bias, x, y, sigma):
    """MATH.md §1: m = (w1 − w0)·x + (b1 − b0), var = σ²(Σ_i (w1i² + w0i²) x_i² + b1² + b0²), P(1) = Φ(m/sd)."""
    m = x @ (weight[1] - weight[0]) + (bias[1] - bias[0])
    var = sigma**2 * ((x**2) @ (weight[0]**2 + weight[1]**2) + bias[0]**2 + bias[1]**2)
    p1 = normal_cdf(m / var.sqrt()) if sigma > 0 else (m > 0).double()
    return float(torch.where(y == 1, 1 - p1, p1).mean())


def test_closed_form_linear_classifier_through_the_cli(linear_problem):
    weight, bias, x, y = linear_problem
    sigmas = [0.0, 0.1, 0.3, 1.0]
    rows, _ = energy("W.pt", "--model", "le_linear:two_class", "--data", "linear.npz",
                     "--sigmas", ",".join(map(str, sigmas)), "--samples", 200, "--seed", 5)
    base = exact_error(weight, bias, x, y, 0.0)
    assert 0.05 < base < 0.5
    assert [r["sigma"] for r in rows] == sigmas and {r["checkpoint"] for r in rows} == {"W.pt"}
    assert rows[0]["error_mean"] == base and rows[0]["samples"] == 0 and rows[0]["delta_error"] == 0
    for row in rows[1:]:
        expected = exact_error(weight, bias, x, y, row["sigma"])
        assert row["samples"] == 200 and 0 < row["error_sem"] < 0.02
        assert abs(row["error_mean"] - expected) < 4 * row["error_sem"], (row, expected)
        assert row["delta_error"] == pytest.approx(row["error_mean"] - base, abs=1e-12)
    assert abs(expected - base) > 10 * rows[-1]["error_sem"]  # at σ = 1, "no effect" would fail the test


def test_rows_are_the_library_result_exactly(runs):
    """The CLI hands the library the model, the examples and the seed unchanged: the same numbers, bit for bit."""
    sigmas = [0.0, 0.05, 0.2]
    rows, _ = energy(runs / "sgd", "--sigmas", "0,0.05,0.2", "--samples", 6, "--seed", 3, "--batch-size", 100)
    loaded = load_checkpoint(runs / "sgd")
    result = local_energy(loaded.model, loaded.data.train.tensors(), sigmas, samples=6, seed=3, batch_size=100,
                          loss="cross-entropy")
    expected = [[p.sigma, p.samples, p.error_mean, p.error_sem, p.delta_error, p.loss_mean, p.loss_sem,
                 p.delta_loss] for p in result]
    assert numbers(rows) == expected
    assert {r["examples"] for r in rows} == {"256"} and {r["loss_function"] for r in rows} == {"cross-entropy"}


def test_several_checkpoints_one_csv_with_common_random_numbers(runs, tmp_path):
    """Rows per checkpoint in the order given; the same draws for each, so a copy of a run gives the same rows."""
    shutil.copytree(runs / "sgd", tmp_path / "copy")
    paths = [runs / "sgd", runs / "rsgd", tmp_path / "copy"]
    rows, _ = energy(*paths, "--sigmas", "0,0.1,0.3", "--samples", 4)
    assert [r["checkpoint"] for r in rows] == [str(p) for p in paths for _ in range(3)]
    first, second, third = rows[:3], rows[3:6], rows[6:]
    assert numbers(first) == numbers(third)  # draw k is the same for every checkpoint, not a continuing stream
    assert numbers(first) != numbers(second)
    assert first[2]["delta_error"] > 0 and first[2]["delta_loss"] > 0  # noise hurts a trained net at σ = 0.3


def test_seed_reproduces_bit_for_bit_and_another_seed_differs(runs):
    args = [runs / "sgd", "--sigmas", "0:0.2:3", "--samples", 4, "--max-examples", 100]
    _, a = energy(*args, "--seed", 1)
    _, b = energy(*args, "--seed", 1)
    rows_c, c = energy(*args, "--seed", 2)
    assert a == b
    assert a != c
    assert [r["sigma"] for r in rows_c] == [0.0, 0.1, 0.2]  # start:stop:num includes both ends


def test_csv_to_stdout_is_pure_csv_and_the_human_view_goes_to_stderr(runs):
    result = invoke("local-energy", runs / "sgd", runs / "rsgd", "--sigmas", "0,0.1", "--samples", 3,
                    "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(HEADER + ",")
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert len(table) == 1 + 2 * 2 and all(len(line) == len(table[0]) for line in table)
    assert "on 2 checkpoint(s)" in result.stderr and "seed 0" in result.stderr  # the settings line
    assert "6/6" in result.stderr  # one progress bar: 2 checkpoints × 1 σ > 0 × 3 draws
    assert "δε ± sem" in result.stderr  # the table


def test_json_and_csv_files(runs, tmp_path):
    out_csv, out_json = tmp_path / "le.csv", tmp_path / "le.json"
    result = invoke("local-energy", runs / "sgd", "--sigmas", "0.1,0", "--samples", 3, "--max-examples", 50,
                    "--device", "cpu", "--seed", 4, "--csv", out_csv, "--json", out_json)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    report = json.loads(out_json.read_text())
    settings = report["settings"]
    assert {k: settings[k] for k in ("seed", "device", "sigmas", "samples", "noise", "bn", "split", "max_examples",
                                     "batch_size", "loss")} == {
        "seed": 4, "device": "cpu", "sigmas": [0.0, 0.1], "samples": 3, "noise": "multiplicative", "bn": "eval",
        "split": "train", "max_examples": 50, "batch_size": 1000, "loss": "cross-entropy"}
    assert settings["version"] and settings["checkpoints"] == [str(runs / "sgd")]
    rows = read_rows(out_csv.read_text())
    assert [[r[k] for k in NUMBERS] for r in report["rows"]] == numbers(rows)
    assert out_csv.read_text().splitlines()[0].startswith(HEADER + ",")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["le.csv", "le.json"]  # no temporary files left


def test_restoration_and_sigma_zero_equal_info_evaluate(runs, tmp_path):
    """σ = 0 is the checkpoint as stored (train and test split); measuring never changes the file."""
    weights = runs / "sgd" / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    info = json.loads(invoke("info", runs / "sgd", "--evaluate", "--json").stdout)["evaluation"]
    for split in ("train", "test"):
        rows, _ = energy(runs / "sgd", "--sigmas", "0,0.3", "--samples", 3, "--split", split)
        assert rows[0]["error_mean"] == info[f"{split}_error"]
        assert rows[0]["loss_mean"] == pytest.approx(info[f"{split}_loss"], rel=1e-6)
        assert {r["split"] for r in rows} == {split} and rows[0]["examples"] == str(256 if split == "train" else 128)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    again = json.loads(invoke("info", runs / "sgd", "--evaluate", "--json").stdout)["evaluation"]
    assert again == info


def test_max_examples_is_a_seeded_subset(runs):
    loaded = load_checkpoint(runs / "sgd")
    for seed in (0, 1):
        rows, _ = energy(runs / "sgd", "--sigmas", "0", "--max-examples", 60, "--seed", seed)
        idx = torch.randperm(256, generator=torch.Generator().manual_seed(seed))[:60]  # hand reference
        x, y = loaded.data.train.tensors()
        err = float((loaded.model(x[idx]).argmax(1) != y[idx]).double().mean())
        assert rows[0]["examples"] == "60" and rows[0]["error_mean"] == pytest.approx(err, abs=1e-12)
    rows, _ = energy(runs / "sgd", "--sigmas", "0", "--max-examples", 10_000)
    assert rows[0]["examples"] == "256"  # more than there are: all of them


def test_every_checkpoint_format(runs, tmp_path):
    """Run folder, its model.safetensors, plain state dicts and TorchScript: the same weights give the same rows."""
    loaded = load_checkpoint(runs / "sgd")
    state = loaded.model.state_dict()
    torch.save(state, tmp_path / "plain.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    torch.jit.script(loaded.model).save(str(tmp_path / "scripted.pt"))
    common = ["--sigmas", "0,0.2", "--samples", 3, "--max-examples", 200, "--data", "teacher"]
    foreign = ["--model", "mlp", "--width", 16]
    reference, _ = energy(runs / "sgd", *common)
    for args in ([runs / "sgd" / "model.safetensors"], [tmp_path / "plain.pt", *foreign],
                 [tmp_path / "plain.safetensors", *foreign], [tmp_path / "scripted.pt"]):
        rows, _ = energy(*args, *common)
        assert rows[0]["checkpoint"] == str(args[0])
        assert numbers(rows) == numbers(reference), args[0]


def test_bn_recompute_uses_unaugmented_training_batches(tmp_path, cifar10_dir):
    """convnet (BatchNorm) on a CIFAR-format set, measured on the test split: statistics from seeded training batches."""
    data = ["--data", "cifar10", "--data-dir", cifar10_dir.data_dir]
    result = invoke("train", "--model", "convnet", *data, "--steps", 2, "--batch-size", 8, "--device", "cpu",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    args = [tmp_path / "run", "--split", "test", "--sigmas", "0,0.2", "--samples", 2, "--batch-size", 8, "--seed", 3]
    recompute, _ = energy(*args, "--bn", "recompute", "--bn-batches", 2)
    stored, _ = energy(*args)
    assert recompute[0]["error_mean"] == stored[0]["error_mean"]  # σ = 0: the net as stored
    assert recompute[1]["loss_mean"] != stored[1]["loss_mean"]
    # the reference: the library with the 16 (2 batches × 8) training images of a permutation seeded by --seed
    loaded = load_checkpoint(tmp_path / "run")
    train = load_data(DataSpec("cifar10", data_dir=cifar10_dir.data_dir)).train
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:16]
    assert torch.equal(train.x, cifar10_dir.train_x)
    expected = local_energy(loaded.model, loaded.data.test.tensors(), [0.0, 0.2], samples=2, seed=3, batch_size=8,
                            bn="recompute", bn_data=train.batch(idx), bn_batches=2)
    assert [recompute[1][k] for k in ("error_mean", "loss_mean", "loss_sem")] == \
        [expected.points[1].error_mean, expected.points[1].loss_mean, expected.points[1].loss_sem]


def test_replicas_of_an_rsgd_run(runs):
    args = ["--sigmas", "0,0.2", "--samples", 3]
    rows = {r: energy(runs / "rsgd", "--replica", r, *args)[0] for r in ("center", "0", "1")}
    assert rows["0"][0]["checkpoint"] == f"{runs / 'rsgd'}#replica0"
    assert rows["center"][0]["checkpoint"] == str(runs / "rsgd")
    values = [tuple(r[0][k] for k in ("loss_mean",)) + tuple(r[1][k] for k in ("loss_mean",)) for r in rows.values()]
    assert len(set(values)) == 3  # center, replica 0 and replica 1 are three different nets
    replica0 = load_checkpoint(runs / "rsgd", replica=0)
    assert rows["0"][0]["loss_mean"] == pytest.approx(evaluate_model(replica0.model, replica0.data.train,
                                                                     "cross-entropy")[0], rel=1e-6)


FLAKY = '''from torch import nn
from flatcli.errors import FlatcliError

class Flaky(nn.Linear):
    """Fails on its 6th forward pass: in the middle of the measurement."""
    calls = 0

    def forward(self, x):
        Flaky.calls += 1
        if Flaky.calls > 5:
            raise FlatcliError("the device went away", "run it again")
        return super().forward(x)

def flaky(num_classes):
    return Flaky(5, num_classes)
'''


def test_an_error_during_the_work_leaves_no_output_file(linear_problem, tmp_path, user_module):
    user_module("le_flaky", FLAKY)
    result = invoke("local-energy", "W.pt", "--model", "le_flaky:flaky", "--data", "linear.npz", "--samples", 5,
                    "--device", "cpu", "--csv", tmp_path / "out.csv", "--json", tmp_path / "out.json")
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: the device went away — run it again"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args,fragments", [
    (["RUN", "--sigmas", "0,abc"], ["cannot read sigmas", "0,abc"]),
    (["RUN", "--sigmas=0,-0.1"], ["-0.1", ">= 0"]),
    (["RUN", "--sigmas", "0:1:0"], ["num must be at least 1"]),
    (["RUN", "--samples", "0"], ["--samples 0"]),
    (["RUN", "--max-examples", "0"], ["--max-examples 0"]),
    (["RUN", "--data", "linear.npz"], ["do not fit the weights", "x of shape (5,)"]),
    (["W.pt", "--model", "le_linear:fixed", "--data", "teacher"], ["cannot take inputs of shape (30,)"]),
    (["W.pt", "--model", "mlp", "--data", "linear.npz"], ["do not fit the model", "--model"]),
    (["missing.pt", "--csv", "nowhere/out.csv"], ["--csv", "does not exist"]),  # found before the checkpoint
    (["RUN", "--json", "nowhere/out.json"], ["--json", "does not exist"]),
    (["RUN", "--csv", "-", "--json", "-"], ["stdout"]),
    (["RUN", "--csv", "same.txt", "--json", "same.txt"], ["both name", "different paths"]),
    (["W.pt"], ["does not describe its model and data", "--model and --data"]),
    (["W.pt", "--data", "linear.npz"], ["pass --model"]),  # only what is missing
    (["RUN", "--replica", "0"], ["not an rSGD run"]),
    (["RSGD", "--replica", "2"], ["out of range", "0..1"]),
    (["RSGD", "--replica", "x"], ["not 'center' or a number"]),
    (["missing.pt"], ["does not exist"]),
    (["W.pt", "--model", "le_linear:two_class", "--data", "linear.npz", "--split", "test"], ["no test split"]),
    (["RUN", "--noise", "gaussian"], ["--noise gaussian"]),
    (["RUN", "--device", "tpu"], ["unknown device", "tpu"]),
])
def test_user_mistakes(runs, linear_problem, tmp_path, args, fragments):
    paths = {"RUN": str(runs / "sgd"), "RSGD": str(runs / "rsgd")}
    args = [paths.get(a, a) for a in args]
    if "--csv" not in args and "--json" not in args:
        args += ["--csv", "out.csv"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(invoke("local-energy", *args, "--samples" if "--samples" not in args else "--seed", 2),
                      *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output file, complete or partial


def test_help_shows_an_example():
    result = invoke("local-energy", "--help")
    assert result.exit_code == 0 and "Example: flatcli local-energy" in " ".join(result.stdout.split())


def test_the_library_call_is_exported_without_making_import_slow():
    import flatcli
    import flatcli.measure
    assert flatcli.local_energy is flatcli.measure.local_energy
    check = "import sys, flatcli; assert 'torch' not in sys.modules; from flatcli import local_energy, EntropySGD"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
