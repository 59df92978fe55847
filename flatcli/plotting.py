"""Figures from flatcli's CSVs: read one (a file or a stream), recognise its measurement by its header, draw it.

    from flatcli import plotting
    table = plotting.read_csv("energy.csv")            # or a file object, e.g. sys.stdin
    fig = plotting.draw(table, labels={"runs/sgd": "SGD"}, group_by=r"-seed\\d+$")
    plotting.save(fig, "curves.png")                    # .png, .pdf or .svg; written atomically

Reading and grouping (``read_csv``, ``curves``) are plain Python; ``draw`` needs matplotlib (the ``plot``
extra) and uses no pyplot, so it changes no global state and needs no display.

A curve is one checkpoint plus whatever describes its measurement and varies in the file (``seed=1`` when
CSVs of several seeds were concatenated); what is the same for every row goes to the caption instead.
``group_by`` averages curves into one: a column (``checkpoint``, ``seed``, ``noise`` or any column you add)
keeps one curve per value of that column, anything else is a regular expression removed from the curve
names (``-seed\\d+$`` makes ``sgd-seed0`` and ``sgd-seed1`` one ``sgd``). A group is drawn as the mean over
its runs with a band of ± one standard deviation (ddof 1) across them; a single run keeps its own error bars.
"""
import csv
import io
import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from flatcli.errors import FlatcliError
from flatcli.io import atomic_path, check_writable_dir

CATEGORICAL = ""  # Panel.x for one point per curve (a value per checkpoint, not a curve over x)
FORMATS = ("png", "pdf", "svg")
INSTALL = "pip install 'flatcli[plot]'"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", "*", ">")  # 10 shapes × 4 dashes: 20 distinct pairs
DASHES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class Panel:
    """One axes: ``y`` (± ``err``) against ``x``, optionally only the rows where column ``where[0]`` is ``where[1]``."""
    y: str
    ylabel: str
    err: Optional[str] = None
    x: Optional[str] = None  # None: the kind's x; CATEGORICAL: one point per curve
    xlabel: Optional[str] = None
    where: Optional[tuple[str, str]] = None
    title: str = ""
    logx: bool = False  # the default of --logx for this panel
    integer_x: bool = False  # x is a rank: integer ticks


@dataclass(frozen=True)
class Kind:
    """A flatcli measurement CSV: the columns that identify it and how to draw it."""
    name: str
    signature: frozenset  # columns only this kind has all of
    x: str
    xlabel: str
    panels: tuple
    title: str
    error_bars: str  # what the ± of one measurement is
    describe: tuple = ()  # settings columns: in a curve's name when they vary, else in the caption
    split_by: Optional[str] = None  # one copy of each panel per value of this column (sharpness's kind)
    flag: Optional[Callable[[dict], bool]] = None  # rows to mark with a red ×, and what the mark means
    flag_text: str = ""
    extra_caption: Optional[Callable[[list], str]] = None


def _number(row: dict, column: str) -> float:
    text = (row.get(column) or "").strip()
    return float(text) if text else math.nan


def _draws(rows: list) -> str:
    samples = {int(_number(r, "samples")) for r in rows if _number(r, "samples") > 0}
    return f"{'/'.join(map(str, sorted(samples)))} draws per σ" if samples else ""


