"""flatcli local-entropy end to end: the quadratic closed form through the CLI (linear regression, MALA), the
library's numbers unchanged, several checkpoints in one CSV, outputs, reproducibility, untouched weights,
replicas, and every user mistake."""
import csv
import hashlib
import importlib
import io
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clitools import assert_user_error, invoke, same_tensors, weights
from flatcli.loading import load_checkpoint
from flatcli.measure import local_entropy

estimator = importlib.import_module("flatcli.measure.local_entropy")  # (flatcli.measure.local_entropy is a function)
HEADER = "checkpoint,gamma,local_entropy,local_entropy_sem,distance,loss_mean,error_mean"
NUMBERS = ["gamma", "local_entropy", "local_entropy_sem", "distance", "loss_mean", "error_mean", "beta",
           "acceptance", "langevin_lr", "curvature", "checkpoint_loss", "checkpoint_error"]
TINY = ["--data", "teacher",
        "--n-train", "256", "--n-test", "128", "--batch-size", "32", "--width", "16", "--device", "cpu"]
FAST = ["--steps", "6", "--burn-in", "2", "--chains", "2", "--max-examples", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")



def entropy(*args):
    """Run local-entropy with --csv - on the CPU; (rows as dicts with numbers parsed, stdout text)."""
    result = invoke("local-entropy", *args, "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    return read_rows(result.stdout), result.stdout


def read_rows(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        for key in NUMBERS:
            row[key] = float(row[key])
    return rows


def numbers(rows, keys=NUMBERS[:6]):
    return [[row[k] for k in keys] for row in rows]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``write(name, source)``: a module in tmp_path, importable as a --model factory (cwd = tmp_path)."""
    names = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
    monkeypatch.chdir(tmp_path)
    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def regression(tmp_path, user_module):
    """y = X w*, the model nn.Linear(d, 1, bias=False) at w* (a plain state dict), X in a tensors file, with
    H = (2/n) XᵀX having eigenvalues from 0.01 to 10 (three decades). Returns the eigenvalues and n."""
    g = torch.Generator().manual_seed(1)
    d, n = 24, 48
    h = np.geomspace(0.01, 10, d)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = ((math.sqrt(n / 2) * u * torch.as_tensor(np.sqrt(h))) @ v.T).float()  # (2/n) XᵀX = V diag(h) Vᵀ
    w_star = torch.randn(1, d, generator=g)
    torch.save({"weight": w_star}, tmp_path / "W.pt")
    np.savez(tmp_path / "reg.npz", x=x.numpy(), y=(x @ w_star[0]).numpy())
    user_module("le_reg", f"from torch import nn\n\ndef linear():\n    return nn.Linear({d}, 1, bias=False)\n")
    eig = np.linalg.eigvalsh((2 / n) * (x.double().T @ x.double()).numpy())
    assert eig.min() < 0.011 and eig.max() > 9.9  # the spectrum really spans three decades
    return eig, n


REGRESSION = ["W.pt", "--model", "le_reg:linear", "--data", "reg.npz", "--loss", "mse"]


def test_closed_form_linear_regression_through_the_cli(regression):
    """MATH.md §2: s(γ) = −(1/2N) Σ log(1 + h_i/γ) and ⟨|w' − w|²⟩/N = Σ 1/(β(h_i + γ))/N, within 5%,
    over three decades of γ and of curvature, with full-batch MALA and the default β (the number of examples).
    (Over seeds 0-5 the worst error at this budget was 1.7%.)"""
    h, n = regression
    rows, _ = entropy(*REGRESSION, "--gammas", "1:1000:4", "--steps", 400, "--burn-in", 100, "--chains", 32,
                      "--chains-per-pass", 32)
    assert [r["gamma"] for r in rows] == pytest.approx([1, 10, 100, 1000], rel=1e-12)
    for row in rows:
        s = -np.log1p(h / row["gamma"]).sum() / (2 * len(h))
        distance = (1 / (n * (h + row["gamma"]))).sum() / len(h)
        assert row["local_entropy"] == pytest.approx(s, rel=0.05), row
        assert row["distance"] == pytest.approx(distance, rel=0.05), row
        assert row["beta"] == n and row["sampler"] == "mala" and row["examples"] == str(n)
        assert row["parameters"] == "24" and math.isnan(row["error_mean"])  # regression: no 0-1 error
        assert 0 <= row["checkpoint_loss"] < 1e-9 and math.isnan(row["checkpoint_error"])  # w = w*: L(w) = 0
        assert 0.4 < row["acceptance"] < 0.8 and row["curvature"] == pytest.approx(10, rel=0.2)
    assert rows[0]["local_entropy"] < 5 * rows[-1]["local_entropy"] < 0  # the curve moves with γ: a real test


@pytest.mark.parametrize("beta", [None, 20.0])
def test_rows_are_the_library_result_exactly(runs, beta):
    """The CLI hands the library the model, the examples, β and the seed unchanged: the same numbers, bit for bit."""
    rows, _ = entropy(runs / "sgd", "--gammas", "1,30", *FAST, "--seed", 3, *(["--beta", beta] if beta else []))
    loaded = load_checkpoint(runs / "sgd")
    x, y = loaded.data.train.tensors()
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:64]  # --max-examples 64 --seed 3
    result = local_entropy(loaded.model, (x[idx], y[idx]), [1, 30], steps=6, burn_in=2, chains=2, seed=3, beta=beta)
    assert numbers(rows) == [[r.gamma, r.local_entropy, r.local_entropy_sem, r.distance, r.loss_mean,
                              r.error_mean] for r in result.rows]
    assert {r["beta"] for r in rows} == {beta or 64.0} and {r["curvature"] for r in rows} == {result.curvature}
    with torch.no_grad():  # the checkpoint's own loss and error on those examples, by hand
        out = loaded.model(x[idx])
    for row in rows:
        assert row["checkpoint_loss"] == pytest.approx(float(F.cross_entropy(out, y[idx])), rel=1e-6)
        assert row["checkpoint_error"] == pytest.approx(float((out.argmax(1) != y[idx]).float().mean()), abs=1e-7)


def test_several_checkpoints_in_one_csv(runs, tmp_path):
    """Rows per checkpoint in the order given; a copy of a run gives its rows again (the same chains)."""
    shutil.copytree(runs / "sgd", tmp_path / "copy")
    paths = [runs / "sgd", runs / "rsgd", tmp_path / "copy"]
    rows, _ = entropy(*paths, "--gammas", "1,10,100", *FAST)
    assert [r["checkpoint"] for r in rows] == [str(p) for p in paths for _ in range(3)]
    assert [r["gamma"] for r in rows] == [1, 10, 100] * 3
    assert numbers(rows[:3]) == numbers(rows[6:])
    assert numbers(rows[:3]) != numbers(rows[3:6])
    for row in rows:
        assert row["local_entropy_sem"] > 0 and 0 <= row["error_mean"] <= 1 and row["examples"] == "64"


def test_csv_to_stdout_is_pure_csv_and_the_human_view_goes_to_stderr(runs):
    result = invoke("local-entropy", runs / "sgd", runs / "rsgd", "--gammas", "1,10", *FAST, "--device", "cpu",
                    "--csv", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(HEADER + ",beta,chains,steps,burn_in,sampler,acceptance")
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert len(table) == 1 + 2 * 2 and all(len(line) == len(table[0]) for line in table)
    assert "on 2 checkpoint(s)" in result.stderr and "beta 64" in result.stderr  # settings line
    assert "the number of examples" in result.stderr
    ladders = [json.loads(invoke("local-entropy", p, "--gammas", "1,10", *FAST, "--device", "cpu", "--json", "-")
                          .stdout)["settings"]["per_checkpoint"][0]["ladder"] for p in (runs / "sgd", runs / "rsgd")]
    total = 6 * sum(len(ladder) for ladder in ladders)  # one bar: checkpoints × ladder × steps
    assert f"{total}/" in result.stderr  # (a narrow terminal may cut the rest)
    assert "s(γ) ± sem" in result.stderr and "closer to 0 = flatter" in result.stderr  # the table


def test_json_and_csv_files_carry_every_resolved_setting(runs, tmp_path):
    out_csv, out_json = tmp_path / "s.csv", tmp_path / "s.json"
    result = invoke("local-entropy", runs / "sgd", "--gammas", "10,1", "--steps", 8, "--burn-in", 3, "--chains", 3,
                    "--max-examples", 50, "--device", "cpu", "--seed", 4, "--csv", out_csv, "--json", out_json)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    report = json.loads(out_json.read_text())
    settings = report["settings"]
    assert {k: settings[k] for k in ("seed", "device", "gammas", "beta", "beta_from", "steps", "burn_in", "chains",
                                     "langevin_lr", "batch_size", "split", "max_examples", "loss")} == {
        "seed": 4, "device": "cpu", "gammas": [1.0, 10.0], "beta": 50.0, "beta_from": "the number of examples",
        "steps": 8, "burn_in": 3, "chains": 3, "langevin_lr": "auto", "batch_size": None, "split": "train",
        "max_examples": 50, "loss": "cross-entropy"}
    (details,) = settings["per_checkpoint"]
    assert details["sampler"] == "mala" and details["beta"] == 50 and details["curvature"] > 0
    ladder = details["ladder"]
    assert ladder[-1]["gamma"] >= 100 * details["curvature"] * (1 - 1e-9)  # the internal ladder goes past 100 h
    assert all(p["langevin_lr"] > 0 and 0 <= p["acceptance"] <= 1 for p in ladder)
    rows = read_rows(out_csv.read_text())
    assert out_csv.read_text().startswith(HEADER + ",")
    assert [[r[k] for k in NUMBERS] for r in report["rows"]] == [[r[k] for k in NUMBERS] for r in rows]
    assert [r["langevin_lr"] for r in rows] == [min(ladder, key=lambda p: abs(math.log(p["gamma"] / g)))
                                                ["langevin_lr"] for g in (1, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]  # no temporary files left


def test_seed_reproduces_the_csv_text_and_another_seed_differs(runs):
    args = [runs / "sgd", "--gammas", "0.5:50:3", *FAST]
    _, a = entropy(*args, "--seed", 1)
    _, b = entropy(*args, "--seed", 1)
    rows_c, c = entropy(*args, "--seed", 2)
    assert a == b and a != c
    assert [r["gamma"] for r in rows_c] == pytest.approx([0.5, 5, 50], rel=1e-12)  # geometric, both ends


def test_sgld_on_minibatches(runs):
    rows, _ = entropy(runs / "sgd", "--gammas", "10", *FAST, "--batch-size", 16)
    assert rows[0]["sampler"] == "sgld" and math.isnan(rows[0]["acceptance"])
    full, _ = entropy(runs / "sgd", "--gammas", "10", *FAST, "--batch-size", 64)  # a batch covering the data
    assert full[0]["sampler"] == "mala"


def test_weights_are_never_changed(runs, monkeypatch):
    """The file is byte for byte the same, and the model handed to the library comes back with every tensor
    of its state dict (parameters and buffers) bit for bit unchanged."""
    path = runs / "sgd" / "model.safetensors"
    digest, before = hashlib.sha256(path.read_bytes()).hexdigest(), weights(path)
    seen = []

    measure = estimator.measure

    def checked(model, *args, **kwargs):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        result = measure(model, *args, **kwargs)
        seen.append(same_tensors(state, model.state_dict()))
        return result
    monkeypatch.setattr(estimator, "measure", checked)
    entropy(runs / "sgd", runs / "rsgd", "--gammas", "1,10", *FAST)
    assert seen == [True, True]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and same_tensors(weights(path), before)


def test_replicas_of_an_rsgd_run(runs):
    rows = {r: entropy(runs / "rsgd", "--replica", r, "--gammas", "3", *FAST)[0][0] for r in ("center", "0", "1")}
    assert rows["center"]["checkpoint"] == str(runs / "rsgd")
    assert rows["1"]["checkpoint"] == f"{runs / 'rsgd'}#replica1"
    assert len({(r["local_entropy"], r["loss_mean"]) for r in rows.values()}) == 3  # three different nets
    replica1 = load_checkpoint(runs / "rsgd", replica=1)
    x, y = replica1.data.train.tensors()
    idx = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    expected = local_entropy(replica1.model, (x[idx], y[idx]), [3], steps=6, burn_in=2, chains=2)
    assert rows["1"]["local_entropy"] == expected.rows[0].local_entropy


FLAKY = '''from torch import nn
from torch.nn import functional as F
from flatcli.errors import FlatcliError

class Flaky(nn.Linear):
    """Fails on its 30th forward pass: in the middle of the measurement."""
    calls = 0

    def forward(self, x):
        Flaky.calls += 1
        if Flaky.calls > 30:
            raise FlatcliError("the device went away", "run it again")
        return super().forward(x)

def flaky():
    return Flaky(24, 1, bias=False)
'''


def test_an_error_during_the_work_leaves_no_output_file(regression, tmp_path, user_module):
    user_module("le_flaky", FLAKY)
    result = invoke("local-entropy", "W.pt", "--model", "le_flaky:flaky", "--data", "reg.npz", "--device", "cpu",
                    "--steps", 20, "--burn-in", 5, "--csv", tmp_path / "out.csv", "--json", tmp_path / "out.json")
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: the device went away — run it again"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args,fragments", [
    (["RUN", "--gammas", "1,abc"], ["cannot parse γ values", "1,abc"]),
    (["RUN", "--gammas", "0,1"], ["'0,1'", "positive"]),
    (["RUN", "--gammas=-1:10:3"], ["'-1:10:3'", "positive"]),
    (["RUN", "--gammas", "1:10"], ["start:stop:num"]),
    (["RUN", "--steps", "0"], ["--steps 0"]),
    (["RUN", "--steps", "30"], ["--burn-in 30 is not smaller than --steps 30"]),
    (["RUN", "--burn-in", "-1"], ["--burn-in -1"]),
    (["RUN", "--chains", "0"], ["--chains 0"]),
    (["RUN", "--beta", "0"], ["--beta 0 is not a positive number"]),
    (["RUN", "--beta=-2"], ["--beta -2 is not a positive number"]),
    (["RUN", "--langevin-lr", "0"], ["--langevin-lr 0"]),
    (["RUN", "--batch-size", "0"], ["--batch-size 0"]),
    (["RUN", "--max-examples", "0"], ["--max-examples 0"]),
    (["RUN", "--loss", "hinge"], ["--loss hinge"]),
    (["missing.pt"], ["does not exist"]),
    (["W.pt"], ["does not describe its model and data", "--model and --data"]),
    (["W.pt", "--data", "reg.npz"], ["pass --model"]),  # only what is missing
    (["RSGD", "--replica", "2"], ["out of range", "0..1"]),
    (["RSGD", "--replica", "x"], ["not 'center' or a number"]),
    (["RUN", "--replica", "0"], ["not an rSGD run"]),
    (["missing.pt", "--csv", "nowhere/out.csv"], ["--csv", "does not exist"]),  # found before the checkpoint
    (["RUN", "--json", "nowhere/out.json"], ["--json", "does not exist"]),
    (["RUN", "--csv", "-", "--json", "-"], ["stdout"]),
    (["W.pt", "--model", "le_reg:linear", "--data", "reg.npz", "--split", "test"], ["no test split"]),
])
def test_user_mistakes(runs, regression, tmp_path, args, fragments):
    paths = {"RUN": str(runs / "sgd"), "RSGD": str(runs / "rsgd")}
    args = [paths.get(a, a) for a in args]
    if "--csv" not in args and "--json" not in args:
        args += ["--csv", "out.csv"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(invoke("local-entropy", *args, "--device", "cpu"), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output file, complete or partial


def test_help_documents_the_defaults_and_shows_an_example():
    result = invoke("local-entropy", "--help")
    text = " ".join(result.stdout.replace("│", " ").split())  # the option help is drawn in a box
    assert result.exit_code == 0 and "Example: flatcli local-entropy runs/sgd runs/esgd runs/rsgd" in text
    assert "default: the number of examples in use" in text and importlib.import_module("flatcli.cli.local_entropy").DEFAULT_GAMMAS in text
