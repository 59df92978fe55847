"""γ schedules and the balanced start of eSGD and rSGD against hand-computed values: γ at the first and last step
of every schedule (as the optimizers see it, whatever the run's length), the balanced γ_0 of a tiny linear model,
an exact resume with a schedule, and the command line's mistakes."""
import math

import pytest
import torch
from torch import nn

from clitools import assert_user_error, invoke, same_tensors, weights
from flatcli.data import DataSpec, Split, load_data
from flatcli.errors import FlatcliError
from flatcli.models import ModelSpec
from flatcli.training import Interrupted, TrainConfig, Trainer
from flatcli.training.gamma import GammaSchedule
from flatcli.training.trainer import evaluate_model

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--data", "teacher", "--n-train", "128", "--n-test", "32", "--batch-size", "32", "--width", "8",
        "--device", "cpu"]


# -- the schedule as a function -----------------------------------------------------------------------

@pytest.mark.parametrize("kind, middle", [
    ("exp", math.sqrt(0.1 * 2.0)),        # geometric: halfway is the geometric mean
    ("linear", (0.1 + 2.0) / 2),
    ("cosine", (0.1 + 2.0) / 2),          # (1 + cos π/2) / 2 = 1/2
])
def test_schedules_run_from_gamma0_to_final_over_any_length(kind, middle):
    for total in (2, 51, 1001):
        g = GammaSchedule(0.1, kind, final=2.0, total=total)
        assert g(0) == 0.1 and g(total - 1) == 2.0 and g(total + 5) == 2.0
    assert GammaSchedule(0.1, kind, final=2.0, total=51)(25) == pytest.approx(middle, rel=1e-12)
    assert GammaSchedule(0.1, kind, final=2.0, total=1)(0) == 0.1  # a one-step run takes γ_0


def test_cosine_quarter_and_ratio_form():
    g = GammaSchedule(1.0, "cosine", final=0.0, total=5)  # s = 1/4: (1 + cos π/4) / 2
    assert g(1) == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-12)
    r = GammaSchedule(3e-3, "exp", ratio=1e4, total=11)
    assert r(0) == 3e-3 and r(10) == pytest.approx(30.0, rel=1e-15) and r(5) == pytest.approx(0.3, rel=1e-12)


def test_exp_rate_form_is_the_seeds_scoping_and_constant_is_constant():
    g = GammaSchedule(0.5, "exp", rate=0.01, total=10)
    assert g(0) == 0.5 and g(7) == 0.5 * 1.01 ** 7 and g(100) == 0.5 * 1.01 ** 100  # no end: keeps growing
    assert GammaSchedule(0.5, "constant", total=10)(9) == 0.5


def test_older_configs_read_as_they_ran():
    assert TrainConfig.from_dict({"algo": "rsgd", "gamma_growth": 0.01}).validate().gamma_schedule == "exp"
    assert TrainConfig.from_dict({"algo": "rsgd"}).validate().gamma_schedule == "constant"


# -- what the optimizers use, step by step --------------------------------------------------------------

def seen_gammas(trainer: Trainer) -> list[float]:
    """Train, recording the γ the optimizer holds when each step starts."""
    seen, step = [], trainer.algorithm.step

    def recording_step():
        seen.append(trainer.algorithm.optimizer.current_gamma)
        return step()
    trainer.algorithm.step = recording_step
    trainer.run()
    return seen


DATA = dict(n_train=128, n_test=32)


@pytest.mark.parametrize("algo", ["esgd", "rsgd"])
@pytest.mark.parametrize("kind", ["exp", "linear", "cosine"])
def test_the_optimizer_sees_gamma0_first_and_gamma_final_last(algo, kind):
    data = load_data(DataSpec("teacher", **DATA))
    for epochs in (1, 3):
        cfg = TrainConfig(algo=algo, epochs=epochs, batch_size=32, replicas=2, gamma=0.05, gamma_schedule=kind,
                          gamma_final=0.8)
        trainer = Trainer(cfg, data, ModelSpec(width=8), torch.device("cpu"))
        seen = seen_gammas(trainer)
        assert len(seen) == trainer.total_steps > 1
        assert seen[0] == 0.05 and seen[-1] == 0.8
        assert all(a <= b for a, b in zip(seen, seen[1:]))  # every schedule here rises monotonically


