"""Throughput of flatcli's local_energy against plain forward passes and against a naive implementation.

    python benchmarks/bench_local_energy.py [--samples 20] [--sigmas 0,0.01,0.05] [--repeats 5] [--threads N]

Four timings of the same number of passes over the data (1 unperturbed + (number of σ > 0) × samples, as
local_energy makes), the median over repeats (the four interleaved), on CPU in one process:
  forward — model(x) over the batches, inference mode, nothing else;
  eval    — forward plus the loss and error sums of each batch (flatcli.losses.batch_sums), kept on the device:
            the least any evaluation of the net must do, with no perturbation;
  flatcli — local_energy(...) with those sigmas and samples;
  naive   — for every draw and σ: copy.deepcopy(model), perturb it, evaluate through a DataLoader
            (loss and error read back with .item() per batch).
Speeds relative to flatcli: "vs eval" = eval time / flatcli time (target >= 0.9), "vs forward" likewise,
"x naive" = naive time / flatcli time.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from flatcli.losses import batch_sums
from flatcli.measure import local_energy, parse_sigmas


def mlp(d=30, hidden=100, classes=4):
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def lenet(classes=10):
    return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes))


def teacher_data(n, shape, classes, g):
    """Gaussian inputs labelled by a random linear teacher."""
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), classes, generator=g)).argmax(1)
    return x, y


@torch.inference_mode()
def forward_only(model, x, y, passes, batch_size):
    model.eval()
    for _ in range(passes):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])


@torch.inference_mode()
def evaluate_only(model, x, y, passes, batch_size):
    model.eval()
    for _ in range(passes):
        sums = [batch_sums(model(x[i:i + batch_size]), y[i:i + batch_size], "cross-entropy")
                for i in range(0, len(x), batch_size)]
        torch.stack([torch.stack(s) for s in sums]).sum(0)


def naive(model, x, y, sigmas, samples, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    for sigma in [s for s in sigmas if s > 0]:
        for _ in range(samples):
            net = copy.deepcopy(model).eval()
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1 + sigma * torch.randn(p.shape, generator=g))
                loss = err = 0.0
                for xb, yb in loader:
                    out = net(xb)
                    loss += F.cross_entropy(out, yb, reduction="sum").item()
                    err += (out.argmax(1) != yb).sum().item()


def median_times(fns, repeats):
    """Median wall time of each function, the functions interleaved so that load changes hit all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--sigmas", default="0,0.01,0.05")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sigmas = parse_sigmas(args.sigmas)
    passes = 1 + args.samples * sum(s > 0 for s in sigmas)
    g = torch.Generator().manual_seed(0)
    cases = [("MLP 30-100-100-4", mlp(), teacher_data(4000, (30,), 4, g)),
             ("LeNet 3x32x32", lenet(), teacher_data(300, (3, 32, 32), 10, g))]
    print(f"CPU, {torch.get_num_threads()} threads, {len(sigmas)} sigmas, {args.samples} samples, "
          f"{passes} passes over the data, median of {args.repeats}")
    print(f"{'model':<18} {'examples':>8} {'params':>7} {'forward s':>9} {'eval s':>8} {'flatcli s':>9} "
          f"{'naive s':>8} {'vs forward':>10} {'vs eval':>7} {'x naive':>7}")
    for name, model, (x, y) in cases:
        kw = dict(samples=args.samples, batch_size=args.batch_size, vectorize=False)
        local_energy(model, (x, y), sigmas, **kw)  # warm-up
        t_fwd, t_eval, t_flat, t_naive = median_times([
            lambda: forward_only(model, x, y, passes, args.batch_size),
            lambda: evaluate_only(model, x, y, passes, args.batch_size),
            lambda: local_energy(model, (x, y), sigmas, **kw),
            lambda: naive(model, x, y, sigmas, args.samples, args.batch_size, 0)], args.repeats)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<18} {len(x):>8} {n_params:>7} {t_fwd:>9.3f} {t_eval:>8.3f} {t_flat:>9.3f} {t_naive:>8.3f} "
              f"{t_fwd / t_flat:>10.2f} {t_eval / t_flat:>7.2f} {t_naive / t_flat:>7.1f}")


if __name__ == "__main__":
    main()
