"""Every command under real torchrun with 2 CPU processes (Gloo): the same numbers as one process."""
import csv
import io
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from clitools import invoke, weights

TINY = ["--data", "teacher", "--n-train", "256", "--n-test", "64", "--batch-size", "32", "--device", "cpu"]


def torchrun(*args, env=None, timeout=180):
    """``torchrun --standalone --nproc_per_node=2 ARGS``, as a user would type it."""
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_close_weights(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("algo, extra", [
    ("sgd", ["--momentum", "0.9"]),
    ("esgd", ["--momentum", "0.5", "--noise", "1e-3"]),
    ("rsgd", ["--replicas", "4", "--coupling-every", "2", "--momentum", "0.9"]),
])
def test_train_matches_one_process(tmp_path, algo, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "--algo", algo, "--steps", "12", *TINY, *extra]
    assert invoke(*args, "--out", one).exit_code == 0
    result = torchrun("-m", "flatcli", *args, "--out", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_weights(one / "model.safetensors", two / "model.safetensors")
    if algo == "rsgd":
        assert_close_weights(one / "replicas.safetensors", two / "replicas.safetensors")
    assert result.stderr.count("checkpoint:") == 1  # rank 0 alone speaks


@pytest.mark.parametrize("algo,extra,first,second", [
    ("rsgd", ["--replicas", "2"], "torchrun", "one"),   # replicas of 2 ranks resumed by one process
    ("sgd", [], "one", "torchrun")])                   # a one-process run resumed data-parallel on 2 ranks
def test_resume_at_another_world_size_matches_uninterrupted(tmp_path, algo, extra, first, second):
    args = ["train", "--algo", algo, *extra, *TINY, "--momentum", "0.9"]
    assert invoke(*args, "--steps", "20", "--out", tmp_path / "one").exit_code == 0
    launch = {"one": lambda *a: subprocess.run([sys.executable, "-m", "flatcli", *map(str, a)], capture_output=True,
                                               text=True, timeout=180), "torchrun": lambda *a: torchrun("-m", "flatcli", *a)}
    done = launch[first](*args, "--steps", "9", "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    result = launch[second]("train", "--resume", tmp_path / "two", "--steps", "20", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
    assert "resuming" in said and "at step 9" in said
    for name in ("model.safetensors",) + (("replicas.safetensors",) if algo == "rsgd" else ()):
        assert_close_weights(tmp_path / "one" / name, tmp_path / "two" / name)


def test_replicas_must_split_evenly(tmp_path):
    result = torchrun("-m", "flatcli", "train", "--algo", "rsgd", "--replicas", "3", "--steps", "1", *TINY,
                      "--out", tmp_path / "r")
    assert result.returncode != 0
    assert "error: --replicas 3 cannot be split evenly over 2 ranks" in result.stderr


STALL = textwrap.dedent('''
    import os, sys, time, torch
    from flatcli import distributed
    from flatcli.errors import FlatcliError
    dist, _ = distributed.setup(torch.device("cpu"))
    if dist.rank == 1:
        if sys.argv[1] == "die":
            sys.exit(3)
        time.sleep(120)            # a rank that stops answering
    try:
        distributed.all_reduce_([torch.ones(3)])
    except FlatcliError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
''')


@pytest.mark.parametrize("how", ["stall", "die"])
def test_a_failed_or_stalled_rank_ends_the_job_with_a_clear_error(tmp_path, how):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    result = torchrun(script, how, env={"FLATCLI_DIST_TIMEOUT": "5"}, timeout=90)
    assert result.returncode != 0
    if how == "stall":
        assert "error: rank 0: another rank failed or stopped answering" in result.stderr
        assert "FLATCLI_DIST_TIMEOUT" in result.stderr


def test_local_energy_matches_one_process_exactly(tmp_path):
    run = tmp_path / "run"
    assert invoke("train", "--steps", "5", *TINY, "--out", run).exit_code == 0
    args = ["local-energy", run, "--sigmas", "0,0.05,0.2", "--samples", "5", "--max-examples", "128",
            "--seed", "3", "--device", "cpu", "--csv", "-"]
    one = invoke(*args)
    assert one.exit_code == 0, one.stderr
    two = torchrun("-m", "flatcli", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout  # draw k is the same noise on any rank: bit-identical CSV
    assert len(list(csv.DictReader(io.StringIO(two.stdout)))) == 3


def test_local_entropy_matches_one_process_exactly(tmp_path):
    """Passes of chains shared out (rank 0: passes 0 and 2, rank 1: pass 1) and gathered: the one-process CSV,
    byte for byte, against a single process with the same one thread that torchrun gives each rank."""
    run = tmp_path / "run"
    assert invoke("train", "--steps", "5", *TINY, "--out", run).exit_code == 0
    args = ["local-entropy", run, "--gammas", "1,10", "--steps", "6", "--burn-in", "2", "--chains", "5",
            "--chains-per-pass", "2", "--max-examples", "32", "--seed", "3", "--device", "cpu", "--csv", "-"]
    one = subprocess.run([sys.executable, "-m", "flatcli", *map(str, args)], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "flatcli", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout  # chain c is the same chain, computed the same way, on any rank
    rows = list(csv.DictReader(io.StringIO(two.stdout)))
    assert len(rows) == 2 and {r["chains"] for r in rows} == {"5"}
    assert two.stderr.count("on 1 checkpoint(s)") == 1  # rank 0 alone speaks
