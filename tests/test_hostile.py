"""Hostile files and faults: every one ends in one line and exit 2 (or is measured honestly), with no
traceback, no partial file and no side effect; a killed run always resumes; two runs never share a folder."""
import errno
import json
import os
import pickle
import random
import signal
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clitools import assert_user_error, invoke

REPO = Path(__file__).resolve().parents[1]
DATA = ["--model", "mlp", "--data", "teacher", "--width", "16"]
TINY = ["--n-train", "256", "--n-test", "128", "--batch-size", "32", "--width", "16", "--device", "cpu"]
ENERGY = ["local-energy", "--sigmas", "0,0.1", "--samples", "2", "--device", "cpu"]
ENTROPY = ["local-entropy", "--steps", "2", "--burn-in", "1", "--chains", "1", "--chains-per-pass", "1",
           "--device", "cpu"]
MEASUREMENTS = {"local-energy": ENERGY, "local-entropy": ENTROPY}
pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes (``.NAME.XXXXXX.tmp...``) left in ``folder``."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def one_error_line(result, *fragments) -> str:
    """A failure found during the work: exit 2, the last stderr line is the one error line, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and "Traceback" not in result.stderr, (result.exit_code, result.stderr[-2000:])
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr[-2000:]
    for f in fragments:
        assert f.lower() in lines[-1].lower(), (f, lines[-1])
    return lines[-1]


def doctored(run: Path, dest: Path, meta=None, weights=None) -> Path:
    """A copy of a run folder with its metadata replaced by ``meta(old)`` and its tensors by ``weights(t)``."""
    dest.mkdir()
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        old = json.loads(f.metadata()["flatcli"])
    tensors = load_file(str(run / "model.safetensors"))
    new = meta(old) if meta else old
    save_file({k: weights(v) if weights else v for k, v in tensors.items()}, str(dest / "model.safetensors"),
              metadata={"flatcli": json.dumps(new)})
    state = torch.load(run / "state.pt", weights_only=True)
    state["meta"] = new
    torch.save(state, dest / "state.pt")
    return dest


def safetensors_bytes(header: dict, data: bytes = b"", declared: int | None = None) -> bytes:
    """A hand-made safetensors file: u64 header length (possibly a lie), JSON header, data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


# -- malicious pickles: nothing runs ---------------------------------------------------------------------

