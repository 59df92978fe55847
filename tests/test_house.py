"""The house: an instant CLI, Ctrl-C everywhere, a fourth training algorithm in one file, the fixes of the
optimizers and outputs, and no code run, download or side effect because a file says so."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clitools import assert_user_error, invoke, same_tensors, weights
from flatcli import io as fio
from flatcli.optim import EntropySGD
from flatcli.training.algorithms import REGISTRY
from flatcli.training.algorithms.base import Algorithm

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "teacher",
        "--n-train", "256", "--n-test", "64", "--batch-size", "32", "--width", "16", "--device", "cpu"]
HEAVY = ("torch", "torchvision", "numpy")
pytestmark = pytest.mark.usefixtures("one_thread")


def flatcli_process(*args, cwd=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flatcli", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# -- an instant CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["info", "--help"],
                                  ["local-energy", "--help"], ["local-entropy", "--help"]])
def test_help_and_version_import_no_torch(args):
    """python -X importtime lists every module imported: none of torch, torchvision or numpy."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flatcli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "flatcli" in imported and not imported & set(HEAVY), imported & set(HEAVY)


class Watched:
    """A flatcli process whose stderr is read as it comes (a thread), so a test can wait for a line."""

    def __init__(self, *args):
        import threading
        self.proc, self.lines = flatcli_process(*args), []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert time.time() < deadline and self.proc.poll() is None, "".join(self.lines)[-2000:]
            time.sleep(0.05)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)


def assert_interrupted(code: int, err: str, out: Path):
    assert code == 130, (code, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("interrupted"), err[-2000:]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def wait_until_torch_is_mapped(pid: int, timeout: float = 60) -> None:
    """Until the process has loaded torch's shared library (flatcli, not the interpreter's own start-up, runs):
    a SIGINT before Python runs any code kills any program, so the test waits for the start-up that is flatcli's."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("the process never loaded torch")


def test_ctrl_c_during_start_up_exits_130_with_one_line(runs, tmp_path):
    out = tmp_path / "energy.csv"
    watched = Watched("local-energy", runs / "sgd", "--csv", out, "--device", "cpu")
    wait_until_torch_is_mapped(watched.proc.pid)  # flatcli's code is running: it is importing torch
    code, err = watched.interrupt()
    assert_interrupted(code, err, out)
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_ctrl_c_during_the_work_exits_130_and_writes_nothing(runs, tmp_path):
    out = tmp_path / "entropy.csv"
    watched = Watched("local-entropy", runs / "sgd", "--steps", "100000", "--burn-in", "10", "--csv", out,
                      "--device", "cpu")
    watched.wait_for("checkpoint(s)")  # the settings line: the chains start next
    time.sleep(1.0)
    assert_interrupted(*watched.interrupt(), out)


# -- a fourth algorithm is one file and one registry line ---------------------------------------------

class SignSGD(Algorithm):
    """sign-SGD (Bernstein et al. 2018): w ← w − η sign(∇L). The whole algorithm, as a test of the design."""

    def __init__(self, models, ids, cfg, batch, device, dist=None, global_batch: int = 1):
        super().__init__(models, ids, cfg, batch, device, dist, global_batch)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)

    def step(self):
        sums = self.gradient()
        for p in self.model.parameters():
            p.grad.sign_()
        self.optimizer.step()
        return sums


def test_a_fourth_algorithm_needs_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "signsgd", f"{__name__}:SignSGD")
    from flatcli.data import DataSpec, load_data
    from flatcli.models import ModelSpec
    from flatcli.training import Interrupted, Trainer, TrainConfig

    data, cfg = load_data(DataSpec(n_train=128, n_test=32)), dict(algo="signsgd", epochs=2, batch_size=16, lr=0.01)
    full = Trainer(TrainConfig(**cfg), data, ModelSpec(width=8), torch.device("cpu"), out=tmp_path / "full")
    metrics = full.run()
    assert metrics["train_error"] < 0.9
    part = Trainer(TrainConfig(**cfg), data, ModelSpec(width=8), torch.device("cpu"), out=tmp_path / "part")
    with pytest.raises(Interrupted):
        part.run(should_stop=lambda: part.step == 5)
    Trainer.resume(tmp_path / "part", torch.device("cpu")).run()
    assert same_tensors(weights(tmp_path / "full" / "model.safetensors"), weights(tmp_path / "part" / "model.safetensors"))


def test_the_trainer_names_no_algorithm():
    source = (REPO / "flatcli" / "training" / "trainer.py").read_text()
    for name in ('"sgd"', '"esgd"', '"rsgd"', "'sgd'", "'esgd'", "'rsgd'", "algo =="):
        assert name not in source, name


# -- the optimizers ------------------------------------------------------------------------------------

def test_esgd_with_momentum_does_not_move_a_frozen_parameter():
    """As with torch.optim.SGD: a parameter without a gradient keeps its value, even with a momentum buffer."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = EntropySGD([a, b], lr=0.5, langevin_steps=2, gamma=0.1, momentum=0.9, noise=0.0)
    frozen = {"b": False}

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = (a ** 2).sum() + (0 if frozen["b"] else (b ** 2).sum())
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)  # b builds up a momentum buffer
    frozen["b"] = True
    before = b.detach().clone()
    for _ in range(3):
        opt.step(closure)
    assert torch.equal(b.detach(), before)
    assert not torch.equal(a.detach(), torch.zeros(4))


