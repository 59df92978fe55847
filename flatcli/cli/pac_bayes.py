"""``flatcli pac-bayes``: the PAC-Bayes flatness 1/σ*² of Jiang et al. 2020 (MATH.md §6).

Everything else (checkpoints, data, progress, outputs, torchrun) is the measurement pipeline's.
"""
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.local_energy import BnPolicy
from flatcli.cli.render import fmt, table

COLUMNS = ["noise", "target", "sigma", "flatness", "sigma_high", "deviation", "probes", "at_max", "error",
           "epsilon", "max_sigma", "samples", "tolerance", "bn", "examples", "seed", "split"]


@pipeline.measurement_command
def pac_bayes(
    common: pipeline.Common,
    target: Annotated[float, typer.Option(min=0, max=1, help="Allowed rise of the 0-1 error (a fraction): σ* is the largest σ whose expected error stays within it.")] = 0.1,
    magnitude_aware: Annotated[bool, typer.Option("--magnitude-aware/--plain", help="Noise u_i ~ N(0, σ² w_i² + ε²) (magnitude-aware) or u ~ N(0, σ² I) (plain).")] = True,
    epsilon: Annotated[float, typer.Option(min=0, help="Magnitude-aware: the noise standard deviation ε on a zero weight.")] = 1e-3,
    max_sigma: Annotated[float, typer.Option(help="Upper end of the bisection on [0, max-sigma].")] = 5.0,
    samples: Annotated[int, typer.Option(min=1, help="Noise draws per probe (the same draws at every probe).")] = 20,
    tolerance: Annotated[float, typer.Option(help="Bisection stops when the bracket is narrower than tolerance × its upper end.")] = 0.01,
    max_probes: Annotated[int, typer.Option(min=1, help="At most this many probes (each over all draws).")] = 40,
    bn: Annotated[BnPolicy, typer.Option(help="BatchNorm of the perturbed net: eval (stored statistics) or recompute (re-estimated on training batches for every perturbed net and for the reference).")] = BnPolicy.eval,
    bn_batches: Annotated[int, typer.Option(min=1, help="With --bn recompute: training batches (of --batch-size) to re-estimate the statistics on.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 1000,
):
    """PAC-Bayes flatness: the largest weight noise σ* that raises the error by at most --target; flatness 1/σ*².

    Higher flatness means sharper. Example: flatcli pac-bayes runs/sgd runs/esgd --samples 50
    """
    pipeline.run(PacBayesMeasurement(target, "magnitude-aware" if magnitude_aware else "plain", epsilon, max_sigma,
                                     samples, tolerance, max_probes, bn.value, bn_batches, batch_size, common.seed,
                                     common.split.value), common)


class PacBayesMeasurement:
    """pac-bayes for the pipeline: one bisection per checkpoint, one row each."""
    name, description, columns = "pac-bayes", "pac-bayes", COLUMNS

    def __init__(self, target, noise, epsilon, max_sigma, samples, tolerance, max_probes, bn, bn_batches,
                 batch_size, seed, split):
        from flatcli.measure.pac_bayes import PacBayesSettings
        self.split = split
        self.base = PacBayesSettings(target, noise, epsilon, max_sigma, samples, tolerance, max_probes, bn,
                                     bn_batches, "cross-entropy", batch_size, seed)
        self.bn_examples = bn_batches * batch_size if bn == "recompute" else None

    def settings(self, examples):
        s = self.base.to_dict()
        return {k: s[k] for k in ("target", "noise", "epsilon", "max_sigma", "samples", "tolerance", "max_probes",
                                  "bn", "bn_batches", "batch_size")}

    def measure(self, x, callback):
        from dataclasses import replace
        from flatcli.measure.pac_bayes import measure as estimate
        return estimate(x.model, x.data, replace(self.base, loss=x.loss), bn_data=x.bn_data, callback=callback)

    def rows(self, result):
        return [{**r, "split": self.split} for r in result.records()]

    def render(self, labels, results, common):
        s = self.base
        about = (f"{s.noise} noise{f' (ε {s.epsilon:g})' if s.noise == 'magnitude-aware' else ''} · target "
                 f"{s.target:g} · {s.samples} draws · tolerance {s.tolerance:g} · split {common.split.value} · "
                 f"bn {s.bn} · seed {s.seed}")
        rows = [[label, fmt(r.error), fmt(r.sigma), fmt(r.flatness), fmt(r.deviation), str(r.probes)]
                for label, r in zip(labels, results)]
        return [table("PAC-Bayes flatness 1/σ*²", ["checkpoint", "error", "σ*", "1/σ*²", "δε at σ*", "probes"],
                      rows, caption=about)]

    def notes(self, labels, results):
        out = []
        top = [label for label, r in zip(labels, results) if r.at_max]
        if top:
            out.append(f"the error never rose by {self.base.target:g} below --max-sigma {self.base.max_sigma:g}, "
                       f"so σ* is only a lower bound: {', '.join(top)} (raise --max-sigma)")
        zero = [label for label, r in zip(labels, results) if r.sigma == 0]
        if zero:
            out.append(f"the ε noise alone raised the error by more than {self.base.target:g}: {', '.join(zero)} "
                       "(σ* = 0; lower --epsilon)")
        return out

    def details(self, label, result):
        return {"checkpoint": label, "error": result.error, "examples": result.examples,
                "probes": [{"sigma": s, "deviation": d} for s, d in result.trace]}
