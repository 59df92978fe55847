"""``flatcli local-energy``: its options, and how its results become rows and tables (MATH.md §1).

Everything else (checkpoints, data, progress, outputs, torchrun) is the measurement pipeline's.
"""
import enum
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.common import Loss
from flatcli.cli.render import fmt, plus_minus, table

DEFAULT_SIGMAS = "0,0.01,0.02,0.05,0.1,0.2"
COLUMNS = ["split", "sigma", "samples", "error_mean", "error_sem", "delta_error", "loss_mean", "loss_sem",
           "delta_loss", "nonfinite", "noise", "bn", "loss_function", "examples", "seed"]


class Noise(str, enum.Enum):
    multiplicative = "multiplicative"
    additive = "additive"


class BnPolicy(str, enum.Enum):
    eval = "eval"
    recompute = "recompute"


@pipeline.measurement_command
def local_energy(
    common: pipeline.Common,
    sigmas: Annotated[str, typer.Option(help="Noise levels σ: a list 0,0.01,0.05 or start:stop:num (evenly spaced, both ends included); each >= 0.")] = DEFAULT_SIGMAS,
    samples: Annotated[int, typer.Option(min=1, help="Noise draws per σ (the same draws at every σ).")] = 50,
    noise: Annotated[Noise, typer.Option(help="multiplicative: w ⊙ (1 + σz); additive: w + σz.")] = Noise.multiplicative,
    bn: Annotated[BnPolicy, typer.Option(help="BatchNorm of the perturbed net: eval (stored statistics) or recompute (re-estimated on training batches, without augmentation, for every draw and for the unperturbed reference).")] = BnPolicy.eval,
    bn_batches: Annotated[int, typer.Option(min=1, help="With --bn recompute: training batches (of --batch-size) to re-estimate the statistics on.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 1000,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss to report next to the error (default: the checkpoint's loss).", show_default=False)] = None,
    amp: Annotated[bool, typer.Option("--amp", help="Run the forward passes in bfloat16 autocast (CUDA, CPU): faster on a GPU; δε moves by about 1e-3 (see the README).")] = False,
):
    """Local energy δε(σ): how much the error (and loss) rises when the weights are perturbed by noise of size σ.

    Higher means sharper. Several checkpoints are measured with the same settings and the same noise draws, side by side.

    Example: flatcli local-energy runs/sgd runs/esgd --csv - | flatcli plot - -o curves.png
    """
    from flatcli.measure.local_energy import parse_sigmas
    pipeline.run(EnergyMeasurement(parse_sigmas(sigmas), samples, noise.value, bn.value, bn_batches, batch_size,
                                   loss.value if loss else None, common.seed, common.split.value, amp), common)


class EnergyMeasurement:
    """local-energy for the pipeline: one estimator call per checkpoint, one row per σ."""
    name, description, columns = "local-energy", "local energy", COLUMNS

    def __init__(self, sigmas, samples, noise, bn, bn_batches, batch_size, loss, seed, split, amp=False):
        from flatcli.measure.local_energy import EnergySettings
        self.loss, self.split = loss, split  # loss None: each checkpoint's own
        self.base = EnergySettings(tuple(sigmas), samples, noise, bn, bn_batches, loss or "cross-entropy",
                                   batch_size, seed, amp=amp)  # validated here, before any work
        self.bn_examples = bn_batches * batch_size if bn == "recompute" else None

    def settings(self, examples):
        s = self.base.to_dict()
        return {k: s[k] for k in ("sigmas", "samples", "noise", "bn", "bn_batches", "batch_size", "amp")}

    def measure(self, x, callback):
        from dataclasses import replace
        from flatcli.measure.local_energy import measure as estimate
        return estimate(x.model, x.data, replace(self.base, loss=self.loss or x.loss), bn_data=x.bn_data,
                          callback=callback)

    def rows(self, result):
        return [{"split": self.split, **r} for r in result.records()]

    def render(self, labels, results, common):
        return energy_tables(labels, results, common)

    def notes(self, labels, results):
        bad = [f"{label} ({r.nonfinite} draw(s))" for label, r in zip(labels, results) if r.nonfinite]
        return [f"non-finite loss under noise, left out of the loss columns (see 'nonfinite' in the CSV): "
                f"{', '.join(bad)}"] if bad else []

    def details(self, label, result):
        return {"checkpoint": label, "error": result.error, "loss": result.loss,
                "stored_error": result.stored_error, "stored_loss": result.stored_loss,
                "examples": result.examples, "vectorized": result.vectorized}


def energy_tables(labels: list[str], results: list, common) -> list:
    """Rows = σ, one column per checkpoint, so the flatter one shows at a glance: δε ± sem, then δL ± sem."""
    s = results[0].settings
    sizes = sorted({r.examples for r in results})
    examples = f"{sizes[0]} examples" if len(sizes) == 1 else "examples: see the CSV"
    about = (f"{s.noise} noise · {s.samples} draws · split {common.split.value} ({examples}) · bn {s.bn} · "
             f"seed {s.seed}")
    tables = []
    for title, base, mean, sem in (("δε ± sem: rise of the error (a fraction)", "error", "delta_error", "error_sem"),
                                   ("δL ± sem: rise of the loss", "loss", "delta_loss", "loss_sem")):
        columns = ["σ"] + [f"{label}\n{base} {fmt(getattr(r, base))}" for label, r in zip(labels, results)]
        rows = [[f"{sigma:g}"] + [plus_minus(getattr(r.points[j], mean), getattr(r.points[j], sem)) for r in results]
                for j, sigma in enumerate(s.sigmas)]
        tables.append(table(title, columns, rows, caption=about))
    return tables
