"""``flatcli sharpness``: worst-case (Auto-PGD) and average-case adaptive sharpness (MATH.md §6).

Everything else (checkpoints, data, progress, outputs, torchrun) is the measurement pipeline's.
"""
import enum
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.common import Loss
from flatcli.cli.local_energy import BnPolicy
from flatcli.cli.render import fmt, plus_minus, table
from flatcli.errors import FlatcliError

DEFAULT_RHO = "0.1"
COLUMNS = ["kind", "norm", "adaptive", "rho", "m", "sharpness", "sem", "steps", "restarts", "samples", "batches",
           "examples", "bn", "loss_function", "seed", "split"]


class Kind(str, enum.Enum):
    worst = "worst"
    average = "average"
    both = "both"


class Norm(str, enum.Enum):
    l2 = "l2"
    linf = "linf"


def parse_rhos(text: str) -> list[float]:
    """``"0.05,0.1"`` → [0.05, 0.1] (syntax only; the values are checked by ``SharpnessSettings``)."""
    try:
        return sorted({float(part) for part in text.split(",")})
    except ValueError:
        raise FlatcliError(f"cannot read rho {text!r}", "write a comma-separated list like 0.05,0.1") from None


@pipeline.measurement_command
def sharpness(
    common: pipeline.Common,
    rho: Annotated[str, typer.Option(help="Radii ρ of the perturbation ball (worst case) or noise scale (average case), a list like 0.05,0.1; in units of |w| with --adaptive.")] = DEFAULT_RHO,
    kind: Annotated[Kind, typer.Option(help="worst: max over ‖δ/c‖ ≤ ρ by Auto-PGD; average: E over δ ~ N(0, ρ² c²) (= local energy's δL at σ = ρ); both.")] = Kind.worst,
    norm: Annotated[Norm, typer.Option(help="Worst case: the norm of the ball, l2 or linf.")] = Norm.l2,
    adaptive: Annotated[bool, typer.Option("--adaptive/--no-adaptive", help="Scale the perturbation by |w| (c = |w|), or not (c = 1).")] = True,
    m: Annotated[Optional[int], typer.Option("--m", "--m-sharpness", min=1, show_default="all", help="m-sharpness: examples per batch; the sharpness is the mean over batches (a remainder of fewer than m examples is left out). Under torchrun write --m-sharpness: torchrun takes --m for one of its own flags.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Worst case: Auto-PGD iterations per start.")] = 20,
    restarts: Annotated[int, typer.Option(min=1, help="Worst case: random starts per batch (the best is kept).")] = 1,
    samples: Annotated[int, typer.Option(min=1, help="Average case: noise draws (the same draws at every ρ, those of local-energy).")] = 50,
    bn: Annotated[BnPolicy, typer.Option(help="BatchNorm of the perturbed net: eval (stored statistics) or recompute (re-estimated on training batches for every perturbed net and for the reference).")] = BnPolicy.eval,
    bn_batches: Annotated[int, typer.Option(min=1, help="With --bn recompute: training batches (of --batch-size) to re-estimate the statistics on.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 1000,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss L (default: the checkpoint's loss).", show_default=False)] = None,
):
    """Adaptive sharpness: how much the loss can rise (worst case) or does rise (average case) when the weights move by ρ relative to their size.

    Higher means sharper. Example: flatcli sharpness runs/sgd runs/esgd --rho 0.05,0.1 --kind both
    """
    pipeline.run(SharpnessMeasurement(parse_rhos(rho), kind.value, norm.value, adaptive, m, steps, restarts,
                                      samples, bn.value, bn_batches, batch_size, loss.value if loss else None,
                                      common.seed, common.split.value), common)


class SharpnessMeasurement:
    """sharpness for the pipeline: one estimator call per checkpoint, one row per (kind, ρ)."""
    name, description, columns = "sharpness", "sharpness", COLUMNS

    def __init__(self, rhos, kind, norm, adaptive, m, steps, restarts, samples, bn, bn_batches, batch_size, loss,
                 seed, split):
        from flatcli.measure.sharpness import SharpnessSettings
        self.loss, self.split = loss, split
        self.base = SharpnessSettings(tuple(rhos), kind, norm, adaptive, m, steps, restarts, samples, bn, bn_batches,
                                      loss or "cross-entropy", batch_size, seed)
        self.bn_examples = bn_batches * batch_size if bn == "recompute" else None

    def settings(self, examples):
        s = self.base.to_dict()
        return {k: s[k] for k in ("rhos", "kind", "norm", "adaptive", "m", "steps", "restarts", "samples", "bn",
                                  "bn_batches", "batch_size")}

    def measure(self, x, callback):
        from dataclasses import replace
        from flatcli.measure.sharpness import measure as estimate
        return estimate(x.model, x.data, replace(self.base, loss=self.loss or x.loss), bn_data=x.bn_data,
                        callback=callback)

    def rows(self, result):
        return [{**r, "split": self.split} for r in result.records()]

    def render(self, labels, results, common):
        s = self.base
        about = (f"{'adaptive' if s.adaptive else 'plain'} · worst case {s.norm}, {s.steps} steps × {s.restarts} "
                 f"start(s) · average case {s.samples} draws · m {results[0].points[0].m if results else '—'} · "
                 f"split {common.split.value} · bn {s.bn} · seed {s.seed}")
        columns = ["kind", "ρ"] + [f"{label}\nloss {fmt(r.loss)}" for label, r in zip(labels, results)]
        rows = [[p.kind, f"{p.rho:g}"] + [plus_minus(r.points[j].sharpness, r.points[j].sem) for r in results]
                for j, p in enumerate(results[0].points)]
        return [table("sharpness ± sem: rise of the loss", columns, rows, caption=about)]

    def notes(self, labels, results):
        return []

    def details(self, label, result):
        return {"checkpoint": label, "loss": result.loss, "examples": result.examples, "batches": result.batches}