def test_exp_rate_through_the_trainer_is_the_old_scoping():
    data = load_data(DataSpec("teacher", **DATA))
    cfg = TrainConfig(algo="rsgd", epochs=2, batch_size=32, replicas=2, gamma=0.05, gamma_growth=0.1)
    seen = seen_gammas(Trainer(cfg, data, ModelSpec(width=8), torch.device("cpu")))
    assert seen == [0.05 * 1.1 ** t for t in range(len(seen))]


# -- the balanced start -------------------------------------------------------------------------------

def linear_model(bias0: float) -> nn.Module:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.copy_(torch.tensor([bias0, 0.0]))
    return m


def mean_loss_on_one_example(model) -> float:
    # x = 0, label 1: logits = bias, so L = log(e^{b_0} + e^{b_1}) − b_1
    return evaluate_model(model, Split(torch.zeros(1, 2), torch.tensor([1])), "cross-entropy")[0]


def test_balanced_gamma_of_rsgd_by_hand():
    from flatcli.training.algorithms.rsgd import ReplicatedSGDAlgorithm
    # replica A: b = (0, 0), L = log 2; replica B: b = (log 3, 0), L = log 4; center b̄ = (log 3 / 2, 0);
    # Σ_a ½ |w^a − w̄|² = ½ · 2 · (log 3 / 2)² = (log 3)² / 4;  γ_0 = (log 2 + log 4) / ((log 3)² / 4)
    cfg = TrainConfig(algo="rsgd", replicas=2, gamma="auto").validate()
    alg = ReplicatedSGDAlgorithm([linear_model(0.0), linear_model(math.log(3))], [0, 1], cfg, None,
                                 torch.device("cpu"))
    expected = 12 * math.log(2) / math.log(3) ** 2
    assert alg.balanced_gamma(mean_loss_on_one_example) == pytest.approx(expected, rel=1e-6)
    same = ReplicatedSGDAlgorithm([linear_model(1.0), linear_model(1.0)], [0, 1], cfg, None, torch.device("cpu"))
    with pytest.raises(FlatcliError, match="distance 0"):
        same.balanced_gamma(mean_loss_on_one_example)


def test_balanced_gamma_of_esgd_by_hand():
    from flatcli.training.algorithms.esgd import EntropySGDAlgorithm
    # b = (log 3, 0): L = log 4, ½ |w|² = ½ (log 3)²;  γ_0 = 2 log 4 / (log 3)² = 4 log 2 / (log 3)²
    cfg = TrainConfig(algo="esgd", gamma="auto").validate()
    alg = EntropySGDAlgorithm([linear_model(math.log(3))], [0], cfg, None, torch.device("cpu"))
    assert alg.balanced_gamma(mean_loss_on_one_example) == pytest.approx(4 * math.log(2) / math.log(3) ** 2,
                                                                          rel=1e-6)


@pytest.mark.parametrize("algo", ["esgd", "rsgd"])
def test_auto_resolves_on_the_initial_weights_and_is_recorded(algo):
    data = load_data(DataSpec("teacher", **DATA))
    common = dict(algo=algo, epochs=1, batch_size=32, replicas=2, gamma_schedule="exp", gamma_ratio=100.0)
    auto = Trainer(TrainConfig(gamma="auto", **common), data, ModelSpec(width=8), torch.device("cpu"))
    probe = Trainer(TrainConfig(gamma=0.1, **common), data, ModelSpec(width=8), torch.device("cpu"))
    loss = lambda m: evaluate_model(m, probe.train_split, "cross-entropy")[0]  # noqa: E731
    gamma0 = probe.algorithm.balanced_gamma(loss)
    assert auto.cfg.gamma == gamma0 and auto.cfg.gamma_auto and 0 < gamma0 < math.inf
    seen = seen_gammas(auto)
    assert seen[0] == gamma0 and seen[-1] == pytest.approx(100 * gamma0, rel=1e-15)


