"""``flatcli plot``: a figure from any flatcli measurement CSV (a file or stdin). Needs the ``plot`` extra.

No torch here, not even when it runs: reading and drawing are ``flatcli.plotting``'s (CSV and matplotlib only).
"""
import sys
from typing import Annotated, Optional

import typer

from flatcli.errors import FlatcliError


def plot(
    source: Annotated[str, typer.Argument(metavar="CSV|-", show_default=False,
                                          help="A CSV written by a flatcli measurement's --csv, or - to read stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", show_default=False,
                                     help="The figure to write; its suffix picks the format: .png, .pdf or .svg.")],
    labels: Annotated[Optional[list[str]], typer.Option(
        "--label", metavar="OLD=NEW", show_default=False,
        help="Rename a curve in the legend: OLD as the legend shows it or as the CSV's checkpoint column has it. Repeatable.")] = None,
    group_by: Annotated[Optional[str], typer.Option(
        "--group-by", metavar="COLUMN|REGEX", show_default=False,
        help="Average runs into one curve (mean ± std band): a CSV column keeps one curve per value of it "
             "(checkpoint: average over seeds of the measurement); anything else is a regex removed from the "
             "curve names ('-seed[0-9]+$' makes sgd-seed0 and sgd-seed1 one curve sgd).")] = None,
    logx: Annotated[Optional[bool], typer.Option(
        "--logx/--no-logx", show_default="log for local entropy's γ, else linear",
        help="Logarithmic x axis (symmetric-log where the values include 0).")] = None,
    logy: Annotated[bool, typer.Option(
        "--logy", help="Logarithmic y axis (symmetric-log where the values include 0 or negatives).")] = False,
):
    """Draw a flatcli CSV: local energy (δε and δL against σ), local entropy (s and the distance against γ),
    Hessian, sharpness, PAC-Bayes and BP local-entropy CSVs, recognised by their columns.

    One curve per checkpoint with its error bars, distinct markers and dashes, the settings in a caption.

    Example: flatcli local-energy runs/sgd runs/esgd --csv - | flatcli plot - -o curves.png
    """
    from flatcli import plotting
    plotting.check_output(out)  # before reading a long pipe
    plotting.require_matplotlib()
    names = parse_labels(labels or [])
    table = plotting.read_csv(sys.stdin if source == "-" else source, name="stdin" if source == "-" else source)
    fig = plotting.draw(table, labels=names, group_by=group_by, logx=logx, logy=logy)
    plotting.save(fig, out)
    n = len(dict.fromkeys(c.label for c in plotting.curves(table, names, group_by)))  # cheap: no drawing
    typer.echo(f"wrote {out}: {table.kind.name}, {n} curve(s)", err=True)


def parse_labels(pairs: list) -> dict:
    """``["runs/sgd=SGD", ...]`` → ``{"runs/sgd": "SGD"}``; the first ``=`` splits (a new name may hold one)."""
    labels = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise FlatcliError(f"labels={pair!r} is not OLD=NEW", "write it as --label runs/sgd=SGD")
        labels[old] = new
    return labels
