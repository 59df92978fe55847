"""The seed's shallow-network experiment: committee machines on a binary task, their BP local entropy and
local energy, and how both rank against generalization (MATH.md §7).

    python examples/committee.py --make-digits data/digits.npz      # needs scikit-learn (bundled digits)
    python examples/committee.py --data data/digits.npz --classes 0,1 --out docs/committee

Protocol: committee machines (``committee:K``, or ``committee:K:binary`` with --binary) trained by SGD, eSGD and
rSGD over seeds on two classes of --data; for each checkpoint that classifies its training set without error,
the BP local entropy curve S(d) (``flatcli local-entropy --method bp``), the local energy curve δε(σ)
(``flatcli local-energy``) and the test error; Spearman rank correlations (scipy.stats.spearmanr, with its
p-value and n) between S at the distance --d-star, δε at --sigma-star and the test error. Every step is a
``python -m flatcli ...`` subprocess, exactly what a user runs; the report is README.md in --out, with the raw
CSVs beside it. A checkpoint with training errors has no zero-error weights around it: it is listed, not
measured by BP, and left out of the correlations.
"""
import argparse
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ALGOS = ("sgd", "esgd", "rsgd")


def make_digits(path: Path, seed: int = 0, test_fraction: float = 0.3) -> None:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes) as a tensor file: a seeded train/test split,
    each feature standardized by the training mean and std (a committee machine has no biases, and BP's
    Gaussian cavity fields want centred inputs)."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1
    z = ((x - mean) / std).astype(np.float32)
    np.savez(path, x=z[train], y=y[train].astype(np.int64), x_test=z[test], y_test=y[test].astype(np.int64))


def flatcli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatcli", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def metadata(run: Path) -> dict:
    """The JSON a run's model.safetensors carries under "flatcli"."""
    from safetensors import safe_open
    with safe_open(str(run / "model.safetensors"), framework="np") as f:
        return json.loads(f.metadata()["flatcli"])


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def at(xs, ys, x0: float) -> float:
    """ys interpolated at x0 (xs in any order); NaN outside their range."""
    pairs = sorted(zip(map(float, xs), map(float, ys)))
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    return float(np.interp(x0, xs, ys)) if xs and xs[0] <= x0 <= xs[-1] else math.nan


def spearman(x, y) -> tuple[float, float, int]:
    """(ρ, two-sided p, n) over the pairs where both are finite; NaN when fewer than 3 or one is constant."""
    from scipy import stats  # here, so that --make-digits needs only numpy and scikit-learn
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan, math.nan, len(pairs)
    r = stats.spearmanr(*zip(*pairs))
    return float(r.statistic), float(r.pvalue), len(pairs)


def train_all(o, out: Path) -> list[dict]:
    runs = []
    for algo in o.algos:
        for seed in o.seeds:
            name = f"{algo}-s{seed}"
            rate = ["--langevin-lr", o.langevin_lr] if algo == "esgd" else ["--lr", o.lr]
            done = flatcli(["train", "--model", o.model, "--data", o.data, "--classes", o.classes, "--algo", algo,
                            "--seed", seed, "--epochs", o.epochs, "--batch-size", o.batch_size, *rate,
                            *(["--n-train", o.n_train] if o.n_train else []), "--out", out / "runs" / name], cwd=out)
            if done.returncode != 0:
                raise SystemExit(f"training {name} failed:\n{done.stderr}")
            metrics = metadata(out / "runs" / name)["metrics"]
            runs.append({"run": name, "algo": algo, "seed": seed, "train_error": metrics["train_error"],
                         "test_error": metrics["test_error"]})
    return runs