# -- resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["esgd", "rsgd"])
def test_interrupt_then_resume_with_a_schedule_equals_uninterrupted(tmp_path, algo):
    data = load_data(DataSpec("teacher", **DATA))
    cfg = dict(algo=algo, epochs=3, batch_size=16, replicas=2, momentum=0.5, gamma="auto", gamma_schedule="cosine",
               gamma_ratio=20.0, noise=1e-3)
    full = Trainer(TrainConfig(**cfg), data, ModelSpec(width=8), torch.device("cpu"), out=tmp_path / "full")
    full.run()
    part = Trainer(TrainConfig(**cfg), data, ModelSpec(width=8), torch.device("cpu"), out=tmp_path / "part")
    with pytest.raises(Interrupted):
        part.run(should_stop=lambda: part.step == 5)  # mid-epoch
    resumed = Trainer.resume(tmp_path / "part", torch.device("cpu"))
    assert resumed.step == 5 and resumed.algorithm.gamma_schedule == full.algorithm.gamma_schedule
    resumed.run()
    for name in ("model.safetensors", *(["replicas.safetensors"] if algo == "rsgd" else [])):
        assert same_tensors(weights(tmp_path / "full" / name), weights(tmp_path / "part" / name))
    def rows(run):
        return [r.split(",")[:7] + r.split(",")[8:] for r in (run / "metrics.csv").read_text().splitlines()]
    assert rows(tmp_path / "full") == rows(tmp_path / "part")  # every column but the seconds, γ included


# -- the command line -----------------------------------------------------------------------------------

def test_cli_auto_with_a_schedule_records_the_resolved_gamma(tmp_path):
    from flatcli.checkpoint import read_checkpoint
    out = tmp_path / "r"
    result = invoke("train", "--algo", "rsgd", "--replicas", "2", "--gamma", "auto", "--gamma-schedule", "exp",
                    "--gamma-ratio", "1e2", "--steps", "4", "--out", out, *TINY)
    assert result.exit_code == 0, result.stderr
    hyper = read_checkpoint(out).meta["hyper"]
    assert isinstance(hyper["gamma"], float) and hyper["gamma"] > 0 and hyper["gamma_auto"]
    assert (hyper["gamma_schedule"], hyper["gamma_ratio"]) == ("exp", 100.0)


@pytest.mark.parametrize("args, fragments", [
    (["--gamma", "strong"], ["--gamma", "auto"]),
    (["--gamma-schedule", "linear"], ["--gamma-final"]),
    (["--gamma-schedule", "sine", "--gamma-final", "1"], ["--gamma-schedule"]),
    (["--gamma-final", "1"], ["--gamma-final", "exp, linear or cosine"]),
    (["--gamma-schedule", "linear", "--gamma-final", "1", "--gamma-growth", "0.1"], ["--gamma-growth"]),
    (["--gamma-schedule", "exp", "--gamma-final", "1", "--gamma-ratio", "3"], ["once"]),
    (["--gamma", "0", "--gamma-schedule", "exp", "--gamma-final", "1"], ["γ_0 > 0"]),
    (["--algo", "sgd", "--gamma", "auto", "--gamma-schedule", "cosine"], ["--gamma-final"]),
])
def test_cli_gamma_mistakes(tmp_path, args, fragments):
    base = ["--algo", "rsgd", "--replicas", "2"] if "--algo" not in args else []
    assert_user_error(invoke("train", *base, *args, "--steps", "1", "--out", tmp_path / "x", *TINY), *fragments)