KINDS = (
    Kind("local-energy", frozenset({"sigma", "delta_error", "error_sem", "delta_loss", "loss_sem"}), "sigma",
         "σ (noise level)",
         (Panel("delta_error", "δε: rise of the error (a fraction)", "error_sem"),
          Panel("delta_loss", "δL: rise of the loss", "loss_sem")),
         "local energy: higher is sharper", "± 1 standard error over the noise draws",
         ("noise", "bn", "split", "examples", "loss_function", "seed"), extra_caption=_draws),
    Kind("bp-local-entropy", frozenset({"coupling", "overlap", "distance", "local_entropy", "converged"}),
         "distance", "distance (1 − overlap)/2",
         (Panel("local_entropy", "local entropy per weight"),),
         "local entropy by belief propagation (closer to 0 is flatter)", "none (BP is deterministic)",
         ("split", "examples", "seed"), flag=lambda r: r.get("converged", "").strip().lower() in ("false", "0"),
         flag_text="×: BP did not converge"),
    Kind("local-entropy", frozenset({"gamma", "local_entropy", "local_entropy_sem"}), "gamma", "γ (coupling)",
         (Panel("local_entropy", "s(γ): local entropy per parameter", "local_entropy_sem", logx=True),
          Panel("distance", "⟨|w′ − w|²⟩/N: distance per parameter", logx=True)),
         "local entropy: 0 is flat, closer to 0 is flatter", "± 1 standard error over the chains",
         ("sampler", "chains", "steps", "burn_in", "beta", "split", "examples", "loss_function", "seed"),
         flag=lambda r: _number(r, "loss_mean") < _number(r, "checkpoint_loss"),
         flag_text="×: ⟨L(w′)⟩ < L(w), not at a minimum"),
    Kind("hessian", frozenset({"quantity", "index", "value", "sem"}), "index", "index",
         (Panel("value", "eigenvalue", "sem", where=("quantity", "eigenvalue"), xlabel="rank (1 = largest)",
                title="top eigenvalues", integer_x=True),
          Panel("value", "eigenvalue", "sem", where=("quantity", "bottom_eigenvalue"),
                xlabel="rank (1 = most negative)", title="bottom eigenvalues", integer_x=True),
          Panel("value", "trace", "sem", x=CATEGORICAL, where=("quantity", "trace"), title="trace"),
          Panel("value", "spectral density", x="at", xlabel="eigenvalue", where=("quantity", "density"),
                title="density", logx=True)),
         "Hessian of the loss", "± 1 standard error (trace: over the probes)",
         ("probes", "split", "examples", "loss_function", "seed")),
    Kind("sharpness", frozenset({"kind", "norm", "adaptive", "rho", "m", "sharpness", "sem"}), "rho", "ρ (radius)",
         (Panel("sharpness", "sharpness: rise of the loss", "sem"),),
         "sharpness: higher is sharper", "± 1 standard error",
         ("norm", "adaptive", "m", "split", "examples", "loss_function", "seed"), split_by="kind"),
    Kind("pac-bayes", frozenset({"noise", "target", "sigma", "flatness"}), "", "",
         (Panel("sigma", "σ*: largest σ within the target", x=CATEGORICAL),
          Panel("flatness", "flatness 1/σ*²: higher is sharper", x=CATEGORICAL)),
         "PAC-Bayes flatness", "none (σ* comes from a bisection)",
         ("noise", "target", "samples", "split", "examples", "seed")),
)
NAMES = ", ".join(k.name for k in KINDS)


@dataclass
class MeasurementCsv:
    """A flatcli CSV as read: its kind, its columns and its rows (values still text)."""
    kind: Kind
    columns: list
    rows: list
    source: str = "CSV"


@dataclass
class Curve:
    """One line of one panel: y (± err) at x, in increasing x; ``runs`` > 1: a mean with err = std across runs."""
    label: str
    panel: Panel
    x: list
    y: list
    err: list
    runs: int = 1
    grouped: bool = False  # drawn as a mean ± std band (with group_by), not with its own error bars
    flagged: list = field(default_factory=list)  # the x of the points to mark


# -- reading --------------------------------------------------------------------------------------------

def read_csv(source, name: Optional[str] = None) -> MeasurementCsv:
    """Read a flatcli CSV from a path or an open text stream; a FlatcliError for anything else.

    Several CSVs of one kind concatenated (``cat a.csv b.csv``) read as one: repeated header lines are skipped.
    """
    name = name or ("stdin" if source in ("-", None) else str(source))
    text = _text_of(source, name)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise FlatcliError(f"CSV {name!r} is empty", "give it the output of a flatcli measurement's --csv")
    header = next(csv.reader([lines[0]]))
    kind = detect_kind(header, name)
    rows = [row for row in csv.DictReader(io.StringIO("\n".join(lines))) if list(row.values()) != header]
    if not rows:
        raise FlatcliError(f"CSV {name!r} has a {kind.name} header but no rows", "measure at least one checkpoint")
    return MeasurementCsv(kind, header, rows, name)