class Boom:
    """Unpickling this creates the file ``target`` (what any code in a pickle could do)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle", "nested"])
@pytest.mark.parametrize("role", ["checkpoint", "data", "init"])
def test_a_malicious_pickle_never_runs(tmp_path, how, role):
    target = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"x": torch.zeros(4, 3), "y": Boom(str(target))}, path)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps(Boom(str(target))))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": [Boom(str(target))]}, path)
    args = {"checkpoint": ["info", path, *DATA], "data": ["train", "--data", path, "--steps", "1", "--out",
                                                          tmp_path / "o", "--device", "cpu"],
            "init": ["train", "--init", path, "--steps", "1", "--out", tmp_path / "o", *TINY]}[role]
    assert_user_error(invoke(*args), "pickle")
    assert not target.exists() and not (tmp_path / "o").exists()


def test_plain_pickle_and_torchscript_print_no_torch_warning(tmp_path, capfd):
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": np.zeros(3)}, protocol=4))
    capfd.readouterr()
    assert_user_error(invoke("info", plain, *DATA), "pickled", "--trust-pickle")
    data = tmp_path / "data.pt"
    data.write_bytes(pickle.dumps({"x": np.zeros((4, 3)), "y": np.zeros(4)}, protocol=4))
    line = invoke("train", "--data", data, "--steps", "1", "--out", tmp_path / "o", "--device", "cpu")
    assert_user_error(line, "pickled", "never unpickles a data file", "torch.save")
    assert "weights_only=False" not in line.stderr and "Re-running" not in line.stderr  # the wrong way
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(30, 10))).save(str(scripted))
    capfd.readouterr()
    result = invoke("info", scripted, "--data", "teacher")
    assert result.exit_code == 0 and "warn" not in result.stderr.lower(), result.stderr
    assert "warn" not in capfd.readouterr().err.lower()  # nor on the real stderr, from C++


def test_a_fake_torchscript_archive_is_one_line(tmp_path):
    fake = tmp_path / "fake.pt"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("archive/constants.pkl", b"garbage")
        z.writestr("archive/code/__torch__.py", "import os\nos.system('touch PWNED')\n")
    assert_user_error(invoke("info", fake, "--data", "teacher"), "not a loadable TorchScript archive")
    assert not (tmp_path / "PWNED").exists()


# -- lying safetensors headers -----------------------------------------------------------------------------

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
LIES = {
    "huge offsets": safetensors_bytes({"w": {**F32, "data_offsets": [0, 10 ** 15]}}, b"\0" * 8),
    "header longer than the file": safetensors_bytes({"w": F32}, b"\0" * 8, declared=10 ** 6),
    "dtype lies about the size": safetensors_bytes({"w": {**F32, "shape": [3]}}, b"\0" * 8),
    "unknown dtype": safetensors_bytes({"w": {**F32, "dtype": "Q99"}}, b"\0" * 8),
    "header length 2^60": safetensors_bytes({}, declared=2 ** 60),
    "a real 120 MB header": safetensors_bytes({"__metadata__": {"flatcli": "x" * (120 * 2 ** 20)}}),
    "truncated": safetensors_bytes({"w": F32}, b"\0" * 3),
    "empty": b"",
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_safetensors_header_is_one_line(tmp_path, lie):
    path = tmp_path / "w.safetensors"
    path.write_bytes(LIES[lie])
    assert_user_error(invoke("info", path, *DATA), "safetensors")


# -- symlinks, FIFOs, devices, read-only and occupied targets ----------------------------------------------

def test_links_to_devices_and_link_loops_are_refused(tmp_path):
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    assert_user_error(invoke("info", tmp_path / "zero.pt", *DATA), "a device, not a regular file")
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    assert_user_error(invoke("info", tmp_path / "a.pt", *DATA), "a.pt")
    (tmp_path / "gone.pt").symlink_to(tmp_path / "nowhere.pt")
    assert_user_error(invoke("info", tmp_path / "gone.pt", *DATA), "does not exist")
    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    assert_user_error(invoke("train", "--data", tmp_path / "zero.npz", "--steps", "1", "--out", tmp_path / "o"),
                      "a device, not a regular file")
    assert not (tmp_path / "o").exists()


def test_a_csv_that_is_a_link_replaces_the_link_not_its_target(runs, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out.csv").symlink_to(victim)
    assert invoke(*ENERGY, runs / "sgd", "--csv", tmp_path / "out.csv").exit_code == 0
    assert victim.read_text() == "precious\n" and not (tmp_path / "out.csv").is_symlink()
    assert (tmp_path / "out.csv").read_text().startswith("checkpoint,")


@pytest.mark.parametrize("option", ["--csv", "--json"])
def test_an_output_naming_a_folder_is_refused_before_the_work(runs, tmp_path, option):
    folder = tmp_path / "results"
    folder.mkdir()
    for command in MEASUREMENTS.values():  # one line: refused before the settings line, i.e. before any work
        assert_user_error(invoke(*command, runs / "sgd", option, folder), "is a folder", option)
    assert list(folder.iterdir()) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["csv", "json", "out"])
def test_a_read_only_target_is_refused_before_the_work(runs, tmp_path, monkeypatch, target):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: the OS's answer for a read-only folder is simulated
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    else:
        folder.chmod(0o555)
    if target == "out":
        result = invoke("train", "--steps", "1", "--out", folder, *TINY)
    else:
        result = invoke(*ENERGY, runs / "sgd", f"--{target}", folder / f"x.{target}")
    assert_user_error(result, "not writable")
    folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_out_empty_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke("train", "--out", "", "--steps", "1", *TINY), "--out ''")
    assert list(tmp_path.iterdir()) == []


# -- broken networks are never reported flat -----------------------------------------------------------------

BROKEN = {"nan": lambda t: t * float("nan"), "inf": lambda t: t * float("inf"), "x1e30": lambda t: t * 1e30}


@pytest.mark.parametrize("command", list(MEASUREMENTS))
@pytest.mark.parametrize("weights", list(BROKEN))
def test_a_broken_network_is_refused_by_every_measurement(runs, tmp_path, command, weights):
    run = doctored(runs / "sgd", tmp_path / "broken", weights=BROKEN[weights])
    result = invoke(*MEASUREMENTS[command], run, "--csv", tmp_path / "out.csv")
    line = assert_user_error(result, "non-finite", "checkpoint is broken") or result.stderr
    assert "Langevin lr" not in line and "learning rate" not in line  # the hint points at the checkpoint
    assert not (tmp_path / "out.csv").exists()


def test_non_finite_losses_under_perturbation_are_counted_not_averaged(runs):
    result = invoke("local-energy", runs / "sgd", "--sigmas", "0,1e37", "--samples", "3", "--csv", "-",
                    "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    rows = [line.split(",") for line in result.stdout.splitlines()]
    head, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    assert [r["nonfinite"] for r in rows] == ["0", "3"]
    assert rows[1]["loss_mean"] in ("nan", "") and float(rows[0]["loss_mean"]) > 0
    assert "non-finite loss under noise" in result.stderr and "nonfinite" in head


def test_a_diverged_run_names_a_good_last_checkpoint(tmp_path):
    out = tmp_path / "div"
    line = one_error_line(invoke("train", "--epochs", "3", "--n-train", "256", "--batch-size", "256", "--lr", "1e38",
                                 "--out", out, "--device", "cpu", "--width", "16"), "last good checkpoint")
    step = int(line.split("(step ")[1].split(")")[0])
    report = json.loads(invoke("info", out, "--evaluate", "--json").stdout)
    assert report["metadata"]["step"] == step and report["metadata"]["complete"] is False
    assert np.isfinite(report["evaluation"]["train_loss"])
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    one_error_line(invoke("train", "--steps", "1", "--lr", "1e38", "--out", tmp_path / "one", *TINY), "non-finite")
    assert json.loads(invoke("info", tmp_path / "one", "--json").stdout)["metadata"]["complete"] is False


# -- absurd option values --------------------------------------------------------------------------------------

BIG = "100000000000000000000"  # 1e20
ABSURD = [
    ("local-entropy", ["--beta", "1e308"], "--beta"), ("local-entropy", ["--langevin-lr", "1e308"], "--langevin-lr"),
    ("local-entropy", ["--gammas", "1e308"], "--gammas"), ("local-energy", ["--sigmas", "1e308"], "sigmas"),
    ("local-energy", ["--samples", BIG], "--samples"), ("local-entropy", ["--steps", BIG], "--steps"),
    ("local-entropy", ["--chains", BIG], "--chains"), ("local-energy", ["--seed", str(2 ** 63)], "--seed"),
    ("local-entropy", ["--seed", str(2 ** 64)], "--seed"), ("local-energy", ["--threads", BIG], "--threads"),
    ("train", ["--lr", "1e308"], "--lr"), ("train", ["--weight-decay", "1e308"], "--weight-decay"),
    ("train", ["--gamma", "1e308", "--algo", "rsgd"], "--gamma"), ("train", ["--momentum", "1e308"], "--momentum"),
    ("train", ["--langevin-lr", "1e308", "--algo", "esgd"], "--langevin-lr"),
    ("train", ["--seed", str(2 ** 63)], "--seed"), ("train", ["--steps", BIG], "--steps"),
    ("train", ["--epochs", BIG], "--epochs"), ("train", ["--data-seed", str(2 ** 64)], "data seed"),
    ("train", ["--threads", BIG], "--threads"), ("train", ["--depth", BIG], "depth"),
    ("train", ["--width", "10000000"], "width"), ("train", ["--n-train", BIG], "n_train"),
]


@pytest.mark.parametrize("command,args,fragment", ABSURD, ids=[" ".join([c, *a])[:40] for c, a, _ in ABSURD])
def test_an_absurd_option_value_is_one_line(runs, tmp_path, command, args, fragment):
    if command == "train":
        flags = [a for a in args if a.startswith("--")]
        base = [x for i, x in enumerate(TINY) if x not in flags and (i == 0 or TINY[i - 1] not in flags)]
        result = invoke("train", *args, "--out", tmp_path / "o", *base, *([] if "--steps" in flags else ["--steps", "2"]))
    else:
        result = invoke(*MEASUREMENTS[command], runs / "sgd", *args)
    assert_user_error(result, fragment)
    assert not (tmp_path / "o" / "model.safetensors").exists()


# -- damaged metadata -------------------------------------------------------------------------------------------

DAMAGE = {"{}": lambda m: {}, "[]": lambda m: [], "1": lambda m: 1,
          "no model": lambda m: {k: v for k, v in m.items() if k != "model"},
          "no data": lambda m: {k: v for k, v in m.items() if k != "data"},
          "replicas abc": lambda m: {**m, "replicas": "abc"}, "metrics [1, 2]": lambda m: {**m, "metrics": [1, 2]},
          "model a string": lambda m: {**m, "model": "mlp"}, "width 1e7": lambda m: {**m, "model": {
              **m["model"], "width": 10 ** 7}}, "n_train 1e10": lambda m: {**m, "data": {**m["data"], "n_train": 10 ** 10}}}


@pytest.mark.parametrize("command", [["info"], ENERGY, ["train", "--resume"]], ids=["info", "energy", "resume"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_metadata_is_one_line(runs, tmp_path, command, damage):
    run = doctored(runs / "sgd", tmp_path / "bad", meta=DAMAGE[damage])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    assert_user_error(invoke(*command, run))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir() if p.name != ".lock") == before


# -- inputs that would exhaust memory ---------------------------------------------------------------------------

def npz_with_lying_header(path: Path, shape: tuple) -> Path:
    """An .npz whose member x.npy declares ``shape`` (float64) but holds 32 bytes."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    buf = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 32)
        y = __import__("io").BytesIO()
        np.save(y, np.zeros(4, np.int64))
        z.writestr("y.npy", y.getvalue())
    return path


