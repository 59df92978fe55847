"""``flatcli local-entropy``: its options, and how its results become rows and tables (MATH.md §2).

Everything else (checkpoints, data, progress, outputs, torchrun) is the measurement pipeline's.
"""
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.bp_local_entropy import (BPItersOpt, BPTolOpt, CouplingsOpt, DampingOpt, DistancesOpt, reject_bp_options,
                                         run_bp)
from flatcli.cli.common import Loss
from flatcli.cli.render import fmt, plus_minus, table
from flatcli.errors import FlatcliError

DEFAULT_GAMMAS = "0.3,1,3,10,30,100,300"
COLUMNS = ["gamma", "local_entropy", "local_entropy_sem", "distance", "loss_mean", "error_mean",
           "beta", "chains", "steps", "burn_in", "sampler", "acceptance", "langevin_lr", "curvature",
           "checkpoint_loss", "checkpoint_error", "examples", "parameters", "loss_function", "split", "seed",
           "rhat", "ess", "converged"]


@pipeline.measurement_command
def local_entropy(
    common: pipeline.Common,
    gammas: Annotated[str, typer.Option(help="Couplings γ: a list 1,10,100 or start:stop:num (geometrically spaced, both ends included); each > 0. Large γ probes the immediate neighbourhood of the weights, small γ a wider one.")] = DEFAULT_GAMMAS,
    beta: Annotated[Optional[float], typer.Option(help="Inverse temperature β of the Langevin chains (default: the number of examples in use, so that the energy is the summed loss).", show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, help="Langevin steps per ladder γ (one full-batch forward-backward pass per chain and step).")] = 120,
    burn_in: Annotated[int, typer.Option(min=0, help="Of those, steps discarded before averaging (and used to tune the step size); fewer than --steps.")] = 30,
    chains: Annotated[int, typer.Option(min=1, help="Independent Langevin chains; the ± is the standard error over chains.")] = 4,
    chains_per_pass: Annotated[int, typer.Option(min=1, help="Chains computed together in one vectorized pass; under torchrun the passes are shared out among the processes, so use --chains ≥ this × processes. The chains are the same whatever it is; only the float rounding differs.")] = 4,
    langevin_lr: Annotated[Optional[float], typer.Option(help="A fixed Langevin step η at every γ (default: c/(curvature + γ), each chain tuning c toward 60% acceptance during burn-in).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Minibatch for SGLD (default: all the examples: full-batch Langevin with a Metropolis correction, MALA, which is exact).", show_default=False)] = None,
    loss: Annotated[Optional[Loss], typer.Option(help="Loss L of the energy βL (default: the checkpoint's loss).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="langevin (any network: Langevin chains, MATH.md §2) or bp (committee machines: belief propagation, MATH.md §7; the Langevin options are then unused).")] = "langevin",
    couplings: CouplingsOpt = None,
    distances: DistancesOpt = None,
    damping: DampingOpt = 0.5,
    bp_tolerance: BPTolOpt = 1e-7,
    bp_iters: BPItersOpt = 2000,
    precondition: Annotated[int, typer.Option(min=0, help="Precondition each Langevin step by the top K Hessian eigenpairs (Lanczos): direction i steps c/(h_i + γ), the others c/(h_K + γ), so soft directions equilibrate as fast as stiff ones on ill-conditioned landscapes; 0: one step c/(curvature + γ) for all.")] = 0,
):
    """Local entropy s(γ): the log-volume of low-loss weights around the checkpoint, per parameter, relative to a flat landscape.

    0 for a flat landscape, negative around a curved minimum: closer to 0 is flatter. Compare checkpoints at the same γ, β and examples; several checkpoints are measured side by side with the same settings.

    Example: flatcli local-entropy runs/sgd runs/esgd runs/rsgd --csv entropy.csv

    Committee machines (--model committee:K): --method bp gives S(d), the log-count of zero-error weights at distance d from the checkpoint, by belief propagation.
    """
    if method not in ("langevin", "bp"):
        raise FlatcliError(f"method={method!r} is not langevin or bp", "use --method langevin or --method bp")
    if method == "bp":
        return run_bp(common, couplings, distances, damping, bp_tolerance, bp_iters)
    reject_bp_options(couplings, distances)
    from flatcli.measure.local_entropy import EntropySettings, parse_gammas
    settings = EntropySettings(tuple(parse_gammas(gammas)), beta, steps, burn_in, chains, chains_per_pass,
                               langevin_lr, batch_size, loss.value if loss else "cross-entropy", seed=common.seed,
                               precondition=precondition)
    pipeline.run(EntropyMeasurement(settings, loss is not None, common.split.value), common)


class EntropyMeasurement:
    """local-entropy for the pipeline: one estimator call per checkpoint, one row per asked γ."""
    name, description, columns, bn_examples = "local-entropy", "local entropy", COLUMNS, None

    def __init__(self, settings, loss_given: bool, split: str):
        self.base, self.loss_given, self.split = settings, loss_given, split
        self.betas: list[float] = []

    def settings(self, examples):
        s = self.base
        self.betas = [float(s.beta if s.beta is not None else n) for n in examples]
        return {"gammas": list(s.gammas), "beta": self.betas[0] if len(set(self.betas)) == 1 else self.betas,
                "beta_from": "--beta" if s.beta is not None else "the number of examples", "steps": s.steps,
                "burn_in": s.burn_in, "chains": s.chains, "chains_per_pass": s.chains_per_pass,
                "langevin_lr": s.langevin_lr or "auto", "batch_size": s.batch_size,
                "precondition": s.precondition}

    def measure(self, x, callback):
        from dataclasses import replace
        from flatcli.measure.local_entropy import measure as estimate
        settings = self.base if self.loss_given else replace(self.base, loss=x.loss)
        return estimate(x.model, x.data, settings, callback=callback)

    def rows(self, result):
        return [{**r, "split": self.split} for r in result.records()]

    def render(self, labels, results, common):
        return entropy_tables(labels, results, common)

    def notes(self, labels, results):
        downhill = [label for label, r in zip(labels, results) if any(row.loss_mean < r.loss for row in r.rows)]
        lines = [f"⟨L(w')⟩ < L(w) at some γ for {', '.join(downhill)}: lower loss lies within reach, the checkpoint "
                 f"is not at a minimum (marked ↓ in the table), so s mixes flatness with unfinished training"] \
            if downhill else []
        return lines + unconverged_note(labels, results)

    def details(self, label, result):
        """What the measurement resolved for one checkpoint: β, curvature, sampler and the whole internal ladder."""
        return {"checkpoint": label, "beta": result.beta, "examples": result.n_examples,
                "parameters": result.n_params, "curvature": result.curvature, "sampler": result.sampler,
                "acceptance": result.acceptance, "loss_function": result.settings.loss,
                "checkpoint_loss": result.loss, "checkpoint_error": result.error,
                "ladder": [vars(p) for p in result.ladder]}


def entropy_tables(labels: list[str], results: list, common) -> list:
    """Rows = γ, one column per checkpoint: s ± sem (closer to 0 = flatter), then the distance and loss."""
    first = results[0]
    shared = lambda name, text: (text.format(getattr(first, name)) if len({getattr(r, name) for r in results}) == 1
                                 else f"{name.replace('n_', '')}: see the CSV")
    examples, beta = shared("n_examples", "{} examples"), shared("beta", "β {:g}")
    about = (f"{shared('sampler', '{}').upper()} · {first.chains} chains × {first.steps} steps "
             f"({first.burn_in} burn-in) · split {common.split.value} ({examples}) · {beta} · seed {common.seed}")
    mark = lambda r, row: (" ↓" if row.loss_mean < r.loss else "") + ("" if row.converged else " ?")
    rows = [[f"{g:g}"] + [v for r in results for v in
                          (plus_minus(r.rows[j].local_entropy, r.rows[j].local_entropy_sem) + mark(r, r.rows[j]),
                           fmt(r.rows[j].distance, 3), fmt(r.rows[j].loss_mean))]
            for j, g in enumerate(first.settings.gammas)]
    columns = ["γ"] + [c for label, r in zip(labels, results)  # each checkpoint named once, over its s column
                       for c in (f"{label}\ns ± sem", "distance", f"⟨L(w')⟩\nL(w) {fmt(r.loss)}")]
    return [table("s(γ) ± sem: local entropy per parameter (0 = flat, closer to 0 = flatter); distance "
                  "⟨|w' − w|²⟩/N and mean loss ⟨L(w')⟩ of the coupled weights w'", columns, rows,
                  caption=about + " · ↓: ⟨L(w')⟩ < L(w), not at a minimum · ?: not converged (R̂ > 1.01 or ESS < 100)")]


def unconverged_note(labels: list[str], results: list) -> list[str]:
    """One line naming every (checkpoint, γ) whose chains did not pass R̂ ≤ 1.01 and ESS ≥ 100, and the flag that
    helps: --steps when the chains disagree (R̂), --chains or --steps when they merely have too few samples."""
    from flatcli.measure.diagnostics import ESS_MIN, RHAT_MAX
    bad = [(label, row) for label, r in zip(labels, results) for row in r.rows if not row.converged]
    if not bad:
        return []
    where = "; ".join(f"{label} at γ {', '.join(f'{row.gamma:g}' for _, row in group)}"
                      for label in dict.fromkeys(label for label, _ in bad)
                      for group in [[b for b in bad if b[0] == label]])
    rhats = [row.rhat for _, row in bad]
    cure = ("--chains 2 or more (R̂ compares chains)" if any(v != v for v in rhats) else
            "more --steps (the chains have not mixed)" if any(v > RHAT_MAX for v in rhats) else
            "more --chains or --steps (too few effective samples)")
    worst = max((row.rhat for _, row in bad if row.rhat == row.rhat), default=float("nan"))
    return [f"not converged (R̂ > {RHAT_MAX} or ESS < {ESS_MIN:g}; worst R̂ {worst:.3g}), marked ? in the table: "
            f"{where}; s and the distance there may be biased — use {cure}"]