@pytest.mark.parametrize("group,fragment", [(dict(alpha=1.5), "alpha"), (dict(lr=-1.0), "lr"),
                                            (dict(gamma=float("nan")), "gamma"), (dict(langevin_steps=5), "langevin_steps"),
                                            (dict(nesterov=True, momentum=0.0), "nesterov")])
def test_esgd_checks_every_param_group(group, fragment):
    a, b = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match=fragment):
        EntropySGD([{"params": [a]}, {"params": [b], **group}], langevin_steps=2)


def test_library_errors_are_value_errors_named_by_keyword():
    from flatcli.errors import FlatcliError
    from flatcli.measure import local_energy
    with pytest.raises(ValueError, match=r"samples=0") as info:  # Python words, not --samples
        local_energy(torch.nn.Linear(2, 2), (torch.randn(4, 2), torch.zeros(4).long()), [0.1], samples=0)
    assert isinstance(info.value, FlatcliError) and "--" not in str(info.value)
    assert_user_error(invoke("local-energy", "x.pt", "--samples", "0"), "--samples 0")  # the CLI's words


# -- outputs -------------------------------------------------------------------------------------------

def test_info_json_is_strict_json_when_a_split_is_missing(tmp_path, tensor_file_factory):
    path = tensor_file_factory(".npz", x=torch.randn(40, 3), y=torch.arange(40) % 2)  # no test split
    assert invoke("train", "--data", path, "--steps", "2", "--batch-size", "8", "--out", tmp_path / "r",
                  "--device", "cpu").exit_code == 0
    text = invoke("info", tmp_path / "r", "--evaluate", "--json").stdout
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    assert report["evaluation"]["test_loss"] is None and report["evaluation"]["train_loss"] > 0


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    fio.write_text_atomic(tmp_path / "out.csv", "a,b\n")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "out.csv").read_text() == "a,b\n"


def test_absurd_learning_rates_end_in_one_line(tmp_path):
    """1e308 cannot reach a float32 step: refused up front; 1e38 can, and diverges: the divergence error."""
    assert_user_error(invoke("train", "--lr", "1e308", "--steps", "3", "--out", tmp_path / "a", *TINY),
                      "--lr 1e+308", "float32")
    result = invoke("train", "--lr", "1e38", "--steps", "3", "--out", tmp_path / "b", *TINY)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the training loss became nan")


# -- nothing runs, downloads or appears because a file says so -----------------------------------------

EVIL = "import pathlib\npathlib.Path('IMPORTED').write_text('x')\n\ndef make(num_classes=10):\n    raise SystemExit(9)\n"


def doctored(run: Path, dest: Path, **meta_changes) -> Path:
    """A copy of a run folder whose metadata (in model.safetensors and state.pt) says what ``meta_changes`` say."""
    dest.mkdir()
    path = run / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["flatcli"])
    meta.update(meta_changes)
    save_file(load_file(str(path)), str(dest / "model.safetensors"), metadata={"flatcli": json.dumps(meta)})
    state = torch.load(run / "state.pt", weights_only=True)
    state["meta"].update(meta_changes)
    torch.save(state, dest / "state.pt")
    return dest


@pytest.mark.parametrize("command", [["info"], ["local-energy"], ["local-entropy", "--steps", "2", "--burn-in", "1"],
                                     ["train", "--steps", "1", "--init"], ["train", "--resume"]])
def test_a_run_folder_naming_a_module_imports_nothing(runs, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text(EVIL)
    run = doctored(runs / "sgd", tmp_path / "evil", model={"name": "evilmod:make", "width": 16, "depth": 2})
    result = invoke(*command, run, *(["--out", tmp_path / "o"] if "--init" in command else []))
    assert_user_error(result, "evilmod:make", "--model evilmod:make")
    assert not (tmp_path / "IMPORTED").exists() and "evilmod" not in sys.modules


@pytest.mark.parametrize("name", ["os:abort", "this:x", "builtins:print"])
def test_metadata_naming_stdlib_callables_has_no_side_effect(runs, tmp_path, capfd, name):
    run = doctored(runs / "sgd", tmp_path / "evil", model={"name": name, "width": 16, "depth": 2})
    capfd.readouterr()
    result = invoke("info", run, "--json")
    assert_user_error(result, name)
    assert capfd.readouterr().out == ""  # `this` would print the Zen of Python on import


def test_metadata_naming_a_torchvision_set_downloads_and_creates_nothing(runs, tmp_path):
    target = tmp_path / "nowhere" / "data"
    run = doctored(runs / "sgd", tmp_path / "evil",
                   data={"name": "mnist", "data_dir": str(target), "seed": 0, "n_train": None, "n_test": None})
    result = invoke("info", run)
    assert_user_error(result, "mnist", "downloading is off")
    assert not (tmp_path / "nowhere").exists()


def test_a_fifo_or_a_device_file_fails_fast(tmp_path):
    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        start = time.time()
        result = invoke("info", path, "--model", "mlp", "--data", "teacher")
        assert_user_error(result, "not a regular file")
        assert time.time() - start < 10
