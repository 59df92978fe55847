"""One-shot check of every accelerator path of flatcli against the CPU, with throughput ratios.

    python benchmarks/gpu_check.py                 # on the GPU (--device auto): under 4 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --tiny   # the same checks on the CPU (the test suite runs this)

Each check runs one small problem twice, on --device with the accelerator paths forced on (vmapped rSGD
replicas, vectorized noise draws, bfloat16 autocast) and on the CPU with the plain paths, and compares:

    train-sgd, train-esgd   final weights, max |Δ| / max |w| ≤ 1e-3 (float32 kernels differ by device)
    train-rsgd              the same, vmapped replicas on the device against one replica at a time on the CPU
    train-amp               final training loss under bf16 autocast within 5% of the float32 run
    local-energy            vectorized draws against one draw at a time, same draws: loss within 1e-4
                            relative, error within 2 examples' worth, at every σ
    local-entropy           s(γ) within 4 combined standard errors (chains draw from device generators)
    hessian                 top eigenvalue within 1e-4 relative (when flatcli.measure.hessian is present)

then prints throughput ratios: vectorized draws / one at a time, vmapped replicas / a loop over replicas, and
flatcli's training step / a hand-written loop. A pass prints "all checks passed" and exits 0; any failure
exits 1 naming the check.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatcli.data import DataSpec, load_data  # noqa: E402
from flatcli.devices import resolve_device  # noqa: E402
from flatcli.models import ModelSpec, build_model  # noqa: E402
from flatcli.training import Trainer, TrainConfig  # noqa: E402


def trained(cfg, data, spec, device, batched=None):
    """(final weights on the CPU, final training loss, seconds per step) of a short run on ``device``."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, spec, device, out=Path(tmp) / "run")
        if batched is not None and hasattr(trainer.algorithm, "batched"):
            trainer.algorithm.batched = batched
        summary = trainer.run()
        seconds = trainer.seconds / max(1, cfg.steps)  # the training steps alone, as metrics.csv records them
        from safetensors.torch import load_file
        return load_file(str(Path(tmp) / "run" / "model.safetensors")), summary, seconds


def final_loss(summary) -> float:
    for key in ("train_loss", "loss"):
        if isinstance(summary, dict) and key in summary:
            return float(summary[key])
    return float("nan")


def weights_gap(a: dict, b: dict) -> float:
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def check_training(data, spec, device, steps, results):
    cpu = torch.device("cpu")
    for algo in ("sgd", "esgd", "rsgd"):
        cfg = TrainConfig(algo=algo, steps=steps, batch_size=32, seed=0, augment=False, replicas=3,
                          langevin_steps=3)
        on_dev, _, t_dev = trained(cfg, data, spec, device, batched=True)
        on_cpu, _, t_cpu = trained(cfg, data, spec, cpu, batched=False)
        gap = weights_gap(on_cpu, on_dev)
        results.append((f"train-{algo}", gap <= 1e-3, f"max |Δw|/max|w| = {gap:.1e} (≤ 1e-3)"))
    cfg = TrainConfig(steps=steps, batch_size=32, seed=0, augment=False)
    amp = TrainConfig(**{**cfg.to_dict(), "amp": True})
    w_full, s_full, _ = trained(cfg, data, spec, device)
    w_amp, s_amp, _ = trained(amp, data, spec, device)
    a, b = final_loss(s_full), final_loss(s_amp)
    moved = weights_gap(w_full, w_amp)
    ok = abs(a - b) <= 0.05 * abs(a) and moved > 0 if a == a and b == b else False
    results.append(("train-amp", ok, f"train loss {b:.4f} with bf16 against {a:.4f} (within 5%); "
                                     f"weights moved by {moved:.1e} (> 0: bf16 ran)"))


def check_local_energy(model, xy, device, samples, results, ratios):
    from flatcli.measure import local_energy
    sigmas = (0.0, 0.02, 0.1)
    x, y = xy
    start = time.perf_counter()
    dev = local_energy(model.to(device), (x.to(device), y.to(device)), sigmas, samples=samples, vectorize=True)
    t_vec = time.perf_counter() - start
    start = time.perf_counter()
    one = local_energy(model.to(device), (x.to(device), y.to(device)), sigmas, samples=samples, vectorize=False)
    t_one = time.perf_counter() - start
    cpu = local_energy(model.to("cpu"), xy, sigmas, samples=samples, vectorize=False)
    n, worst_loss, worst_err = len(y), 0.0, 0.0
    for p, q in zip(dev.points, cpu.points):
        worst_loss = max(worst_loss, abs(p.loss_mean - q.loss_mean) / abs(q.loss_mean))
        worst_err = max(worst_err, abs(p.error_mean - q.error_mean) * n)
    ok = worst_loss <= 1e-4 and worst_err <= 2 and dev.vectorized
    results.append(("local-energy", ok, f"vectorized={dev.vectorized}; loss rel Δ {worst_loss:.1e} (≤ 1e-4), "
                                        f"error Δ {worst_err:.1f} examples (≤ 2)"))
    ratios.append(("vectorized draws / one draw at a time (throughput)", t_one / t_vec))