def test_sizes_declared_by_files_are_checked_before_allocation(tmp_path):
    train = ["--steps", "1", "--out", tmp_path / "o", "--device", "cpu"]
    lying = npz_with_lying_header(tmp_path / "lie.npz", (10 ** 12, 4))
    assert_user_error(invoke("train", "--data", lying, *train), "declares shape", "x.npy")
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 2, 10 ** 12]))
    assert_user_error(invoke("train", "--data", tmp_path / "labels.npz", *train), "label 1000000000000")
    assert not (tmp_path / "o").exists()


def test_a_small_npz_that_expands_past_the_memory_limit_is_refused(tmp_path):
    """512 MB of zeros compressed to ~0.5 MB, read under a 300 MB address-space limit: refused before numpy
    allocates it (numpy would allocate the whole declared array first)."""
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (2 ** 29,)})
            block = bytes(2 ** 24)
            for _ in range(32):
                f.write(block)
        with z.open("y.npy", "w") as f:
            np.save(f, np.zeros(4, np.int64))
    assert bomb.stat().st_size < 3 * 2 ** 20
    import killtools
    log = tmp_path / "log.txt"
    capped = killtools.start(["train", "--data", bomb, "--steps", "1", "--out", tmp_path / "o", "--device", "cpu"],
                             log=log, address_space=300 * 2 ** 20)
    capped.join(120)
    lines = log.read_text().strip().splitlines()
    assert capped.exitcode == 2 and len(lines) == 1 and "Traceback" not in lines[0], log.read_text()[-2000:]
    assert "GiB of memory available" in lines[0] and "bomb.npz" in lines[0]
    assert not (tmp_path / "o").exists()


