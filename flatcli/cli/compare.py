"""``flatcli compare``: every flatness measure on every checkpoint, ranked against generalization (MATH.md §6).

The checkpoint loading, data, devices and outputs are the measurement pipeline's; compare needs the train and the
test split of every checkpoint besides the examples it measures on, so it runs its own short loop over them.
"""
from pathlib import Path
from typing import Annotated, Optional

import typer

from flatcli.cli import pipeline
from flatcli.cli.common import check_output_target, start, to_json, write_output
from flatcli.cli.render import fmt, table
from flatcli.errors import FlatcliError

MEASURES_HELP = ("Comma-separated measures: local-energy, sharpness, pac-bayes, hessian (the default: all four, "
                 "hessian where installed) and local-entropy (slow: opt-in).")


@pipeline.measurement_command
def compare(
    common: pipeline.Common,
    measures: Annotated[Optional[str], typer.Option(help=MEASURES_HELP, show_default="local-energy,sharpness,pac-bayes,hessian")] = None,
    sigma: Annotated[float, typer.Option(help="local-energy: δε at this multiplicative noise level σ.")] = 0.1,
    energy_samples: Annotated[int, typer.Option(min=1, help="local-energy: noise draws.")] = 50,
    rho: Annotated[float, typer.Option(help="sharpness: worst-case adaptive l2 sharpness at this radius ρ.")] = 0.1,
    steps: Annotated[int, typer.Option(min=1, help="sharpness: Auto-PGD iterations.")] = 20,
    target: Annotated[float, typer.Option(help="pac-bayes: 1/σ*² with σ* the largest noise raising the error by at most this.")] = 0.1,
    pac_samples: Annotated[int, typer.Option(min=1, help="pac-bayes: noise draws per probe.")] = 20,
    gamma: Annotated[float, typer.Option(help="local-entropy: s(γ) at this coupling γ.")] = 10.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per forward pass.")] = 1000,
    plot: Annotated[Optional[Path], typer.Option(help="Write a grid of scatter plots (each measure against the test error, τ in the title) to PATH (needs matplotlib).", show_default=False)] = None,
):
    """Measure every checkpoint with every flatness measure, next to its train and test error, and rank each
    measure against the test error and the generalization gap (Kendall τ, Spearman ρ, and Jiang et al.'s Ψ
    over the hyper-parameters that vary among flatcli runs).

    Example: flatcli compare runs/* --max-examples 2000 --plot compare.png --csv compare.csv
    """
    from flatcli.measure.compare import CompareSettings, parse_measures
    names, notes = parse_measures(measures)
    settings = CompareSettings(names, sigma, energy_samples, rho, steps, target, pac_samples, gamma, batch_size,
                               common.seed)
    run(settings, notes, common, plot)


def run(settings, notes: list[str], common: pipeline.Common, plot: Optional[Path]) -> None:
    from flatcli import parallel
    from flatcli.measure.compare import Subject, measure

    pipeline.check_outputs(common.csv_out, common.json_out)
    check_output_target(None if plot is None else str(plot), "--plot")
    if plot is not None:
        _matplotlib()
    from flatcli.measure.rank import require_scipy
    require_scipy()
    dist, dev, console = start(common.device, common.threads)
    team = parallel.SOLO if dist is None else pipeline.team_of(dist)
    loaded = pipeline.load_checkpoints(common)
    if len(loaded) < 2:
        raise FlatcliError(f"{len(loaded)} checkpoint to compare", "pass at least two checkpoints")
    measured = pipeline.InputMaker(common.split.value, common.max_examples, common.seed, dev)
    train, test = (pipeline.InputMaker(split, None, common.seed, dev) for split in ("train", "test"))
    measured.check(loaded)
    for ckpt in loaded:
        if ckpt.data.test is None:
            raise FlatcliError(f"{ckpt.label!r} ({ckpt.data.spec.name}) has no test split, and compare ranks the "
                               "measures against the test error", "compare checkpoints whose data have a test split")
    subjects = [Subject(c.label, c.model, None, None, None, c.loss, _hyper(c)) for c in loaded]
    values = settings_dict(settings, loaded, common, dev, dist, [measured.examples(c) for c in loaded])
    console.print(pipeline.settings_line(values))
    for note in notes + measured.notes:
        console.print(f"note: {note}")
    with pipeline.SweepProgress("compare", 1, console) as progress, parallel.sharing(team):
        tick = progress.callback(0, "")
        result = measure(_inputs(subjects, loaded, measured, train, test), settings, callback=tick,
                         count=len(subjects))
    for t in render(result):
        console.print(t)
    for note in warnings(result):
        console.print(f"warning: {note}")
    if team.is_main:
        write(result, values, common, plot)


