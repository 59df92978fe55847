"""Throughput of flatcli with 1 process and under torchrun with P processes (CPU/Gloo by default).

    python benchmarks/bench_distributed.py                      # 1 vs 2 processes on the CPU
    python benchmarks/bench_distributed.py --device cuda --nproc 8

Training throughput is read from each run's metrics.csv (training seconds, without start-up); the measurement
commands are timed whole. On a 2-core CPU two processes share the same two cores, so this shows that the
plumbing is right (the numbers agree and the overhead is small) more than a speed-up; on a machine with one
GPU per process it shows the scaling.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(nproc: int, args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    prefix = [sys.executable, "-m", "flatcli"] if nproc == 1 else \
        [shutil.which("torchrun") or "torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "flatcli"]
    start = time.perf_counter()
    subprocess.run(prefix + args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def train_seconds(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["seconds"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; {args.nproc} processes get {max(1, cores // args.nproc)} thread(s) each, one process gets {cores}")
    print(f"{'command':<34}{'1 process':>12}{f'{args.nproc} processes':>14}{'ratio':>8}")
    data = ["--n-train", "4096", "--batch-size", "256", "--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        for algo, extra in (("sgd", []), ("esgd", []), ("rsgd", ["--replicas", str(2 * args.nproc)])):
            n = {}
            for p in (1, args.nproc):
                out = Path(tmp) / f"{algo}-{p}"
                launch(p, ["train", "--algo", algo, "--epochs", str(args.epochs), *data, *extra, "--out", str(out)],
                       cores if p == 1 else max(1, cores // p))
                n[p] = args.epochs * 4096 / train_seconds(out)
            print(f"{'train --algo ' + algo + ' (examples/s)':<34}{n[1]:>12.0f}{n[args.nproc]:>14.0f}"
                  f"{n[args.nproc] / n[1]:>8.2f}")
        run = Path(tmp) / "sgd-1"
        for name, cmd in (("local-energy (s, whole command)", ["local-energy", str(run), "--samples", "64"]),
                          ("local-entropy (s, whole command)", ["local-entropy", str(run), "--chains", "4"])):
            t = {p: launch(p, cmd + ["--device", args.device], cores if p == 1 else max(1, cores // p))
                 for p in (1, args.nproc)}
            print(f"{name:<34}{t[1]:>12.1f}{t[args.nproc]:>14.1f}{t[1] / t[args.nproc]:>8.2f}")


if __name__ == "__main__":
    main()