def check_local_entropy(model, xy, device, steps, results):
    from flatcli.measure import local_entropy
    x, y = xy
    kw = dict(gammas=[1.0], steps=steps, burn_in=steps // 4, chains=4, seed=0)
    dev = local_entropy(model.to(device), (x.to(device), y.to(device)), **kw).rows[0]
    cpu = local_entropy(model.to("cpu"), xy, **kw).rows[0]
    se = (dev.local_entropy_sem ** 2 + cpu.local_entropy_sem ** 2) ** 0.5
    gap = abs(dev.local_entropy - cpu.local_entropy)
    results.append(("local-entropy", gap <= 4 * se + 1e-9, f"s {dev.local_entropy:.4g} against {cpu.local_entropy:.4g}, "
                                                         f"|Δ| = {gap:.2g} ≤ 4 × {se:.2g}"))


def check_hessian(model, xy, device, results):
    try:
        from flatcli.measure.hessian import hessian_spectrum
    except ImportError:
        results.append(("hessian", True, "skipped: flatcli.measure.hessian is not in this version"))
        return
    x, y = xy
    dev = hessian_spectrum(model.to(device), (x.to(device), y.to(device)), top_k=1, trace=False, seed=0)
    cpu = hessian_spectrum(model.to("cpu"), xy, top_k=1, trace=False, seed=0)
    gap = abs(dev.eigenvalues[0] - cpu.eigenvalues[0]) / abs(cpu.eigenvalues[0])
    results.append(("hessian", gap <= 1e-4, f"λ_max {dev.eigenvalues[0]:.6g} against {cpu.eigenvalues[0]:.6g}, "
                                            f"rel Δ {gap:.1e} (≤ 1e-4)"))


def hand_step_seconds(data, spec, device, steps) -> float:
    """Seconds per step of the plainest SGD loop on the same model and batch size."""
    torch.manual_seed(0)
    model = build_model(spec, data.input_shape, data.num_outputs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = (t.to(device) for t in data.train.tensors())
    start = time.perf_counter()
    for i in range(steps):
        idx = torch.randint(len(x), (32,), device=device)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def throughput(data, spec, device, steps, ratios):
    cfg = TrainConfig(algo="rsgd", steps=steps, batch_size=32, seed=0, augment=False, replicas=3)
    _, _, t_vmap = trained(cfg, data, spec, device, batched=True)
    _, _, t_loop = trained(cfg, data, spec, device, batched=False)
    ratios.append(("vmapped replicas / a loop over 3 replicas (throughput)", t_loop / t_vmap))
    _, _, t_flat = trained(TrainConfig(steps=steps, batch_size=32, seed=0, augment=False), data, spec, device)
    ratios.append(("flatcli training step / hand-written loop (throughput)",
                   hand_step_seconds(data, spec, device, steps) / t_flat))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="smallest sizes (the test suite's CPU run)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the comparisons are with float32 on the CPU
    torch.backends.cudnn.allow_tf32 = False
    n, steps, samples, chain_steps = (256, 4, 4, 40) if args.tiny else (4000, 40, 32, 120)
    data = load_data(DataSpec(n_train=n, n_test=n // 2))
    spec = ModelSpec("mlp", width=16 if args.tiny else 128)
    results, ratios = [], []
    print(f"flatcli gpu check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}")
    check_training(data, spec, device, steps, results)
    model = build_model(spec, data.input_shape, data.num_outputs, seed=0).eval()
    xy = data.train.tensors()
    check_local_energy(model, xy, device, samples, results, ratios)
    check_local_entropy(model, xy, device, chain_steps, results)
    check_hessian(model, xy, device, results)
    throughput(data, spec, device, steps, ratios)
    width = max(len(name) for name, _, _ in results)
    for name, ok, what in results:
        print(f"{'pass' if ok else 'FAIL'}  {name:<{width}}  {what}")
    for name, ratio in ratios:
        print(f"ratio {ratio:6.2f}  {name}")
    failed = [name for name, ok, _ in results if not ok]
    print("all checks passed" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
