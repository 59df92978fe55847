"""Rich rendering on stderr: progress bars and tables. Nothing here computes anything."""
import math

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flatcli.cli.common import stderr_console


def progress_bar(console=None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console or stderr_console(), redirect_stdout=False, redirect_stderr=False, transient=False)


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: list[str], rows: list[list], justify_first: str = "left") -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify=justify_first if i == 0 else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t
