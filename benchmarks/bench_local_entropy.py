"""Cost of local entropy's Langevin steps with and without the preconditioner, and the default budget's wall time.

    OMP_NUM_THREADS=2 python benchmarks/bench_local_entropy.py            # the docstring's default problem
    python benchmarks/bench_local_entropy.py --steps 20 --examples 1000   # quicker

The problem is the one local_entropy's docstring quotes: a ~20k-parameter MLP (64-256-10) on 4000 examples,
full-batch MALA, 4 chains. Per-step cost: the same short ladder run with --precondition 0 and K, minus nothing
(the Lanczos set-up is timed apart, subtracted, and reported on its own line); after a warm-up run, the faster
of two runs each. On a shared machine the spread between runs is large: compare figures from one invocation.
"""
import argparse
import importlib
import platform
import time

import torch
from torch import nn

from flatcli.measure.local_entropy import local_entropy
from flatcli.measure._langevin import FlatEnergy

estimator = importlib.import_module("flatcli.measure.local_entropy")


def problem(examples: int):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(examples, 64, generator=g)
    y = model(x).argmax(1).detach()  # a teacher: the model is at a low-loss point of its own labels
    return model, (x, y)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=40, help="steps per ladder γ for the per-step comparison")
    parser.add_argument("--precondition", type=int, default=32)
    parser.add_argument("--skip-default", action="store_true", help="do not time the default budget")
    args = parser.parse_args()
    model, data = problem(args.examples)
    N = sum(p.numel() for p in model.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; MLP 64-256-10 ({N} parameters), {args.examples} examples")
    kw = dict(gammas=[1.0], steps=args.steps, burn_in=args.steps // 4, chains=4)
    t_lanczos, _ = timed(lambda: estimator._eigenpairs(FlatEnergy(model, data, "cross-entropy"),
                                                       args.precondition, 0))
    plain = lambda: local_entropy(model, data, **kw)
    pre = lambda: local_entropy(model, data, precondition=args.precondition, **kw)
    timed(plain)  # warm-up (vmap, allocator); then each twice, interleaved, the faster counts
    (t_plain, r0), (t_pre, _) = timed(plain), timed(pre)
    t_plain, t_pre = min(t_plain, timed(plain)[0]), min(t_pre, timed(pre)[0])
    steps = len(r0.ladder) * args.steps
    per0, per1 = t_plain / steps, (t_pre - t_lanczos) / steps
    print(f"per step (4 chains): plain {per0 * 1e3:.1f} ms, preconditioned K={args.precondition} "
          f"{per1 * 1e3:.1f} ms, ratio {per1 / per0:.2f}; Lanczos set-up {t_lanczos:.1f} s "
          f"(= {t_lanczos / per0:.0f} plain steps)")
    if not args.skip_default:
        t_default, r = timed(lambda: local_entropy(model, data, [0.3, 1, 3, 10, 30, 100, 300]))
        print(f"default budget (120 steps, 30 burn-in, 4 chains, {len(r.ladder)} ladder γ): {t_default:.1f} s; "
              f"converged at {sum(row.converged for row in r.rows)}/{len(r.rows)} asked γ")


if __name__ == "__main__":
    main()