def measure(o, out: Path, runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Local energy of every run; BP local entropy of those at zero training error (one call each)."""
    folders = [out / "runs" / r["run"] for r in runs]
    done = flatcli(["local-energy", *folders, "--sigmas", o.sigmas, "--samples", o.samples, "--csv", "-"], cwd=out)
    if done.returncode != 0:
        raise SystemExit(f"local-energy failed:\n{done.stderr}")
    energy, entropy = rows_of(done.stdout), []
    for run, folder in zip(runs, folders):
        if run["train_error"] > 0:
            continue
        done = flatcli(["local-entropy", folder, "--method", "bp", "--couplings", o.couplings, "--csv", "-"], cwd=out)
        if done.returncode != 0:
            raise SystemExit(f"BP local entropy of {run['run']} failed:\n{done.stderr}")
        entropy += rows_of(done.stdout)
    return energy, entropy


def summarize(o, runs, energy, entropy) -> None:
    """Adds S(d*) (interpolated between converged BP points), δε(σ*) and how many BP points converged."""
    for r in runs:
        label = str(Path("runs") / r["run"])
        mine_e = [row for row in energy if Path(row["checkpoint"]).name == r["run"]]
        mine_s = [row for row in entropy if Path(row["checkpoint"]).name == r["run"]]
        r["delta_error"] = at([x["sigma"] for x in mine_e], [x["delta_error"] for x in mine_e], o.sigma_star)
        good = [x for x in mine_s if x["converged"] == "True"]  # S(d*) from converged fixed points only
        r["entropy"] = at([x["distance"] for x in good], [x["local_entropy"] for x in good], o.d_star)
        r["converged"] = f"{len(good)}/{len(mine_s)}" if mine_s else None
        r["label"] = label


def fmt(v, digits=4) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def report(o, runs) -> str:
    lines = [f"# Committee machines: BP local entropy, local energy, generalization", "",
             f"Data {o.data}, classes {o.classes}, model {o.model}, {o.epochs} epochs of batch {o.batch_size} (lr {o.lr:g}, "
             f"eSGD langevin-lr {o.langevin_lr:g}), seeds "
             f"{','.join(map(str, o.seeds))}. S(d*) at d* = {o.d_star:g} (per weight, BP), δε(σ*) at "
             f"σ* = {o.sigma_star:g} (multiplicative noise, {o.samples} draws).", "",
             "| run | train error | test error | S(d*) | δε(σ*) | BP points converged |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {fmt(r['train_error'])} | {fmt(r['test_error'])} | {fmt(r['entropy'])} | "
                     f"{fmt(r['delta_error'])} | {'—' if r['converged'] is None else r['converged']} |")
    lines += ["", "| algorithm | test error (mean ± std) | S(d*) (mean ± std) | δε(σ*) (mean ± std) |",
              "|---|---|---|---|"]
    for algo in o.algos:
        mine = [r for r in runs if r["algo"] == algo]
        cells = []
        for key in ("test_error", "entropy", "delta_error"):
            v = np.array([r[key] for r in mine if math.isfinite(r[key])])
            cells.append(f"{v.mean():.4g} ± {v.std(ddof=1):.2g} (n={len(v)})" if len(v) > 1 else
                         (f"{v[0]:.4g} (n=1)" if len(v) else "—"))
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman rank correlations over the runs measured by BP (scipy.stats.spearmanr; flatter = larger S,"
              " smaller δε):", "", "| pair | ρ | p | n |", "|---|---|---|---|"]
    measured = [r for r in runs if r["converged"] is not None]
    for a, b in (("entropy", "delta_error"), ("entropy", "test_error"), ("delta_error", "test_error")):
        rho, p, n = spearman([r[a] for r in measured], [r[b] for r in measured])
        lines.append(f"| {a} vs {b} | {fmt(rho, 3)} | {fmt(p, 3)} | {n} |")
    skipped = [r["run"] for r in runs if r["converged"] is None]
    if skipped:
        lines += ["", f"Not measured by BP (training error > 0, no zero-error weights to count): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make-digits", type=Path, help="write scikit-learn's digits as a tensor file there and exit")
    p.add_argument("--data", help="any flatcli data (a tensor file, teacher, mnist, ...)")
    p.add_argument("--classes", default="0,1")
    p.add_argument("--hidden", type=int, default=3, help="K, odd")
    p.add_argument("--binary", action="store_true", help="±1 weights (committee:K:binary)")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.0, help="SGD's and rSGD's learning rate (the surrogate's "
                   "gradient shrinks as 1/|w|, so larger than for an mlp)")
    p.add_argument("--langevin-lr", type=float, default=1.0, help="eSGD's inner rate")
    p.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5")
    p.add_argument("--sigma-star", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--couplings", default="0.02,0.05,0.1,0.2,0.5,1,2,5,10,20")
    p.add_argument("--d-star", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=Path("committee-report"))
    o = p.parse_args(argv)
    if o.make_digits is None and o.data is None:
        p.error("give --data (or --make-digits PATH first)")
    o.algos, o.seeds = o.algos.split(","), [int(s) for s in o.seeds.split(",")]
    o.model = f"committee:{o.hidden}" + (":binary" if o.binary else "")
    return o


def main(argv=None) -> int:
    o = parse_args(argv)
    if o.make_digits is not None:
        make_digits(o.make_digits)
        return 0
    if Path(o.data).suffix in (".npz", ".pt", ".safetensors"):
        o.data = str(Path(o.data).resolve())
    out = o.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = train_all(o, out)
    energy, entropy = measure(o, out, runs)
    summarize(o, runs, energy, entropy)
    write_csv(out / "runs.csv", [{k: v for k, v in r.items() if k != "label"} for r in runs])
    write_csv(out / "local_energy.csv", energy)
    write_csv(out / "bp_local_entropy.csv", entropy)
    (out / "README.md").write_text(report(o, runs))
    print(out / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
