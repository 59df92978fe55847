"""examples/reproduce.py: its statistics against oracles, and a tiny protocol end to end, twice, through
flatcli's own commands (the report must come out byte for byte the same)."""
import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

TINY = ["--seeds", "0", "--no-control", "--family", "none", "--steps", "15", "--n-train", "200",
        "--n-test", "200", "--max-examples", "100", "--sigmas", "0,0.1,0.2", "--sigma-star", "0.2",
        "--samples", "3", "--gammas", "1,3", "--gamma-star", "1", "--chains", "2", "--entropy-steps", "6",
        "--burn-in", "2", "--jobs", "2"]
RUNS = ["sgd-s0", "esgd-s0", "rsgd-s0"]


# ---------------------------------------------------------------- statistics against oracles

def test_rank_gives_ties_the_mean_of_their_ranks():
    assert reproduce.rank([30, 10, 20, 20]).tolist() == [4, 1, 2.5, 2.5]
    assert reproduce.rank([5, 5, 5]).tolist() == [2, 2, 2]


def test_spearman_matches_the_closed_form_without_ties():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    d = reproduce.rank(x) - reproduce.rank(y)
    assert reproduce.spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (12 * (12 ** 2 - 1)), abs=1e-12)
    assert reproduce.spearman(x, 3 * x + 1) == pytest.approx(1.0)
    assert reproduce.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert math.isnan(reproduce.spearman(x, np.ones(12)))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 4, size=15).astype(float), rng.integers(0, 5, size=15).astype(float)
    assert reproduce.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_permutation_p_of_a_perfect_rank_order_is_two_in_n_factorial():
    # n = 5: only the identity and the reversal reach |ρ| = 1, so the exact two-sided p is 2/120
    p = reproduce.permutation_p([1, 2, 3, 4, 5], [0.1, 0.4, 0.5, 0.9, 2.0])
    assert p == pytest.approx(2 / 120, abs=0.004)  # 20000 permutations: standard error ≈ 0.0009
    assert reproduce.permutation_p([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == p  # the same seed, the same shuffles


def test_difference_is_welch():
    a, b = [1.0, 2.0, 4.0], [0.0, 1.0]
    diff, se = reproduce.difference(a, b)
    assert diff == pytest.approx(7 / 3 - 0.5)
    assert se == pytest.approx(math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 2))
    assert reproduce.verdict(-1.0, 0.4, "better", "worse") == "better"
    assert reproduce.verdict(1.0, 0.4, "better", "worse") == "worse"
    assert reproduce.verdict(0.7, 0.4, "better", "worse").startswith("not resolved")


def test_the_compute_control_has_rsgds_steps_and_gradients():
    o = reproduce.parse_args(["--seeds", "3", "--rsgd-args", "--replicas 4", "--epochs", "7", "--family", "none"])
    runs = reproduce.plan_runs(o)
    assert [r.name for r in runs] == ["sgd-s3", "esgd-s3", "rsgd-s3", "sgd-compute-s3"]
    cmd = reproduce.train_command(runs[-1], o)
    assert cmd.count("--batch-size") == 1 and cmd[cmd.index("--batch-size") + 1] == "256"  # 4 × 64
    assert cmd.count("--epochs") == 1 and cmd[cmd.index("--epochs") + 1] == "28"  # 4 × 7
    assert reproduce.train_command(runs[2], o)[-4:] == ["--replicas", "4", "--out", "runs/rsgd-s3"]


def synthetic(o, values: dict[str, tuple[float, float, float]]) -> tuple[list, "reproduce.Measured"]:
    """Runs of the plan with (test error, δε(σ*), s(γ*)) set per algorithm, spread a little over the seeds."""
    runs = reproduce.plan_runs(o)
    wiggle = lambda r: 1 + 0.01 * (r.seed - 1.5)  # noqa: E731  (± 1.5 %: the groups stay apart)
    test = {r.name: values[r.group][0] * wiggle(r) for r in runs}
    delta = {r.name: {o.sigma_star: values[r.group][1] * wiggle(r)} for r in runs}
    s = {r.name: {o.gamma_star: values[r.group][2] * wiggle(r)} for r in runs}
    return runs, reproduce.Measured(test, {r.name: 0.0 for r in runs}, delta, s)


SMALL = ["--seeds", "0,1,2,3", "--no-control", "--family", "none", "--sigmas", "0,0.2", "--sigma-star", "0.2",
         "--gammas", "1", "--gamma-star", "1"]


def test_claim2_says_flatter_and_better_in_the_right_direction():
    o = reproduce.parse_args(SMALL)
    # eSGD: lower test error, lower δε, s closer to 0 than SGD; rSGD: all three the other way
    runs, m = synthetic(o, {"sgd": (0.20, 0.05, -0.002), "esgd": (0.15, 0.03, -0.001), "rsgd": (0.25, 0.08, -0.004)})
    table, findings = reproduce.claim2(o, runs, m)
    verdicts = [row[-1] for row in table_rows(table, "| comparison |")]
    assert verdicts == ["generalizes better", "flatter", "flatter", "generalizes worse", "sharper", "sharper"]
    shown = [row[2] for row in table_rows(table, "| comparison |")]
    assert shown[:3] == ["-5.00", "-2.00", "+1.000"]  # s shown as s(eSGD) − s(SGD) × 10³: positive = flatter
    assert findings[0].startswith("eSGD against SGD: test error %: -5.00 ± ")


def test_claim1_reads_the_predicted_signs():
    o = reproduce.parse_args(SMALL)
    # flatter (lower δε, s nearer 0) goes with lower test error, as the claim says
    runs, m = synthetic(o, {"sgd": (0.20, 0.05, -0.002), "esgd": (0.15, 0.03, -0.001), "rsgd": (0.25, 0.08, -0.004)})
    _, results = reproduce.claim1(o, runs, m)
    assert [(r["verdict"], r["n"]) for r in results] == [("as the claim predicts", 12)] * 6
    assert [round(r["rho"], 12) for r in results[:3]] == [1.0, -1.0, -1.0]
    # the same runs with δε reversed: opposite to the claim
    runs, m = synthetic(o, {"sgd": (0.20, 0.05, -0.002), "esgd": (0.15, 0.08, -0.001), "rsgd": (0.25, 0.03, -0.004)})
    _, results = reproduce.claim1(o, runs, m)
    assert results[0]["verdict"] == "opposite to the claim" and results[0]["rho"] < 0


def test_paths_given_from_here_reach_flatcli_absolute_and_show_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = reproduce.parse_args(["--data", "sets/mine.NPZ", "--data-dir", "store"])
    assert o.data == str(tmp_path / "sets" / "mine.NPZ") and o.data_dir == str(tmp_path / "store")
    assert reproduce.shown(reproduce.train_command(reproduce.plan_runs(o)[0], o), o).startswith(
        "flatcli train --data sets/mine.NPZ --model mlp --device cpu")
    o = reproduce.parse_args(["--data", "imagefolder:~/pics"])
    assert o.data == "imagefolder:" + str(Path.home() / "pics") and o.data_dir == str(tmp_path / "data")


def test_a_difference_without_spread_is_still_a_difference():
    assert reproduce.verdict(-0.01, 0.0, "better", "worse") == "better"
    assert reproduce.verdict(0.0, 0.0, "better", "worse") == "no difference"
    assert reproduce.verdict(0.5, math.nan, "better", "worse").endswith("(too few runs)")


# ---------------------------------------------------------------- a tiny protocol, twice

@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    outs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"report{k}")
        done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(out)
    return outs


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(report: str, header_start: str) -> list[list[str]]:
    """The body of the first Markdown table whose header starts with ``header_start``, split into cells."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split(" | ")])
    return body


def test_the_csvs_hold_every_run_and_level(twice):
    out = twice[0]
    runs = rows(out / "runs.csv")
    assert [r["run"] for r in runs] == RUNS and all(r["status"] == "ok" for r in runs)
    assert list(runs[0]) == reproduce.RUN_COLUMNS
    energy = rows(out / "local_energy.csv")
    assert [(r["checkpoint"], float(r["sigma"])) for r in energy] == \
        [(f"runs/{n}", s) for n in RUNS for s in (0.0, 0.1, 0.2)]
    entropy = rows(out / "local_entropy.csv")
    assert list(entropy[0])[:7] == ["checkpoint", "gamma", "local_entropy", "local_entropy_sem", "distance",
                                    "loss_mean", "error_mean"]
    assert [(r["checkpoint"], float(r["gamma"])) for r in entropy] == [(f"runs/{n}", g) for n in RUNS for g in (1, 3)]


def test_the_report_has_a_row_per_algorithm_with_the_csvs_numbers(twice):
    out = twice[0]
    report = (out / "README.md").read_text()
    algos = table_rows(report, "| algorithm | runs | test error %")
    assert [r[0] for r in algos] == ["SGD", "eSGD", "rSGD (center)"] and all(r[1] == "1" for r in algos)
    test_error = {r["run"]: float(r["test_error"]) for r in rows(out / "runs.csv")}
    delta = {r["checkpoint"]: float(r["delta_error"]) for r in rows(out / "local_energy.csv") if r["sigma"] == "0.2"}
    s = {r["checkpoint"]: float(r["local_entropy"]) for r in rows(out / "local_entropy.csv") if r["gamma"] == "1.0"}
    for row, name in zip(algos, ["sgd-s0", "esgd-s0", "rsgd-s0"]):
        assert row[2] == f"{100 * test_error[name]:.2f}"  # one seed: a mean without ± std
        assert row[5] == f"{100 * delta['runs/' + name]:.2f}"  # columns: δε(σ=0.1), δε(σ=0.2)
        assert row[6] == f"{1e3 * s['runs/' + name]:.3f}"
    correlations = table_rows(report, "| pair |")
    pairs = ["δε(σ=0.2) vs test error", "s(γ=1) vs test error", "δε(σ=0.2) vs s(γ=1)"]
    assert [(r[0], r[1]) for r in correlations] == [(p, subset) for subset in ("all runs", "train error ≤ 2 %")
                                                    for p in pairs]
    fitted = sum(float(r["train_error"]) <= 0.02 for r in rows(out / "runs.csv"))
    assert [r[4] for r in correlations] == ["3"] * 3 + [str(fitted)] * 3  # n: the runs in each subset
    x = [delta[f"runs/{n}"] for n in RUNS]
    assert correlations[0][3] == f"{reproduce.spearman(x, [test_error[n] for n in RUNS]):+.3f}"
    assert "flatcli train" in report and "flatcli local-entropy" in report


def test_the_report_is_the_same_byte_for_byte_and_has_no_paths_or_times(twice):
    a, b = twice
    for name in reproduce.REPORT_FILES:
        if (a / name).exists() or name.endswith(".csv") or name == "README.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    report = (a / "README.md").read_text()
    assert str(a) not in report and str(ROOT) not in report and "/tmp" not in report
    assert "load average" not in report
    assert (a / "timing.md").read_text().startswith("# Timing")


def test_the_figures_are_pngs(twice):
    pytest.importorskip("matplotlib")
    for name in ("delta_error_curves.png", "local_entropy_curves.png", "test_error_vs_flatness.png"):
        assert (twice[0] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in (twice[0] / "README.md").read_text()


def test_the_larger_protocols_in_the_report_parse():
    for _, command in reproduce.LARGER:
        argv = reproduce.shlex.split(command)[2:]  # after "python examples/reproduce.py"
        o = reproduce.parse_args(argv)
        assert o.data in ("fashion-mnist", "cifar10") and o.device == "cuda" and o.jobs == 1
        assert o.data_dir == str(Path("data").resolve())  # torchvision data from here, not from the work folder


# ---------------------------------------------------------------- the settings search behind the defaults

SWEEP = ROOT / "examples" / "sweep.py"


def test_the_sweep_grid_is_named_uniquely_and_compares_with_sgd():
    sys.path.insert(0, str(SWEEP.parent))
    import sweep
    grid = sweep.default_grid(30)
    assert grid[0].args == ("--algo", "sgd") and len({s.name for s in grid}) == len(grid)
    assert "sgd-10ep" in {s.name for s in grid}
    o = sweep.parse_args(["--only", "rsgd-g1,esgd", "--seeds", "7"])
    cmd = sweep.command(o.grid[0], 7, o)
    assert cmd[-6:] == ["--algo", "rsgd", "--gamma", "1", "--out", "runs/rsgd-g1-s7"]
    assert cmd[cmd.index("--seed") + 1] == "7"


def test_a_tiny_sweep_reports_the_csvs_numbers(tmp_path):
    done = subprocess.run([sys.executable, str(SWEEP), "--only", "sgd,esgd", "--seeds", "1,2", "--steps", "5",
                           "--n-train", "200", "--n-test", "200", "--jobs", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = rows(tmp_path / "tuning.csv")
    assert [(r["setting"], r["seed"], r["status"]) for r in runs] == \
        [("sgd", "1", "ok"), ("sgd", "2", "ok"), ("esgd", "1", "ok"), ("esgd", "2", "ok")]
    test = {s: [float(r["test_error"]) for r in runs if r["setting"] == s] for s in ("sgd", "esgd")}
    body = table_rows((tmp_path / "tuning.md").read_text(), "| setting |")
    assert [r[0] for r in body] == ["`sgd`", "`esgd`"]
    mean, sem = np.mean(test["esgd"]), np.std(test["esgd"], ddof=1) / math.sqrt(2)
    assert body[1][3] == f"{100 * mean:.2f} ± {100 * sem:.2f}"
    assert body[1][5].startswith(f"{100 * (mean - np.mean(test['sgd'])):+.2f} ± ")


def test_the_sweep_names_an_unknown_setting():
    done = subprocess.run([sys.executable, str(SWEEP), "--only", "sgd,nope"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "--only nope: no such setting" in done.stderr
    assert "Traceback" not in done.stderr


def test_other_data_and_models_pass_through_with_paths_as_the_user_gave_them(fashion_mnist_dir, tmp_path):
    """The same protocol on torchvision-format files under ./data (flatcli's default --data-dir), from that folder."""
    out = tmp_path / "report"
    args = ["--data", "fashion-mnist", "--model", "linear", "--seeds", "0", "--no-control", "--family", "none",
            "--steps", "3", "--max-examples", "12", "--sigmas", "0,0.1", "--sigma-star", "0.1", "--samples", "2",
            "--gammas", "1", "--gamma-star", "1", "--chains", "2", "--entropy-steps", "4", "--burn-in", "1",
            "--jobs", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = rows(out / "runs.csv")
    assert [(r["run"], r["status"]) for r in runs] == [(n, "ok") for n in RUNS]
    assert len(rows(out / "local_energy.csv")) == 6 and len(rows(out / "local_entropy.csv")) == 3
    report = (out / "README.md").read_text()
    assert "flatcli train --data fashion-mnist --model linear --device cpu" in report
    assert "--data-dir data " in report and str(tmp_path) not in report
    assert "### Why these settings" not in report  # the notes are about the default data and model only


def test_the_default_protocol_is_on_the_real_digits_with_eight_seeds_and_the_sweep_on_other_seeds():
    sys.path.insert(0, str(SWEEP.parent))
    import sweep
    o = reproduce.parse_args([])
    assert o.data == "digits" and o.out == Path("docs/reproduction") and len(o.seeds) >= 8 and o.data_dir is None
    assert reproduce.parse_args(["--data", "teacher"]).out == Path("docs/reproduction/teacher")
    s = sweep.parse_args([])
    assert s.data == "digits" and s.out == o.out
    assert not set(s.seeds) & (set(o.seeds) | set(o.family_seeds))
    paper = sweep.command({g.name: g for g in s.grid}["rsgd-paper"], 100, s)
    assert paper[paper.index("--gamma") + 1] == "auto" and "--nesterov" in paper
