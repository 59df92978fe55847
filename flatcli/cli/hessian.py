"""``flatcli hessian``: its options, and how its results become rows and tables (MATH.md §6).

Everything else (checkpoints, data, progress, outputs, torchrun) is the measurement pipeline's.
"""
import enum
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.common import Loss
from flatcli.cli.render import fmt, plus_minus, table

COLUMNS = ["quantity", "index", "value", "sem", "at", "split", "residual", "converged", "trace_method", "probes",
           "tol", "loss_function", "examples", "parameters", "seed"]


class TraceMethod(str, enum.Enum):
    hutchpp = "hutch++"
    hutchinson = "hutchinson"


@pipeline.measurement_command
def hessian(
    common: pipeline.Common,
    top_k: Annotated[int, typer.Option(min=0, help="Largest eigenvalues to find (Lanczos).")] = 1,
    bottom_k: Annotated[int, typer.Option(min=0, help="Most negative eigenvalues to find (same Lanczos run).")] = 0,
    trace: Annotated[bool, typer.Option(help="Estimate the trace (with its standard error).")] = True,
    density: Annotated[bool, typer.Option(help="Estimate the spectral density (stochastic Lanczos quadrature; rows 'density' in the CSV).")] = False,
    probes: Annotated[int, typer.Option(min=2, help="Hessian-vector products for the trace (Rademacher probes).")] = 99,
    trace_method: Annotated[TraceMethod, typer.Option(help="hutch++ (low variance when a few eigenvalues dominate) or hutchinson.")] = TraceMethod.hutchpp,
    tol: Annotated[float, typer.Option(help="Relative tolerance of the eigenvalues (Lanczos residual ≤ tol·|λ|).")] = 1e-3,
    max_iters: Annotated[int, typer.Option(min=1, help="Lanczos steps at most (one Hessian-vector product each).")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per chunk of each Hessian-vector product (memory).")] = 1000,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss whose Hessian to take (default: the checkpoint's loss).", show_default=False)] = None,
    plot: Annotated[Optional[str], typer.Option(help="Draw the density (implies --density) on a symmetric-log axis, top eigenvalues marked, to PATH (.png, .pdf, .svg); needs matplotlib.", show_default=False)] = None,
):
    """Hessian spectrum of the mean loss: top (and bottom) eigenvalues, trace ± sem, spectral density.

    A larger top eigenvalue or trace means sharper. BatchNorm runs with its stored statistics (eval mode).
    Cost, in Hessian-vector products (about two passes over the examples each): at most max-iters + top-k + bottom-k
    for the eigenvalues, probes for the trace, 4 × 80 for the density.

    Example: flatcli hessian runs/sgd runs/esgd --top-k 3 --max-examples 2000 --csv hessian.csv
    """
    if plot is not None:
        check_plot_target(plot)
    measurement = HessianMeasurement(top_k, bottom_k, trace, density or plot is not None, probes, trace_method.value,
                                     tol, max_iters, batch_size, loss.value if loss else None, common.seed,
                                     common.split.value)
    pipeline.run(measurement, common)
    if plot is not None and int(os.environ.get("RANK", "0")) == 0:
        plot_density(plot, measurement.labels, measurement.results)


def check_plot_target(path: str) -> None:
    """Before any work: matplotlib is there and the file can be written."""
    from flatcli.errors import FlatcliError
    from flatcli.io import check_writable_dir
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FlatcliError("--plot needs matplotlib, which is not installed",
                           "pip install 'flatcli[plot]' (or matplotlib), or leave out --plot") from None
    check_writable_dir(Path(path).resolve().parent, what=path)


def plot_density(path: str, labels: list[str], results: list) -> None:
    """One curve per checkpoint: φ(λ) on a symlog λ axis and a log density axis, top eigenvalues dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flatcli.io import atomic_path
    fig, ax = plt.subplots(figsize=(7, 4))
    scale = max(max(abs(t) for t in r.density_grid) for r in results)
    for i, (label, r) in enumerate(zip(labels, results)):
        line, = ax.plot(r.density_grid, [max(d, 1e-12) for d in r.density], label=label)
        for v in r.eigenvalues:
            ax.axvline(v, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=max(scale * 1e-3, 1e-12))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ (dashed: top eigenvalues)")
    ax.set_ylabel("density φ(λ)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


class HessianMeasurement:
    """hessian for the pipeline: one estimator call per checkpoint; rows per eigenvalue, trace, grid point."""
    name, description, columns, bn_examples = "hessian", "hessian", COLUMNS, None

    def __init__(self, top_k, bottom_k, trace, density, probes, trace_method, tol, max_iters, batch_size, loss,
                 seed, split):
        from flatcli.measure.hessian import HessianSettings
        self.loss, self.split = loss, split  # loss None: each checkpoint's own
        self.base = HessianSettings(top_k, bottom_k, trace, density, probes, trace_method, tol, max_iters,
                                    loss=loss or "cross-entropy", batch_size=batch_size, seed=seed)

    def settings(self, examples):
        s = self.base.to_dict()
        keys = ("top_k", "bottom_k", "trace", "density", "probes", "trace_method", "tol", "max_iters", "batch_size")
        return {k: s[k] for k in keys}

    def measure(self, x, callback):
        from dataclasses import replace
        from flatcli.measure.hessian import measure as estimate
        return estimate(x.model, x.data, replace(self.base, loss=self.loss or x.loss), callback)

    def rows(self, result):
        return [{**r, "split": self.split} for r in result.records()]

    def render(self, labels, results, common):
        self.labels, self.results = labels, results  # for --plot, drawn once everything is written
        s = results[0].settings
        columns = ["checkpoint", "loss", "λ (largest first)", "bottom λ", "trace ± sem", "N", "HVPs"]
        rows = [[label, fmt(r.loss), ", ".join(fmt(v) for v in r.eigenvalues) or "—",
                 ", ".join(fmt(v) for v in r.bottom_eigenvalues) or "—",
                 plus_minus(r.trace, r.trace_sem) if r.trace is not None else "—", str(r.parameters), str(r.hvps)]
                for label, r in zip(labels, results)]
        about = (f"split {common.split.value} · tol {s.tol:g} · trace {s.trace_method}, {s.probes} probes · "
                 f"bn eval · seed {s.seed}" + (" · density: rows 'density' in the CSV" if s.density else ""))
        return [table("Hessian of the mean loss", columns, rows, caption=about)]

    def notes(self, labels, results):
        bad = [f"{label} ({r.iterations} steps)" for label, r in zip(labels, results)
               if (r.eigenvalues or r.bottom_eigenvalues) and not r.converged]
        return [f"eigenvalues not converged to --tol within --max-iters (see 'residual' in the CSV): "
                f"{', '.join(bad)}; raise --max-iters"] if bad else []

    def details(self, label, result):
        return {"checkpoint": label, "loss": result.loss, "parameters": result.parameters,
                "examples": result.examples, "hvps": result.hvps, "hvp_method": result.method,
                "iterations": result.iterations, "converged": result.converged}
