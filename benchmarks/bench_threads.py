"""One thread against all of them, for the three commands on a small default problem, in fresh processes.

    python benchmarks/bench_threads.py                    # train, local-energy, local-entropy; 1 vs all threads
    python benchmarks/bench_threads.py --repeats 3 --threads 1,2

Each case runs ``flatcli COMMAND ... --threads T`` as a subprocess (so torch's thread pool starts fresh) and
reports the median wall time of the repeats, the whole command included (start-up, loading, the work). The
problem is the default teacher set (4000 × 30, 10 classes) and the default mlp (2 × 128):
``train`` for 2 epochs, ``local-energy`` with its default σ list and 20 draws, ``local-entropy`` at γ 1, 10
with 4 chains of 60 steps. The CSV outputs of the runs with different thread counts are compared: the
figures are only worth reading if the numbers are the same.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flatcli(*args, threads: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # the --threads flag alone decides
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flatcli", *map(str, args), "--threads", str(threads),
                           "--device", "cpu"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"flatcli {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts to compare, e.g. 1,2")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        flatcli("train", "--epochs", "1", "--out", run, threads=1)  # the checkpoint the measurements read
        cases = {
            "train (2 epochs)": lambda t: flatcli("train", "--epochs", "2", "--out", Path(tmp) / f"t{t}",
                                                  "--seed", "1", threads=t),
            "local-energy (6 σ × 20 draws)": lambda t: flatcli("local-energy", run, "--samples", "20",
                                                              "--csv", "-", threads=t),
            "local-entropy (2 γ × 4 chains × 60 steps)": lambda t: flatcli(
                "local-entropy", run, "--gammas", "1,10", "--steps", "60", "--burn-in", "15", "--csv", "-",
                threads=t),
        }
        print(f"| case | {' | '.join(f'{t} thread(s), s' for t in counts)} | ratio {counts[-1]}/{counts[0]} | same CSV |")
        print(f"|---|{'---|' * len(counts)}---|---|")
        for name, case in cases.items():
            times, outputs = {}, {}
            for t in counts:
                runs = [case(t) for _ in range(args.repeats)]
                times[t] = statistics.median(s for s, _ in runs)
                outputs[t] = runs[0][1]
            same = "—" if name.startswith("train") else ("yes" if len(set(outputs.values())) == 1 else "no")
            print(f"| {name} | {' | '.join(f'{times[t]:.1f}' for t in counts)} | "
                  f"{times[counts[-1]] / times[counts[0]]:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
