"""flatcli hessian against PyHessian (Yao et al. 2020) on a ResNet-20 with CIFAR-shaped random tensors, CPU.

    python benchmarks/bench_hessian.py [--batch 32] [--threads 1] [--pyhessian-python /work/venvs/pyhessian/bin/python]

Two timings, each from the call to the answer (setup included), on the same weights and examples:
  top eigenvalue to 1e-3 relative: flatcli's Lanczos (tol 1e-3) vs PyHessian's power iteration (its tol 1e-3,
  a relative change between iterations, so its answer is checked against a tight reference and, if it is
  off by more than 1e-3, PyHessian is rerun with tol 1e-4 and that time counts);
  trace to a 1% standard error: flatcli's Hutch++ (probes doubled from 30 until its sem ≤ 1% of the trace)
  vs PyHessian's Hutchinson (a pilot of 50 probes gives the spread, then the probes a 1% sem needs are run;
  beyond 400 probes the time is extrapolated from the pilot's time per probe, and the report says so).
PyHessian is not a flatcli dependency: it runs in its own environment (a subprocess of this script) on the
weights and examples this script saves. The values must agree: eigenvalues within 1e-3, traces within
3 combined standard errors.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


PILOT, MAX_PROBES = 50, 400  # PyHessian's trace: pilot probes, most probes actually run


class Block(nn.Module):
    """BasicBlock with an option-A shortcut (subsample, zero-pad channels), He et al. 2016 §4.2."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        return F.relu(out + F.pad(short, (0, 0, 0, 0, 0, self.pad)))