# -- a full disk ------------------------------------------------------------------------------------------------

def fail_fsync_after(monkeypatch, n: int) -> None:
    """The n-th and every later fsync of a file fails with ENOSPC, as on a disk that fills up."""
    real, calls = os.fsync, [0]

    def fsync(fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            calls[0] += 1
            if calls[0] >= n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_during_train_keeps_the_last_resumable_state(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_fsync_after(monkeypatch, 5)  # save 1 (state, weights, metrics) passes; save 2's weights file fails
    line = one_error_line(invoke("train", "--steps", "6", "--save-every", "2", "--out", out, *TINY),
                          "No space left on device", "keeps the state of step 2", f"--resume {out}")
    assert "model.safetensors" in line
    monkeypatch.undo()
    assert leftovers(out) == []
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert invoke("train", "--resume", out).exit_code == 0


@pytest.mark.parametrize("option", ["--csv", "--json"])
def test_a_full_disk_when_writing_results_keeps_the_old_file(runs, tmp_path, monkeypatch, option):
    path = tmp_path / "out.txt"
    path.write_text("old results\n")
    fail_fsync_after(monkeypatch, 1)
    one_error_line(invoke(*ENERGY, runs / "sgd", option, path), "No space left on device",
                   "the previous version is kept")
    assert path.read_text() == "old results\n" and leftovers(tmp_path) == []


# -- kills at random moments -------------------------------------------------------------------------------------

RSGD = ["train", "--algo", "rsgd", "--replicas", "2", "--epochs", "150", "--steps", "600", "--save-every", "1",
        "--n-train", "64", "--n-test", "16", "--batch-size", "16", "--width", "4", "--device", "cpu", "--threads", "1"]


def comparable(run: Path) -> dict:
    """What must be bit-identical: the weight files, and metrics.csv without its wall-clock column."""
    rows = (run / "metrics.csv").read_text().splitlines()
    drop = rows[0].split(",").index("seconds")
    metrics = [",".join(c for i, c in enumerate(r.split(",")) if i != drop) for r in rows]
    return {"model": (run / "model.safetensors").read_bytes(), "replicas": (run / "replicas.safetensors").read_bytes(),
            "metrics": metrics}


def saved_at(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


@pytest.mark.slow  # ~7 s of CPU, but 55-65 s of wall time at a load of 6 on 2 cores
def test_sigkill_at_random_moments_always_resumes_bit_identical(tmp_path, monkeypatch):
    """30 SIGKILLs: most a random moment (0-20 ms) after the child's first save, so they land in steps and in
    the middle of saves; every fifth during start-up. Each time the folder is resumed; the end is bit-identical."""
    import killtools
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, rng, kills, fresh, log = tmp_path / "killed", random.Random(12), 0, 0, tmp_path / "log.txt"
    reference = killtools.start([*RSGD, "--out", tmp_path / "reference"])  # meanwhile, on the other core
    while kills < 30:
        state = out / "state.pt"
        fresh += not state.exists()  # killed before the first save: nothing to resume, start again
        before = saved_at(state)
        process = killtools.start(["train", "--resume", out] if before else [*RSGD, "--out", out], log=log)
        if kills % 5 == 4:
            process.join(rng.uniform(0.0, 0.4))
        else:
            while process.exitcode is None and saved_at(state) == before:
                time.sleep(0.002)
            process.join(rng.uniform(0.0, 0.02))  # a few steps at most, so 30 kills fit in the run on a fast machine
        assert process.exitcode is None, f"finished after {kills} kills: make the run longer\n{log.read_text()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
        kills += 1
    final = killtools.start(["train", "--resume", out], log=log)
    final.join(120), reference.join(120)
    assert final.exitcode == 0 and reference.exitcode == 0, log.read_text()[-2000:]
    assert comparable(out) == comparable(tmp_path / "reference")
    assert leftovers(out) == [] and fresh < 5


# -- two runs in one folder ---------------------------------------------------------------------------------------

def held(lock: Path) -> bool:
    import fcntl
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def test_two_trains_on_one_folder_one_proceeds_the_other_is_refused(tmp_path, monkeypatch):
    import killtools
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    first = killtools.start([*RSGD, "--steps", "60", "--out", out], log=tmp_path / "first.txt")
    deadline = time.time() + 60
    while not (held(out / ".lock") and (out / "state.pt").exists() and (out / ".lock").read_text().strip()):
        assert time.time() < deadline and first.exitcode is None, (tmp_path / "first.txt").read_text()
        time.sleep(0.02)
    for args in ([*RSGD, "--out", out], ["train", "--resume", out]):
        result = invoke(*args)
        assert_user_error(result, "in use by another flatcli train", f"process {first.pid}")
    first.join(120)
    assert first.exitcode == 0, (tmp_path / "first.txt").read_text()[-2000:]
    meta = json.loads(invoke("info", out, "--json").stdout)["metadata"]
    assert meta["complete"] and meta["step"] == 60  # the whole run, by the one writer


def test_a_resumed_run_removes_the_temporaries_a_kill_left(tmp_path):
    """A kill inside a save leaves atomic_path's temporary or safetensors' own (.tmpXXXXXX) beside the files."""
    from flatcli.io import remove_stray_temporaries
    for name in (".model.safetensors.k2j4h1.tmp.safetensors", ".tmpejemsR", "notes.txt", ".lock"):
        (tmp_path / name).write_text("x")
    assert sorted(remove_stray_temporaries(tmp_path)) == [".model.safetensors.k2j4h1.tmp.safetensors", ".tmpejemsR"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]
