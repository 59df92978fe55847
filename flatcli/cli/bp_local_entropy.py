"""``flatcli local-entropy --method bp``: belief-propagation local entropy of committee machines (MATH.md §7).

The options (declared on ``local-entropy``), and how the estimator's results become rows and tables; the
estimator itself is ``flatcli.measure.bp_committee``. Torch-free at import time.
"""
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.render import fmt, table
from flatcli.errors import FlatcliError

BP = "Belief propagation (--method bp, committee machines)"
COLUMNS = ["coupling", "overlap", "distance", "local_entropy", "iterations", "converged", "free_entropy",
           "hidden", "inputs", "examples", "prior", "damping", "tolerance", "split", "seed"]

CouplingsOpt = Annotated[Optional[str], typer.Option(
    show_default="0.02,0.05,0.1,0.2,0.5,1,2,5,10,20; binary weights 0.02,0.05,0.1,0.2,0.5,1,1.5,2", rich_help_panel=BP,
    help="Couplings γ of the weights to the checkpoint: a list (γ < 0 pushes away) or start:stop:num (geometric, > 0). Larger γ: "
         "nearer the checkpoint.")]
DistancesOpt = Annotated[Optional[str], typer.Option(
    show_default=False, rich_help_panel=BP,
    help="Instead of --couplings: distances d = (1 − overlap)/2 in (0, 0.5], each reached by bisection on γ.")]
DampingOpt = Annotated[float, typer.Option(rich_help_panel=BP, help="Damping of the BP updates, in [0, 0.99].")]
BPTolOpt = Annotated[float, typer.Option(rich_help_panel=BP, help="Converged when no mean weight moves more than this in one iteration.")]
BPItersOpt = Annotated[int, typer.Option(min=1, rich_help_panel=BP, help="Most BP iterations per coupling.")]


def parse_list(name: str, text: Optional[str]):
    """A comma list or start:stop:num (geometric, as --gammas) of numbers; None stays None."""
    if text is None:
        return None
    from flatcli.measure.local_entropy import parse_gammas
    if ":" in text:
        return tuple(parse_gammas(text))
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise FlatcliError(f"{name}={text!r} is not a list of numbers", "write e.g. 0.1,1,10") from None


def run_bp(common: pipeline.Common, couplings: Optional[str], distances: Optional[str], damping: float,
           bp_tolerance: float, bp_iters: int) -> None:
    """Validate the BP settings and run them through the measurement pipeline."""
    from flatcli.measure.bp_committee import BPSettings
    settings = BPSettings(parse_list("couplings", couplings), parse_list("distances", distances), damping,
                          bp_tolerance, bp_iters, seed=common.seed)
    pipeline.run(BPMeasurement(settings, common.split.value), common)


def reject_bp_options(couplings, distances) -> None:
    """With --method langevin, the BP-only options are a mistake, not something to ignore."""
    for flag, value in (("--couplings", couplings), ("--distances", distances)):
        if value is not None:
            raise FlatcliError(f"{flag} is an option of --method bp", "add --method bp, or use --gammas for Langevin")


class BPMeasurement:
    """local-entropy --method bp for the pipeline: one BP sweep per checkpoint, one row per coupling."""
    name, description, columns, bn_examples = "local-entropy", "BP local entropy", COLUMNS, None

    def __init__(self, settings, split: str):
        self.base, self.split = settings, split

    def settings(self, examples):
        s = self.base
        asked = ({"distances": list(s.distances)} if s.distances is not None else
                 {"couplings": list(s.couplings) if s.couplings is not None else "default of the prior"})
        return {"method": "bp", **asked, "damping": s.damping, "tolerance": s.tolerance, "max_iters": s.max_iters}

    def check(self, loaded, inputs):
        """Before any output: every checkpoint is a committee machine that classifies all its examples."""
        from flatcli.measure.bp_committee import make_problem
        for ckpt in loaded:
            try:
                make_problem(inputs(ckpt).model, inputs(ckpt).data)
            except FlatcliError as e:
                raise FlatcliError(f"{ckpt.label}: {e.what}", e.fix) from None
            finally:
                inputs.release(ckpt)

    def measure(self, x, callback):
        from flatcli.measure.bp_committee import measure as estimate
        return estimate(x.model, x.data, self.base, callback=callback)

    def rows(self, result):
        return [{**r, "split": self.split, "seed": self.base.seed} for r in result.records()]

    def render(self, labels, results, common):
        first = results[0]
        by_distance = self.base.distances is not None
        head = "d" if by_distance else "γ"
        keys = sorted(self.base.distances, reverse=True) if by_distance else [p.coupling for p in first.points]
        rows = []
        for j, key in enumerate(keys):
            cells = []
            for r in results:
                p = sorted(r.points, key=lambda q: q.distance, reverse=True)[j] if by_distance else r.points[j]
                other = f"γ {fmt(p.coupling, 3)}" if by_distance else f"d {fmt(p.distance, 3)}"
                cells.append(f"{fmt(p.local_entropy)} ({other}){'' if p.converged else ' ✗'}")
            rows.append([f"{key:g}"] + cells)
        prior = "binary: ln 2 = no constraint" if first.binary else "spherical: 0 = no constraint"
        return [table(f"S(d): BP local entropy per weight at distance d from the checkpoint ({prior})",
                      [head] + labels, rows,
                      caption=f"K = {first.hidden} · N = {first.inputs} · {first.examples} examples (split "
                              f"{common.split.value}) · damping {self.base.damping:g} · ✗: not converged")]

    def notes(self, labels, results):
        bad = [label for label, r in zip(labels, results) if not all(p.converged for p in r.points)]
        return [f"BP did not converge at some couplings for {', '.join(bad)} (marked ✗; converged=False in the "
                "CSV): try a larger --damping or --bp-iters"] if bad else []

    def details(self, label, result):
        return None