def _text_of(source, name: str) -> str:
    if hasattr(source, "read"):
        if getattr(source, "isatty", lambda: False)():
            raise FlatcliError("nothing is piped into stdin", "pipe a CSV in (… --csv - | flatcli plot - -o OUT) "
                               "or name the file")
        return source.read()
    try:
        return Path(source).read_text()
    except FileNotFoundError:
        raise FlatcliError(f"CSV {name!r} does not exist", "check the path") from None
    except IsADirectoryError:
        raise FlatcliError(f"CSV {name!r} is a folder", "name the CSV file written by --csv") from None
    except UnicodeDecodeError:
        raise FlatcliError(f"{name!r} is not a text CSV", "give it the output of a flatcli measurement's --csv") \
            from None
    except OSError as e:
        raise FlatcliError(f"cannot read CSV {name!r} ({e.strerror})", "check the path and its permissions") from None


def detect_kind(header: list, name: str = "CSV") -> Kind:
    """The measurement whose columns the header has (the first column is always ``checkpoint``)."""
    columns = set(header)
    for kind in KINDS:
        if header[:1] == ["checkpoint"] and kind.signature <= columns:
            return kind
    shown = ",".join(header)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise FlatcliError(f"CSV {name!r} is not one flatcli can plot (header: {shown})",
                       f"give it the --csv output of a flatcli measurement ({NAMES})")


# -- curves ---------------------------------------------------------------------------------------------

def curves(table: MeasurementCsv, labels: Optional[dict] = None, group_by: Optional[str] = None) -> list:
    """The curves to draw, panel by panel, in the order the checkpoints first appear in the CSV."""
    kind, rows = table.kind, table.rows
    varying = [c for c in kind.describe if c in table.columns and len({r[c] for r in rows}) > 1]
    run_of = {id(r): _run_name(r, varying) for r in rows}
    group_of = _grouping(table, run_of, group_by)
    names = _display_names(list(dict.fromkeys(group_of[id(r)] for r in rows)), labels or {})
    out = []
    for panel in panels_of(table):
        chosen = [r for r in rows if panel.where is None or r.get(panel.where[0]) == panel.where[1]]
        for group in dict.fromkeys(group_of[id(r)] for r in chosen):
            members = [r for r in chosen if group_of[id(r)] == group]
            out.append(_curve(table, panel, names[group], members, run_of, grouped=group_by is not None))
    return out


def panels_of(table: MeasurementCsv) -> list:
    """The kind's panels that have rows; a kind with ``split_by`` gets a copy of each per value of that column."""
    kind, out = table.kind, []
    for panel in kind.panels:
        if kind.split_by:
            values = dict.fromkeys(r[kind.split_by] for r in table.rows)
            out += [Panel(**{**vars(panel), "where": (kind.split_by, v), "title": f"{kind.split_by} {v}"})
                    for v in values]
        elif panel.where is None or any(r.get(panel.where[0]) == panel.where[1] for r in table.rows):
            out.append(panel)
    return out


def _run_name(row: dict, varying: list) -> str:
    extra = " · ".join(f"{c}={row[c]}" for c in varying)
    return f"{row['checkpoint']} · {extra}" if extra else row["checkpoint"]


def _grouping(table: MeasurementCsv, run_of: dict, group_by: Optional[str]) -> dict:
    """{row id: the name of the curve it belongs to}."""
    if group_by is None:
        return dict(run_of)
    if group_by in table.columns:
        measured = {p.y for p in table.kind.panels} | {p.err for p in table.kind.panels} | \
                   {p.x or table.kind.x for p in table.kind.panels}
        if group_by in measured:
            raise FlatcliError(f"group_by={group_by!r} is a measured column, not a label of runs",
                               f"group by checkpoint, a settings column or a regex of the checkpoint names")
        return {id(r): r[group_by] if group_by == "checkpoint" else f"{group_by}={r[group_by]}" for r in table.rows}
    try:
        pattern = re.compile(group_by)
    except re.error as e:
        raise FlatcliError(f"group_by={group_by!r} is neither a column of the CSV nor a valid regex ({e})",
                           f"name a column ({', '.join(table.columns[:6])}, ...) or fix the regex") from None
    grouped = {key: pattern.sub("", name) for key, name in run_of.items()}
    if grouped == run_of:
        runs = ", ".join(dict.fromkeys(run_of.values()))
        raise FlatcliError(f"group_by={group_by!r} matches no curve name ({_clip(runs)})",
                           "give a regex that matches the part to average over, e.g. '-seed[0-9]+$'")
    return grouped


