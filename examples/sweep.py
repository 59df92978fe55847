"""How eSGD and rSGD settings compare with SGD on one problem: test error over seeds, per setting.

    python examples/sweep.py                                   # the default grid, digits → docs/reproduction/
    python examples/sweep.py --data teacher                    # on the synthetic set → docs/reproduction/teacher/
    python examples/sweep.py --data fashion-mnist --model lenet --device cuda --out docs/tuning-fashion-mnist

This is the search behind the default hyper-parameters of examples/reproduce.py and of flatcli: every setting
of a grid (the budget, eSGD's L, η', γ, noise and γ scoping, rSGD's γ and scoping, SGD at eSGD's inner learning
rate) is trained with `flatcli train` over seeds disjoint from the report's, and each setting's test error is
set against SGD's at the same budget. It trains only (no flatness measurement). Like the report, it is
byte-for-byte the same on the same machine; the wall time goes to stderr.
"""
import argparse
import math
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (the runner, metadata reader and statistics of the report)


@dataclass(frozen=True)
class Setting:
    name: str                # also the prefix of its run folders
    args: tuple[str, ...]    # flatcli train options beyond the shared ones
    why: str                 # what the setting tests, one line


AUTO_EXP = ("--gamma", "auto", "--gamma-schedule", "exp")
PAPER = ("--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4")


