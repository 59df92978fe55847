"""Rich rendering on stderr: progress bars and tables. Nothing here computes anything."""
import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flatcli.cli.common import stderr_console


def progress_bar(console=None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console or stderr_console(), redirect_stdout=False, redirect_stderr=False, transient=False)


def fmt(value, digits: int = 4) -> str:
    """A number for a table cell: ``—`` for missing, scientific notation for small magnitudes."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits - 1}e}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def plus_minus(mean: float, sem: float) -> str:
    """``+0.0465 ± 0.0016``: the mean rounded to the second significant digit of its standard error.

    Small magnitudes share one power of ten: ``(-9.3 ± 1.1)e-08``.
    """
    if not math.isfinite(mean):
        return "—" if math.isnan(mean) else f"{mean:+g}"
    if sem == 0 or not math.isfinite(sem):
        return "0" if mean == 0 else (f"{mean:+.3e}" if abs(mean) < 1e-3 else f"{mean:+.4g}")
    top = max(abs(mean), sem)
    if top < 1e-3:
        e = math.floor(math.log10(top))
        m, s = mean / 10 ** e, sem / 10 ** e
        d = min(10, max(0, 1 - math.floor(math.log10(s))))
        return f"({m:+.{d}f} ± {s:.{d}f})e{e:+03d}"
    decimals = min(10, max(0, 1 - math.floor(math.log10(sem))))
    return f"{mean:+.{decimals}f} ± {sem:.{decimals}f}"


def table(title: str, columns: list[str], rows: list[list], justify_first: str = "left",
          caption: str | None = None):
    """A table with plain (not highlighted) cells, its title a line above it and its settings a caption line
    under it. Title and caption are lines of their own, as wide as the terminal, so a narrow table (one
    checkpoint) never wraps them into a column of fragments."""
    from rich.console import Group
    t = Table(header_style="bold", highlight=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify=justify_first if i == 0 else "right")
    for r in rows:
        t.add_row(*[v if isinstance(v, Text) else fmt(v) for v in r])
    parts = [Text(title, style="italic"), t] + ([Text(caption, style="dim")] if caption else [])
    return Group(*parts)
