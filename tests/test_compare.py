"""flatcli compare: the worked example on a tiny family of runs, its τ and ρ against scipy on its own CSV, its Ψ,
its per-checkpoint numbers against the individual commands, and its user mistakes."""
import csv
import io
import json
import math

import pytest
import torch
from scipy.stats import kendalltau, spearmanr

from clitools import assert_user_error, invoke
from conftest import TINY_TRAIN
from flatcli.measure.compare import Subject, compare, hessian_available
from flatcli.measure.rank import granulated_kendall

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = [("16", "0.05"), ("16", "0.3"), ("64", "0.05"), ("64", "0.3")]  # batch size × learning rate
FAST = ["--max-examples", "128", "--energy-samples", "8", "--pac-samples", "5", "--steps", "5"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The worked example in miniature: four tiny SGD runs on teacher data, batch size × learning rate."""
    root = tmp_path_factory.mktemp("family")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bs, lr in GRID:
            tiny = [a for a in TINY_TRAIN]
            tiny[tiny.index("--batch-size") + 1] = bs
            result = invoke("train", "--steps", "12", "--lr", lr, *tiny, "--out", root / f"bs{bs}-lr{lr}")
            assert result.exit_code == 0, result.stderr
    finally:
        torch.set_num_threads(threads)
    return [root / f"bs{bs}-lr{lr}" for bs, lr in GRID]


@pytest.fixture(scope="module")
def worked(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = invoke("compare", *family, *FAST, "--device", "cpu", "--csv", out / "c.csv", "--json", out / "c.json",
                    "--plot", out / "c.png")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO((out / "c.csv").read_text())))
    return result, rows, json.loads((out / "c.json").read_text()), out


def test_worked_example_runs(worked, family):
    result, rows, doc, out = worked
    measures = ["local_energy", "sharpness", "pac_bayes"] + (["hessian"] if hessian_available() else [])
    assert list(rows[0]) == ["checkpoint", "train_error", "test_error", "gap", *measures, "batch_size", "lr"]
    assert [r["checkpoint"] for r in rows] == [str(p) for p in family]
    assert [(r["batch_size"], r["lr"]) for r in rows] == GRID
    assert (out / "c.png").stat().st_size > 1000
    assert "rank agreement with generalization" in result.stderr and "Ψ: mean over" in result.stderr
    for r in rows:
        assert float(r["gap"]) == pytest.approx(float(r["test_error"]) - float(r["train_error"]), abs=1e-15)
    assert doc["hypers"] == ["batch_size", "lr"] and len(doc["per_checkpoint"]) == 4
    assert all(set(c["psi_per_hyper"]) <= {"batch_size", "lr"} for c in doc["correlations"])
    assert len(doc["correlations"]) == 2 * len(measures)


def test_tau_and_rho_are_scipys_on_its_own_csv(worked):
    _, rows, doc, _ = worked
    for c in doc["correlations"]:
        x = [float(r[c["measure"]]) for r in rows]
        y = [float(r[c["against"]]) for r in rows]
        tau, rho = kendalltau(x, y), spearmanr(x, y)
        for got, want in ((c["kendall_tau"], tau.statistic), (c["kendall_p"], tau.pvalue),
                          (c["spearman_rho"], rho.statistic), (c["spearman_p"], rho.pvalue)):
            assert (got is None and math.isnan(want)) or got == pytest.approx(want, abs=1e-12), c
        assert c["n"] == 4


def test_psi_is_the_granulated_kendall_of_its_csv(worked):
    _, rows, doc, _ = worked
    hypers = [{"batch_size": int(r["batch_size"]), "lr": float(r["lr"])} for r in rows]
    for c in doc["correlations"]:
        x = [float(r[c["measure"]]) for r in rows]
        y = [float(r[c["against"]]) for r in rows]
        want = granulated_kendall(x, y, hypers).psi
        assert (c["psi"] is None and math.isnan(want)) or c["psi"] == pytest.approx(want, abs=1e-12)


def test_per_checkpoint_numbers_are_the_individual_commands(worked, family):
    _, rows, _, _ = worked
    common = ["--max-examples", "128", "--device", "cpu", "--csv", "-"]

    def column(*args, key):
        result = invoke(*args, *common)
        assert result.exit_code == 0, result.stderr
        return [r[key] for r in csv.DictReader(io.StringIO(result.stdout))]

    assert column("local-energy", *family, "--sigmas", "0.1", "--samples", "8", key="delta_error") == \
        [r["local_energy"] for r in rows]
    assert column("sharpness", *family, "--rho", "0.1", "--steps", "5", key="sharpness") == \
        [r["sharpness"] for r in rows]
    assert column("pac-bayes", *family, "--samples", "5", key="flatness") == [r["pac_bayes"] for r in rows]


def test_hessian_column_is_the_hessian_estimator(family):
    hessian = pytest.importorskip("flatcli.measure.hessian")
    from flatcli.loading import load_checkpoint
    result = invoke("compare", *family[:2], "--measures", "hessian", "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    for path, row in zip(family, rows):
        loaded = load_checkpoint(path)
        want = hessian.hessian_spectrum(loaded.model, loaded.data.train.tensors(), top_k=1, bottom_k=0, trace=False,
                                        density=False, seed=0, loss=loaded.loss).eigenvalues[0]
        assert float(row["hessian"]) == pytest.approx(float(want), rel=1e-6)


def test_library_compare_without_hyper_parameters():
    """Plain models and tensors: no Ψ (no hyper-parameters), τ still there."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    xt, yt = torch.randn(32, 4), torch.randint(0, 2, (32,))
    subjects = [Subject(f"m{i}", torch.nn.Linear(4, 2), (x, y), (x, y), (xt, yt)) for i in range(3)]
    calls = []
    r = compare(subjects, measures=["sharpness", "pac-bayes"], steps=3, pac_samples=3,
                            callback=lambda k, total: calls.append(total))
    assert r.hypers == [] and calls == [6] * 6 and [row["checkpoint"] for row in r.rows] == ["m0", "m1", "m2"]
    assert all(math.isnan(c["psi"]) for c in r.correlations)
    assert r.correlations[0]["kendall_tau"] == pytest.approx(
        kendalltau([row["sharpness"] for row in r.rows], [row["test_error"] for row in r.rows]).statistic)


@pytest.mark.parametrize("args,fragments", [
    (["--measures", "flatness"], ["'flatness' is not a measure"]),
    (["--measures", ","], ["names no measure"]),
    (["--sigma", "0"], ["--sigma 0"]),
])
def test_user_mistakes(family, args, fragments):
    assert_user_error(invoke("compare", *family[:2], *args, "--device", "cpu"), *fragments)


def test_one_checkpoint_is_not_a_comparison(family):
    assert_user_error(invoke("compare", family[0], "--device", "cpu"), "at least two")


def test_hessian_asked_for_but_absent(family):
    if hessian_available():
        pytest.skip("flatcli.measure.hessian is installed")
    assert_user_error(invoke("compare", *family[:2], "--measures", "hessian", "--device", "cpu"),
                      "flatcli.measure.hessian")


@pytest.mark.parametrize("command", ["sharpness", "pac-bayes", "compare"])
def test_help_imports_no_torch(command):
    """python -X importtime lists every module imported: none of torch, numpy, scipy or matplotlib."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flatcli", command, "--help"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "flatcli" in imported and not imported & {"torch", "numpy", "scipy", "matplotlib"}


SHRINK = {"--epochs 30": "--steps 6", "--n-train 2000": "--n-train 128", "--n-test 2000": "--n-test 64",
          "--width 32": "--width 8"}


def test_the_readmes_worked_example_runs_as_written(tmp_path, monkeypatch):
    """The README's command lines, expanded by bash itself (flatcli stubbed to print its arguments), then run
    in-process with the training budget and data shrunk; the compare line is taken as it is."""
    import glob
    import subprocess
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### A worked example", 1)[1].split("```", 1)[0]
    script = "\n".join(line[4:] for line in block.splitlines() if line.startswith("    "))
    assert script.count("flatcli train") == 3 and "flatcli compare runs/*" in script
    for big in SHRINK:
        assert big in script, big
    for big, small in SHRINK.items():
        script = script.replace(big, small)
    monkeypatch.chdir(tmp_path)
    lines = subprocess.run(["bash", "-c", "flatcli() { printf '%s\\0' \"$@\"; printf '\\n'; }\n" + script],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    commands = [[a for a in line.split("\0") if a] for line in lines]
    assert len(commands) == 7 and commands[-1][0] == "compare"
    for args in commands[:-1]:
        result = invoke(*args, "--device", "cpu")
        assert result.exit_code == 0, (args, result.stderr)
    args = [a for arg in commands[-1] for a in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
    result = invoke(*args, "--device", "cpu", "--measures", "local-energy,sharpness,pac-bayes")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "compare.png").exists() and len((tmp_path / "compare.csv").read_text().splitlines()) == 7
    assert "rank agreement with generalization" in result.stderr


def test_local_entropy_is_opt_in_and_the_estimator_s_value():
    from flatcli.measure import local_entropy
    torch.manual_seed(2)
    x, y = torch.randn(48, 3), torch.randint(0, 2, (48,))
    subjects = [Subject(f"m{i}", torch.nn.Linear(3, 2), (x, y), (x, y), (x[:16], y[:16])) for i in range(2)]
    assert "local-entropy" not in compare_defaults()
    r = compare(subjects, measures=["local-entropy"], gamma=300.0, seed=1)
    for subject, row in zip(subjects, r.rows):
        want = local_entropy(subject.model, (x, y), [300.0], seed=1).rows[0].local_entropy
        assert row["local_entropy"] == want


def compare_defaults():
    from flatcli.measure.compare import parse_measures
    return parse_measures(None)[0]
