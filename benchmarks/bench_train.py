"""Training throughput of flatcli against a minimal hand-written PyTorch loop, in the same process.

    python benchmarks/bench_train.py                 # default mlp on teacher, lenet on CIFAR-shaped tensors
    python benchmarks/bench_train.py --epochs 3 --repeats 5

Each row: examples per second of ``flatcli train`` (the Trainer with the CLI's progress bar, per-epoch test
evaluation and checkpoints included) and of a bare loop (randperm, forward, backward, SGD step) on the same
model, data and batch size; the ratio is flatcli / hand (target >= 0.9). eSGD and rSGD rows compare their
per-epoch cost with SGD's at the same budget, against the gradient work they must do (eSGD ≈ 1×, rSGD ≈ y×).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatcli.cli.common import stderr_console  # noqa: E402
from flatcli.cli.train import run_with_progress  # noqa: E402
from flatcli.data import Data, DataSpec, Split, load_data  # noqa: E402
from flatcli.models import ModelSpec, build_model  # noqa: E402
from flatcli.training import Trainer, TrainConfig  # noqa: E402


def cifar_shaped(n: int = 2048) -> Data:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    mean, std = torch.full((3, 1, 1), 120.0), torch.full((3, 1, 1), 60.0)
    split = Split(x, y, mean, std)
    return Data(DataSpec(name="cifar-shaped"), split, split.subset(256, g), (3, 32, 32), 10, 10, False)


def hand_loop(data: Data, spec: ModelSpec, cfg: TrainConfig) -> float:
    """Seconds for cfg.epochs epochs of the plainest correct SGD loop."""
    torch.manual_seed(cfg.seed)
    model = build_model(spec, data.input_shape, data.num_outputs)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x_all, y_all = data.train.tensors()
    n, b = len(x_all), cfg.batch_size
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n)
        for i in range(n // b):
            idx = perm[i * b:(i + 1) * b]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    return time.perf_counter() - start


def flatcli_run(data: Data, spec: ModelSpec, cfg: TrainConfig) -> tuple[float, float]:
    """(seconds of the training steps as flatcli records them, seconds of the whole run)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, spec, torch.device("cpu"), out=Path(tmp) / "run")
        console = stderr_console(quiet=True)
        start = time.perf_counter()
        run_with_progress(trainer, console)
        return trainer.seconds, time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cases = [("mlp / teacher", load_data(DataSpec()), ModelSpec()), ("lenet / cifar-shaped", cifar_shaped(), ModelSpec("lenet"))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs, median of {args.repeats}")
    print("steps: the training steps as recorded in metrics.csv; whole: the whole run, with the per-epoch test")
    print("evaluation, the checkpoints and the final train/test evaluation, which a bare loop does not do")
    print(f"{'case':<24}{'algo':<6}{'ex/s steps':>12}{'ex/s whole':>12}{'hand ex/s':>11}{'steps':>7}{'whole':>7}")
    for name, data, spec in cases:
        n = (len(data.train) // 64) * 64 * args.epochs
        base = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment=False)
        hand = median_time(lambda: hand_loop(data, spec, base), args.repeats)
        sgd = [statistics.median(t) for t in zip(*(flatcli_run(data, spec, base) for _ in range(args.repeats)))]
        print(f"{name:<24}{'sgd':<6}{n / sgd[0]:>12.0f}{n / sgd[1]:>12.0f}{n / hand:>11.0f}"
              f"{hand / sgd[0]:>7.2f}{hand / sgd[1]:>7.2f}   (ratio flatcli / hand; target >= 0.9)")
        for algo, work in (("esgd", 1), ("rsgd", TrainConfig().replicas)):
            cfg = TrainConfig(**{**base.to_dict(), "algo": algo, "lr": None})
            t = [statistics.median(v) for v in zip(*(flatcli_run(data, spec, cfg) for _ in range(args.repeats)))]
            print(f"{name:<24}{algo:<6}{'':>12}{'':>12}{'':>11}{t[0] / (sgd[0] * work):>7.2f}{t[1] / (sgd[1] * work):>7.2f}"
                  f"   (epoch cost / (SGD's × {work}); target <= 1.1)")


if __name__ == "__main__":
    main()