class ResNet20(nn.Module):
    """3x3 stem (16), three stages of 3 blocks (16/32/64, strides 1/2/2), global pooling, linear: 0.27M weights."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks, c = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(Block(c, width, stride if i == 0 else 1))
                c = width
        self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def make_problem(batch: int, seed: int = 0):
    """Weights trained by 60 Adam steps to fit the examples (a Hessian near a minimum, as measured in practice),
    BatchNorm statistics from 4 further training-mode passes; everything from ``seed``."""
    torch.manual_seed(seed)
    model = ResNet20()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        for _ in range(4):
            model(x)
    return model.eval(), x, y


# -- PyHessian side (runs in PyHessian's own environment) ------------------------------------------------------

def patch_pyhessian():
    """PyHessian 0.1 calls torch.eig (removed in torch 2) in its density only, which is not timed here;
    patched anyway so that the module works on modern torch: eigh of the symmetric tridiagonal."""
    if not hasattr(torch, "eig"):
        def eig(a, eigenvectors=False):
            w, v = torch.linalg.eigh(a)
            return torch.stack([w, torch.zeros_like(w)], 1), v
        torch.eig = eig


def pyhessian_worker(path: str, ref: float, top_only: bool) -> dict:
    patch_pyhessian()
    from pyhessian import hessian
    saved = torch.load(path)
    model = ResNet20()
    model.load_state_dict(saved["state"])
    model.eval()
    x, y = saved["x"], saved["y"]
    out = {}
    tol = 1e-3
    while True:
        start = time.perf_counter()
        h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, _ = h.eigenvalues(top_n=1, tol=tol, maxIter=500)
        out.setdefault("top_runs", []).append({"tol": tol, "seconds": time.perf_counter() - start,
                                               "value": values[0]})
        if abs(values[0] - ref) <= 1e-3 * abs(ref) or tol < 1e-6:
            break
        tol /= 10
    if top_only:
        return out
    start = time.perf_counter()
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    pilot = h.trace(maxIter=PILOT, tol=0.0)
    mean, std = sum(pilot) / len(pilot), torch.tensor(pilot).std().item()
    need = max(PILOT, math.ceil((std / (0.01 * abs(mean))) ** 2))
    extrapolated = need > MAX_PROBES  # too long for a shared machine: the pilot's time per probe × need
    rest = h.trace(maxIter=need - PILOT, tol=0.0) if PILOT < need <= MAX_PROBES else []
    seconds = time.perf_counter() - start
    vhv = torch.tensor(pilot + rest, dtype=torch.float64)
    out["trace"] = {"probes": need, "run": len(vhv), "extrapolated": extrapolated,
                    "seconds": seconds * need / len(vhv) if extrapolated else seconds, "value": vhv.mean().item(),
                    "sem": vhv.std().item() / math.sqrt(len(vhv))}
    return out


# -- flatcli side ----------------------------------------------------------------------------------------------

def flatcli_side(model, x, y, top_only: bool):
    from flatcli.measure.hessian import hessian_spectrum
    start = time.perf_counter()
    ref = hessian_spectrum(model, (x, y), top_k=1, trace=False, tol=1e-7, max_iters=300, batch_size=len(x))
    out = {"reference": {"value": ref.eigenvalues[0], "residual": ref.residuals[0], "hvps": ref.hvps,
                         "seconds": time.perf_counter() - start, "method": ref.method}}
    start = time.perf_counter()
    top = hessian_spectrum(model, (x, y), top_k=1, trace=False, tol=1e-3, batch_size=len(x))
    out["top"] = {"seconds": time.perf_counter() - start, "value": top.eigenvalues[0], "hvps": top.hvps}
    if top_only:
        return out
    probes = 60
    while True:
        start = time.perf_counter()
        tr = hessian_spectrum(model, (x, y), top_k=0, trace=True, probes=probes, batch_size=len(x), seed=1)
        seconds = time.perf_counter() - start
        if tr.trace_sem <= 0.01 * abs(tr.trace) or probes >= 480:
            break
        probes *= 2
    out["trace"] = {"probes": probes, "seconds": seconds, "value": tr.trace, "sem": tr.trace_sem}
    return out


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pyhessian-python", default="/work/venvs/pyhessian/bin/python")
    p.add_argument("--top-only", action="store_true", help="time the top eigenvalue only (a few minutes)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # PATH REF: the PyHessian side
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(pyhessian_worker(a.worker[0], float(a.worker[1]), a.top_only)))
        return
    model, x, y = make_problem(a.batch)
    ours = flatcli_side(model, x, y, a.top_only)
    ref = ours["reference"]["value"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.pt")
        torch.save({"state": model.state_dict(), "x": x, "y": y}, path)
        run = subprocess.run([a.pyhessian_python, __file__, "--threads", str(a.threads), "--worker", path, repr(ref)]
                             + ["--top-only"] * a.top_only,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    if run.returncode:
        sys.exit(f"PyHessian failed:\n{run.stderr[-3000:]}")
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    report(a, ours, theirs, ref)


def report(a, ours, theirs, ref):
    ph_top = theirs["top_runs"][-1]
    ph_top_seconds = sum(r["seconds"] for r in theirs["top_runs"])
    rel = lambda v: abs(v - ref) / abs(ref)
    print(f"machine: {machine()}")
    print(f"problem: ResNet-20 (269,722 weights), {a.batch} CIFAR-shaped random examples, cross-entropy, BN eval")
    print(f"reference λ_max = {ref:.8g} (flatcli Lanczos, tol 1e-7, residual {ours['reference']['residual']:.2g}, "
          f"{ours['reference']['hvps']} HVPs, HVPs by {ours['reference']['method']})")
    print(f"top eigenvalue: flatcli {ours['top']['seconds']:.1f} s ({ours['top']['hvps']} HVPs, rel. error "
          f"{rel(ours['top']['value']):.1e}) · PyHessian {ph_top_seconds:.1f} s (tol "
          + ", ".join(f"{r['tol']:g}: {r['seconds']:.1f} s, rel. error {rel(r['value']):.1e}"
                      for r in theirs["top_runs"])
          + f") · ratio flatcli/PyHessian {ours['top']['seconds'] / ph_top_seconds:.2f}")
    z = 0.0
    if "trace" in ours:
        t1, t2 = ours["trace"], theirs["trace"]
        z = abs(t1["value"] - t2["value"]) / math.hypot(t1["sem"], t2["sem"])
        print(f"trace to 1% sem: flatcli Hutch++ {t1['value']:.5g} ± {t1['sem']:.2g} ({t1['probes']} HVPs, "
              f"{t1['seconds']:.1f} s) · PyHessian Hutchinson {t2['value']:.5g} ± {t2['sem']:.2g} from {t2['run']} HVPs; "
              f"1% needs {t2['probes']} HVPs, {t2['seconds']:.1f} s"
              f"{' (extrapolated from the time per probe)' if t2['extrapolated'] else ''} · ratio {t1['seconds'] / t2['seconds']:.2f} · difference {z:.1f} combined sem")
    agree = rel(ours["top"]["value"]) <= 1e-3 and rel(ph_top["value"]) <= 1e-3 and z <= 3
    print("values agree" if agree else "VALUES DISAGREE")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
