"""flatcli sharpness and flatcli pac-bayes end to end: the library's numbers through the pipeline, the CSV
columns, average-case sharpness against local-energy's δL, BatchNorm recompute, and user mistakes."""
import csv
import io
import json

import pytest
import torch

from clitools import assert_user_error, invoke
from flatcli.data import DataSpec, load_data
from flatcli.loading import load_checkpoint
from flatcli.measure.pac_bayes import pac_bayes_sigma
from flatcli.measure.sharpness import sharpness

pytestmark = pytest.mark.usefixtures("one_thread")

SHARP_HEAD = "checkpoint,kind,norm,adaptive,rho,m,sharpness,sem"
PAC_HEAD = "checkpoint,noise,target,sigma,flatness"


def rows_of(*args):
    result = invoke(*args, "--device", "cpu", "--csv", "-")
    assert result.exit_code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout))), result


def _train_data(run):
    loaded = load_checkpoint(run)
    return loaded.model, loaded.data.train.tensors()


def test_sharpness_cli_is_the_library(runs):
    rows, result = rows_of("sharpness", runs / "sgd", "--rho", "0.1,0.05", "--kind", "both", "--samples", "4",
                           "--m", "100", "--steps", "6")
    assert result.stdout.startswith(SHARP_HEAD + ",")
    model, data = _train_data(runs / "sgd")
    lib = sharpness(model, data, [0.05, 0.1], kind="both", samples=4, m=100, steps=6)
    assert [(r["kind"], float(r["rho"]), int(r["m"])) for r in rows] == \
        [("worst", 0.05, 100), ("worst", 0.1, 100), ("average", 0.05, 100), ("average", 0.1, 100)]
    assert [float(r["sharpness"]) for r in rows] == [p.sharpness for p in lib.points]
    assert rows[0]["batches"] == "2" and rows[0]["examples"] == "200" and rows[2]["norm"] == ""
    assert "sharpness ± sem" in result.stderr


def test_average_case_equals_local_energy_through_the_cli(runs):
    """Same seed, examples and batch size: the CSV numbers are the same floats."""
    args = ("--max-examples", "150", "--seed", "4", "--batch-size", "64")
    sharp, _ = rows_of("sharpness", runs / "sgd", "--kind", "average", "--rho", "0.05,0.2", "--samples", "6", *args)
    energy, _ = rows_of("local-energy", runs / "sgd", "--sigmas", "0.05,0.2", "--samples", "6", *args)
    assert [r["sharpness"] for r in sharp] == [r["delta_loss"] for r in energy]
    assert [r["sem"] for r in sharp] == [r["loss_sem"] for r in energy]
    plain, _ = rows_of("sharpness", runs / "sgd", "--kind", "average", "--rho", "0.05", "--samples", "6",
                       "--no-adaptive", *args)
    additive, _ = rows_of("local-energy", runs / "sgd", "--sigmas", "0.05", "--samples", "6", "--noise",
                          "additive", *args)
    assert plain[0]["sharpness"] == additive[0]["delta_loss"] and plain[0]["adaptive"] == "False"


def test_pac_bayes_cli_is_the_library(runs, tmp_path):
    out = tmp_path / "pb.json"
    result = invoke("pac-bayes", runs / "sgd", "--samples", "5", "--plain", "--max-sigma", "2", "--target", "0.05",
                    "--device", "cpu", "--csv", "-", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(PAC_HEAD + ",")
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    model, data = _train_data(runs / "sgd")
    lib = pac_bayes_sigma(model, data, samples=5, noise="plain", max_sigma=2.0, target=0.05)
    assert (row["noise"], float(row["sigma"]), float(row["flatness"]), int(row["probes"])) == \
        ("plain", lib.sigma, lib.flatness, lib.probes)
    doc = json.loads(out.read_text())
    assert len(doc["settings"]["per_checkpoint"][0]["probes"]) == lib.probes
    assert doc["settings"]["noise"] == "plain"


def test_batchnorm_recompute_differs_from_stored_statistics(tmp_path, cifar10_dir):
    """convnet (BatchNorm) on a CIFAR-format set, measured on the test split, statistics re-estimated on training
    batches: the numbers move, and they are the library's with the same seeded training images."""
    data = ["--data", "cifar10", "--data-dir", cifar10_dir.data_dir]
    result = invoke("train", "--model", "convnet", *data, "--steps", 2, "--batch-size", 8, "--device", "cpu",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    args = [tmp_path / "run", "--split", "test", "--batch-size", 8, "--seed", 3]
    sharp = ["--kind", "both", "--rho", "0.1", "--samples", 2, "--steps", 3]
    stored, _ = rows_of("sharpness", *args, *sharp)
    recomputed, _ = rows_of("sharpness", *args, *sharp, "--bn", "recompute", "--bn-batches", 2)
    assert all(r["bn"] == "recompute" for r in recomputed)
    assert [r["sharpness"] for r in stored] != [r["sharpness"] for r in recomputed]
    loaded = load_checkpoint(tmp_path / "run")
    train = load_data(DataSpec("cifar10", data_dir=cifar10_dir.data_dir)).train
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:16]
    lib = sharpness(loaded.model, loaded.data.test.tensors(), 0.1, kind="both", samples=2, steps=3, seed=3,
                    batch_size=8, bn="recompute", bn_data=train.batch(idx), bn_batches=2)
    assert [float(r["sharpness"]) for r in recomputed] == [p.sharpness for p in lib.points]
    (pac,), _ = rows_of("pac-bayes", *args, "--samples", 2, "--tolerance", 0.2, "--bn", "recompute",
                        "--bn-batches", 2)
    lib = pac_bayes_sigma(loaded.model, loaded.data.test.tensors(), samples=2, tolerance=0.2, seed=3, batch_size=8,
                          bn="recompute", bn_data=train.batch(idx), bn_batches=2)
    assert float(pac["sigma"]) == lib.sigma and pac["bn"] == "recompute"


@pytest.mark.parametrize("cmd,args,fragments", [
    ("sharpness", ["--rho", "abc"], ["rho", "abc"]),
    ("sharpness", ["--rho", "-0.1"], ["--rho -0.1"]),
    ("sharpness", ["--kind", "max"], ["--kind"]),
    ("sharpness", ["--m", "0"], ["--m"]),
    ("pac-bayes", ["--tolerance", "0"], ["--tolerance 0"]),
    ("pac-bayes", ["--max-sigma", "-1"], ["--max-sigma -1"]),
    ("pac-bayes", ["--target", "2"], ["--target"]),
])
def test_user_mistakes(runs, cmd, args, fragments):
    assert_user_error(invoke(cmd, runs / "sgd", *args, "--device", "cpu"), *fragments)