def _clip(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _display_names(keys: list, labels: dict) -> dict:
    """{curve key: legend name}: the checkpoints' common leading folders dropped, then ``labels`` applied.

    ``labels`` maps either the name shown or the full name in the CSV to the new name.
    """
    parts = [k.split("/") for k in keys]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    names = {k: "/".join(p[common:]) for k, p in zip(keys, parts)}
    known = set(names) | set(names.values())
    unknown = [old for old in labels if old not in known]
    if unknown:
        raise FlatcliError(f"labels={unknown[0]!r} names no curve (curves: {_clip(', '.join(names.values()))})",
                           "use a name from the legend or from the CSV's checkpoint column")
    renamed = {k: labels.get(k, labels.get(shown, shown)) for k, shown in names.items()}
    twice = [n for n in dict.fromkeys(renamed.values()) if list(renamed.values()).count(n) > 1]
    if twice:
        raise FlatcliError(f"two curves would both be named {twice[0]!r}",
                           "give each its own name; to average curves into one, use group_by=COLUMN|REGEX")
    return renamed


def _curve(table: MeasurementCsv, panel: Panel, name: str, rows: list, run_of: dict, grouped: bool) -> Curve:
    xcol = table.kind.x if panel.x is None else panel.x
    by_x: dict = {}
    for r in rows:
        x = 0.0 if xcol == CATEGORICAL else _parse(table, r, xcol)
        by_x.setdefault(x, []).append(r)
    xs, ys, errs, flagged = sorted(by_x), [], [], []
    runs = len({run_of[id(r)] for r in rows})
    for x in xs:
        here = by_x[x]
        _check_one_row_per_run(table, here, run_of, xcol, x, name)
        values = [_parse(table, r, panel.y) for r in here]
        ys.append(statistics.fmean(values))
        errs.append(_spread(table, panel, here, values, grouped))
        if table.kind.flag and any(table.kind.flag(r) for r in here):
            flagged.append(x)
    return Curve(name, panel, xs, ys, errs, runs if grouped else 1, grouped, flagged)


def _spread(table: MeasurementCsv, panel: Panel, rows: list, values: list, grouped: bool) -> float:
    if grouped:
        return statistics.stdev(values) if len(values) > 1 else math.nan
    return _parse(table, rows[0], panel.err) if panel.err else math.nan


def _check_one_row_per_run(table, rows, run_of, xcol, x, name) -> None:
    runs = [run_of[id(r)] for r in rows]
    if len(set(runs)) < len(runs):
        where = f"{xcol}={x:g}" if xcol != CATEGORICAL else "once"
        raise FlatcliError(f"CSV {table.source!r} has two rows for {name!r} at {where} with the same settings",
                           "remove the repeated rows, or average them with group_by='checkpoint'")


def _parse(table: MeasurementCsv, row: dict, column: str) -> float:
    try:
        return _number(row, column)
    except ValueError:
        raise FlatcliError(f"CSV {table.source!r}: column {column} holds {row.get(column)!r}, not a number",
                           "give it a CSV written by flatcli's --csv, unedited") from None


# -- drawing --------------------------------------------------------------------------------------------

def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise FlatcliError("drawing needs matplotlib, which is not installed", INSTALL) from None
    return Figure


def draw(table: MeasurementCsv, labels: Optional[dict] = None, group_by: Optional[str] = None,
         logx: Optional[bool] = None, logy: bool = False):
    """A matplotlib Figure of the CSV: a panel per quantity, a line per curve, the settings in a caption.

    ``logx`` None: each panel's default (log for local entropy's γ ladder); a log axis becomes symmetric-log
    where the values include 0 or negatives (σ = 0, δε < 0, s < 0).
    """
    Figure = require_matplotlib()
    drawn = curves(table, labels, group_by)
    panels = panels_of(table)
    fig = Figure(figsize=(_width(len(panels)), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    style = {name: i for i, name in enumerate(dict.fromkeys(c.label for c in drawn))}
    for ax, panel in zip(axes, panels):
        mine = [c for c in drawn if c.panel == panel]
        for c in mine:
            _draw_curve(ax, c, style[c.label], [d.label for d in mine])
        _decorate(ax, table.kind, panel, mine, logx, logy)
    axes[0].legend(fontsize="small")
    fig.suptitle(table.kind.title)
    fig.supxlabel(caption(table, drawn, group_by), x=0.01, ha="left", fontsize="small")
    return fig


def _draw_curve(ax, c: Curve, i: int, order: list) -> None:
    """Hollow markers of distinct shapes and distinct dashes, so curves that coincide all stay visible."""
    label = f"{c.label} (n={c.runs})" if c.grouped else c.label
    xs = [order.index(c.label)] * len(c.y) if c.panel.x == CATEGORICAL else c.x
    err = [0.0 if math.isnan(e) else e for e in c.err]
    look = dict(marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)], color=f"C{i % 10}",
                markerfacecolor="none", markersize=7 - i % 3, linewidth=1.4)
    if c.grouped:
        ax.plot(xs, c.y, label=label, **look)
        ax.fill_between(xs, [y - e for y, e in zip(c.y, err)], [y + e for y, e in zip(c.y, err)],
                        color=look["color"], alpha=0.18, linewidth=0)
    else:
        ax.errorbar(xs, c.y, yerr=err if any(err) else None, capsize=3, label=label, **look)
    if c.flagged:
        at = [xs[c.x.index(x)] for x in c.flagged]
        ax.plot(at, [c.y[c.x.index(x)] for x in c.flagged], linestyle="none", marker="x", color="red",
                markersize=9, zorder=5)


def _decorate(ax, kind: Kind, panel: Panel, mine: list, logx: Optional[bool], logy: bool) -> None:
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize="medium")
    if panel.x == CATEGORICAL:
        ax.set_xticks(range(len(mine)), [c.label for c in mine], rotation=20, ha="right", fontsize="small")
        ax.set_xlim(-0.6, len(mine) - 0.4)
    else:
        ax.set_xlabel(panel.xlabel or kind.xlabel)
        if panel.integer_x:
            from matplotlib.ticker import MaxNLocator
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.logx if logx is None else logx:
            _log_scale(ax.set_xscale, [x for c in mine for x in c.x])
    if logy:
        _log_scale(ax.set_yscale, [y for c in mine for y in c.y])
    ys = [y for c in mine for y in c.y if not math.isnan(y)]
    if ys and min(ys) < 0 < max(ys) or any(y == 0 for y in ys):
        ax.axhline(0, color="grey", linewidth=0.6, zorder=0)
    ax.grid(True, alpha=0.25)