def default_grid(epochs: int) -> list[Setting]:
    """The grid run on the default data: the first setting is the baseline every other is compared with."""
    short = max(1, epochs // 3)
    grid = [
        Setting("sgd", ("--algo", "sgd"), "the baseline: SGD at flatcli's defaults"),
        Setting("sgd-lr0.25", ("--algo", "sgd", "--lr", "0.25"), "SGD at eSGD's default inner learning rate η'"),
        Setting(f"sgd-{short}ep", ("--algo", "sgd", "--epochs", str(short)), f"SGD at a budget of {short} epochs"),
        Setting(f"esgd-{short}ep", ("--algo", "esgd", "--epochs", str(short)), f"eSGD at a budget of {short} epochs"),
        Setting(f"rsgd-{short}ep", ("--algo", "rsgd", "--epochs", str(short)), f"rSGD at a budget of {short} epochs"),
        Setting("esgd", ("--algo", "esgd"), "eSGD at flatcli's defaults (L 2, η' 0.25, γ 0.1)"),
    ]
    for steps in (5, 20):
        for inner in (0.1, 0.25, 0.5):
            for gamma in (0.03, 0.3, 3.0):
                grid.append(Setting(f"esgd-L{steps}-lr{inner:g}-g{gamma:g}",
                                    ("--algo", "esgd", "--langevin-steps", str(steps), "--langevin-lr", f"{inner:g}",
                                     "--gamma", f"{gamma:g}"), f"eSGD, L {steps}, η' {inner:g}, γ {gamma:g}"))
    # scoping: γ grows ×100 over the run, γ_t = γ_0 (1 + γ_1)^t, t in outer steps (eSGD: n/(B·L) per epoch)
    grid += [
        Setting("esgd-noise0.01", ("--algo", "esgd", "--noise", "0.01"), "eSGD with Langevin noise ε 0.01"),
        Setting("esgd-scoped", ("--algo", "esgd", "--gamma", "0.03", "--gamma-growth", "0.005"),
                "eSGD, γ scoped from 0.03 by 0.5 % per outer step (about ×100 over 30 epochs of the teacher data)"),
        Setting("rsgd", ("--algo", "rsgd"), "rSGD at flatcli's defaults (y 3, γ 0.1, η 0.1)"),
        *[Setting(f"rsgd-g{g:g}", ("--algo", "rsgd", "--gamma", f"{g:g}"), f"rSGD, γ {g:g}") for g in (0.01, 0.3, 1.0)],
        Setting("rsgd-scoped", ("--algo", "rsgd", "--gamma", "0.01", "--gamma-growth", "0.0025"),
                "rSGD, γ scoped from 0.01 by 0.25 % per step (about ×100 over 30 epochs of the teacher data)"),
        Setting("rsgd-y5", ("--algo", "rsgd", "--replicas", "5"), "rSGD with 5 replicas"),
        # γ schedules over the whole run, whatever its length (flatcli.training.gamma), from the balanced start
        Setting("esgd-auto-exp", ("--algo", "esgd", *AUTO_EXP, "--gamma-final", "2"),
                "eSGD, γ from the balanced start (auto) geometrically up to 2 at the last step (η'γ 0.5)"),
        Setting("rsgd-auto-exp", ("--algo", "rsgd", *AUTO_EXP, "--gamma-final", "5"),
                "rSGD, γ from the balanced start (auto) geometrically up to 5 at the last step (ηγ 0.5)"),
        Setting("rsgd-auto-cosine", ("--algo", "rsgd", "--gamma", "auto", "--gamma-schedule", "cosine",
                                     "--gamma-final", "5"), "rSGD, γ from the balanced start to 5 on a cosine"),
        # the authors' own practice (SacredDNN): Nesterov 0.9, weight decay 5e-4, rSGD's lr × y, γ scoped from auto
        Setting("sgd-nesterov", ("--algo", "sgd", *PAPER), "SGD with Nesterov 0.9 and weight decay 5e-4"),
        Setting("rsgd-paper", ("--algo", "rsgd", "--lr", "0.3", *PAPER, *AUTO_EXP, "--gamma-final", "5"),
                "rSGD as the authors train it: lr 0.1 × 3 replicas, Nesterov 0.9, weight decay 5e-4, γ auto → 5"),
        Setting("esgd-paper", ("--algo", "esgd", "--langevin-steps", "5", *PAPER, *AUTO_EXP, "--gamma-final", "2"),
                "eSGD with L 5, Nesterov 0.9, weight decay 5e-4, γ auto → 2 geometrically"),
    ]
    return grid


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out", type=Path, default=None, help="folder for tuning.md and tuning.csv (default: the report's folder "
                                             "for --data, see examples/reproduce.py)")
    a("--work", type=Path, default=None, help="folder for the run folders (default: a temporary one)")
    a("--data", default="digits")
    a("--data-dir", default=None)
    a("--model", default="mlp")
    a("--device", default="cpu")
    a("--epochs", type=int, default=30, help="the budget of every setting that does not set its own")
    a("--steps", type=int, default=None, help="cap every run at this many optimizer steps (smoke tests)")
    a("--n-train", type=int, default=None)
    a("--n-test", type=int, default=None)
    a("--seeds", default="100,101,102,103", help="seeds, disjoint from the report's")
    a("--only", default=None, help="comma-separated setting names to run (the first one is the baseline)")
    a("--train-args", default="", help="extra flatcli train options for every run")
    a("--jobs", type=int, default=None, help="flatcli processes at a time (default: the CPU count on cpu, else 1)")
    a("--threads", type=int, default=None, help="torch threads per process (default: 1 on cpu)")
    o = p.parse_args(argv)
    o.seeds = reproduce.checked_list(p, "--seeds", o.seeds, int)
    o.train_args = shlex.split(o.train_args)
    fixed = [a.split("=")[0] for a in o.train_args if a.split("=")[0] in ("--epochs", "--seed", "--out")]
    if fixed:
        p.error(f"--train-args sets {fixed[0]}: give --epochs and --seeds to this script")
    grid = default_grid(o.epochs)
    if o.only:
        wanted = [w.strip() for w in o.only.split(",") if w.strip()]
        known = {s.name: s for s in grid}
        unknown = [w for w in wanted if w not in known]
        if len(set(wanted)) != len(wanted):
            p.error(f"--only {o.only}: name each setting once")
        if unknown:
            p.error(f"--only {','.join(unknown)}: no such setting; the settings are {', '.join(known)}")
        grid = [known[w] for w in wanted]
    o.grid = grid
    o.out = o.out if o.out is not None else reproduce.default_out(o.data)
    cpu = o.device == "cpu"
    o.jobs = o.jobs or ((reproduce.os.cpu_count() or 1) if cpu else 1)
    o.threads = o.threads if o.threads is not None else (1 if cpu else None)
    reproduce.resolve_paths(o)  # flatcli runs in the work folder: paths from here go to it absolute
    return o


def command(setting: Setting, seed: int, o) -> list[str]:
    """flatcli train with the shared options first; the setting's own come after (the last value wins)."""
    shared = ["--data", o.data, "--model", o.model, "--device", o.device, "--epochs", str(o.epochs)]
    for flag, value in (("--data-dir", o.data_dir), ("--n-train", o.n_train), ("--n-test", o.n_test),
                        ("--steps", o.steps)):
        if value is not None:
            shared += [flag, str(value)]
    return ["train", *shared, *o.train_args, "--seed", str(seed), *setting.args,
            "--out", f"runs/{setting.name}-s{seed}"]


def sem(values) -> tuple[float, float, int]:
    """Mean, standard error of the mean and count of the finite values."""
    m, s, n = reproduce.mean_std(values)
    return m, (s / math.sqrt(n) if n > 1 else math.nan), n


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    o = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flatcli-sweep-") as tmp:
        work = (o.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        flatcli = reproduce.Runner(work, o.jobs, o.threads, log=lambda s: print(s, file=sys.stderr, flush=True))
        plan = [(s, seed) for s in o.grid for seed in o.seeds]
        results = flatcli([command(s, seed, o) for s, seed in plan], accept=reproduce.diverged)
        for (setting, seed), done in zip(plan, results):
            folder = work / "runs" / f"{setting.name}-s{seed}"
            ok = not reproduce.diverged(done)
            meta = reproduce.read_metadata(folder) if ok else {}
            metrics, hyper = meta.get("metrics", {}), meta.get("hyper", {})
            rows.append({"setting": setting.name, "seed": seed, "status": "ok" if ok else "diverged",
                         "algo": hyper.get("algo", ""), "epochs": hyper.get("epochs", ""),
                         **{k: metrics.get(k, "") for k in ("train_error", "test_error", "test_loss")}})
    o.out.mkdir(parents=True, exist_ok=True)
    columns = ["setting", "seed", "status", "algo", "epochs", "train_error", "test_error", "test_loss"]
    (o.out / "tuning.csv").write_text(reproduce.csv_text(rows, columns))
    (o.out / "tuning.md").write_text(report(o, argv, rows, flatcli.commands))
    print(f"wrote {o.out}/tuning.md in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def report(o, argv, rows: list[dict], commands: list[list[str]]) -> str:
    value = lambda setting, key: [float(r[key]) if r["status"] == "ok" else math.nan for r in rows
                                  if r["setting"] == setting]
    base = o.grid[0].name
    body = []
    for s in o.grid:
        test, train = sem(value(s.name, "test_error")), sem(value(s.name, "train_error"))
        diff, se = reproduce.difference(value(s.name, "test_error"), value(base, "test_error"))
        verdict = "—" if s.name == base else reproduce.verdict(diff, se, "lower", "higher")
        failed = sum(r["status"] != "ok" for r in rows if r["setting"] == s.name)
        body.append([f"`{s.name}`", s.why, f"{test[2]}" + (f" ({failed} diverged)" if failed else ""),
                     f"{100 * test[0]:.2f} ± {reproduce.number(100 * test[1], '.2f')}",
                     f"{100 * train[0]:.2f}",
                     "—" if s.name == base else f"{100 * diff:+.2f} ± {reproduce.number(100 * se, '.2f')}", verdict])
    shown = lambda args: reproduce.shown(args, o)
    lines = [
        "# Settings of eSGD and rSGD against SGD",
        "",
        "Generated by `examples/sweep.py`; the numbers come from `tuning.csv` in this folder. Regenerate with",
        "",
        "    " + reproduce.canonical_command(argv, "examples/sweep.py"),
        "",
        f"Data `{o.data}`, model `{o.model}`, device `{o.device}`, budget {o.epochs} epochs unless the setting "
        f"says otherwise{f', capped at {o.steps} steps' if o.steps else ''}; seeds {', '.join(map(str, o.seeds))}. "
        "Test error and training error (at the end of training) in %, mean ± standard error of the mean over the "
        f"seeds; the difference is against `{base}` (Welch standard error), \"lower\" or \"higher\" only when it "
        "exceeds two standard errors.",
        "",
        reproduce.table(["setting", "what it tests", "runs", "test error %", "train error %", f"− {base}",
                         "verdict"], body),
        "",
        "## Commands run",
        "",
        "```",
        *[shown(c) for c in commands],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