def _inputs(subjects, loaded, measured, train, test):
    """Each subject with its examples filled in, one checkpoint at a time (so one model is on the device)."""
    for subject, ckpt in zip(subjects, loaded):
        x = measured(ckpt)
        subject.model, subject.data = x.model, x.data
        subject.train, subject.test = train(ckpt).data, test(ckpt).data
        yield subject
        measured.release(ckpt)  # measured: back to the CPU


def _hyper(ckpt) -> Optional[dict]:
    """A flatcli run's hyper-parameters (its training config), or None for a foreign checkpoint."""
    meta = ckpt.raw.meta
    return dict(meta["hyper"], algo=meta["algo"]) if meta else None


def settings_dict(settings, loaded, common, dev, dist, examples) -> dict:
    s = settings.to_dict()
    return pipeline.settings_dict("compare", loaded, common, dev, dist, **s,
                                  examples=examples[0] if len(set(examples)) == 1 else examples)


def columns(result) -> list[str]:
    return ["checkpoint", "train_error", "test_error", "gap", *result.columns, *result.hypers]


def render(result) -> list:
    head = ["checkpoint", "train_error", "test_error", "gap", *result.columns]
    rows = [[r["checkpoint"], *[fmt(r[c]) for c in head[1:4]], *[fmt(r[c]) for c in result.columns]]
            for r in result.rows]
    t1 = table("flatness measures and generalization", [h.replace("_", " ") for h in head], rows,
               caption="errors are fractions; every measure: higher = sharper, except local entropy (higher = flatter)")
    crows = [[c["measure"].replace("_", " "), c["against"].replace("_", " "),
              f"{fmt(c['kendall_tau'])} (p {fmt(c['kendall_p'], 2)})",
              f"{fmt(c['spearman_rho'])} (p {fmt(c['spearman_p'], 2)})", str(c["n"]), fmt(c["psi"])]
             for c in result.correlations]
    used = sorted({k for c in result.correlations for k in c["psi_per_hyper"]})
    if used:
        about = f"Ψ: mean over {', '.join(used)} of τ within groups where only that hyper-parameter varies"
    elif result.hypers:
        about = (f"Ψ: {', '.join(result.hypers)} vary, but no two checkpoints differ in one of them alone")
    else:
        about = "Ψ: no hyper-parameters vary among the checkpoints (or they are not flatcli runs)"
    t2 = table("rank agreement with generalization", ["measure", "against", "Kendall τ", "Spearman ρ", "n", "Ψ"],
               crows, caption=about)
    return [t1, t2]


def warnings(result) -> list[str]:
    """Headline values that are only bounds."""
    top = [d["checkpoint"] for d in result.details if d["measures"].get("pac-bayes", [{}])[0].get("at_max")]
    return [f"pac-bayes: the error never rose by the target below the largest σ tried, so 1/σ*² is only an upper "
            f"bound: {', '.join(top)}"] if top else []


def write(result, values: dict, common, plot: Optional[Path]) -> None:
    cols = columns(result)
    write_output(common.csv_out, pipeline.csv_text(result.rows, cols))
    write_output(common.json_out, to_json({"settings": values, "rows": [{c: r[c] for c in cols} for r in result.rows],
                                           "correlations": result.correlations, "hypers": result.hypers,
                                           "per_checkpoint": result.details}))
    if plot is not None:
        scatter_grid(result, plot)


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise FlatcliError("--plot needs matplotlib, which is not installed",
                           "pip install matplotlib, or drop --plot") from None
    matplotlib.use("Agg")
    return matplotlib


def scatter_grid(result, path: Path) -> None:
    """One panel per measure: the measure (x) against the test error (y), Kendall τ in the title."""
    import math
    _matplotlib()
    import matplotlib.pyplot as plt
    k = len(result.columns)
    cols = min(k, 3)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    taus = {c["measure"]: c["kendall_tau"] for c in result.correlations if c["against"] == "test_error"}
    for ax, col in zip(axes.flat, result.columns):
        ax.scatter([r[col] for r in result.rows], [r["test_error"] for r in result.rows])
        ax.set_title(f"{col.replace('_', ' ')}  τ = {taus[col]:.2f}")
        ax.set_xlabel(col.replace("_", " "))
        ax.set_ylabel("test error")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp" + Path(path).suffix)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