def _log_scale(set_scale, values: list) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        set_scale("log")
    else:  # symmetric log: linear within the smallest nonzero magnitude, so 0 and negatives stay on the axis
        nonzero = [abs(v) for v in finite if v != 0]
        set_scale("symlog", linthresh=min(nonzero) if nonzero else 1.0)


def caption(table: MeasurementCsv, drawn: list, group_by: Optional[str]) -> str:
    """What the error bars are and the settings every row shares, wrapped to the figure's width."""
    kind, rows = table.kind, table.rows
    if group_by is None:
        bars = f"error bars: {kind.error_bars}"
    else:
        bars = "lines: mean over the runs of each group (n in the legend), bands: ± 1 std across them"
    shared = [f"{c} {rows[0][c]}" for c in kind.describe if c in table.columns and len({r[c] for r in rows}) == 1]
    extra = [kind.extra_caption(rows)] if kind.extra_caption else []
    flags = [kind.flag_text] if any(c.flagged for c in drawn) else []
    text = " · ".join([bars, *[e for e in extra if e], *shared, *flags])
    return "\n".join(textwrap.wrap(text, width=int(15 * _width(len(panels_of(table)))), break_long_words=False))


def _width(panels: int) -> float:
    """The figure's width in inches; the caption, in small type, fits about 15 characters an inch."""
    return 4.8 * panels + 0.6


# -- writing --------------------------------------------------------------------------------------------

def check_output(out) -> str:
    """The format of ``out`` from its suffix (png, pdf or svg), its folder writable; checked before any work."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise FlatcliError(f"out={str(out)!r} has {'the suffix .' + suffix if suffix else 'no suffix'}",
                           "name a .png, .pdf or .svg file")
    check_writable_dir(Path(out).parent, what=str(out))
    return suffix


def save(fig, out) -> None:
    """Write the figure to ``out`` atomically: a failure leaves no file (and any previous one untouched).

    No timestamps in the file, so the same CSV gives the same bytes.
    """
    fmt = check_output(out)
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
