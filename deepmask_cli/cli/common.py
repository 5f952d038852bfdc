"""What every command shares: the consoles, safe printing of outside text,
one-line errors and warnings, the progress bar and option types."""

from __future__ import annotations

import math
import sys
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from deepmask_cli.core.outputs import printable

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def esc(text: object) -> str:
    """Text from outside (file names, messages that quote them) made safe to
    print: control characters shown as escapes, rich's markup escaped."""
    return escape(printable(str(text)))


class Prob(click.FloatRange):
    """A finite number within a range (click's FloatRange lets nan and inf through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as one ``error:`` line and exit with ``code``."""
    err.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True)
    sys.exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors (not Python's file:line and source)."""
    err.print(f"[bold yellow]warning:[/] {esc(str(message))}", soft_wrap=True)


def parse_scales(text: str | None) -> dict:
    """``--scales MIN,MAX,STEP`` as the config's ``scale_*`` fields (none when not given)."""
    if text is None:
        return {}
    try:
        lo, hi, step = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter("give three numbers in octaves: MIN,MAX,STEP (e.g. -2.5,0.5,0.5)") from None
    return {"scale_min": lo, "scale_max": hi, "scale_step": step}


class RateColumn(ProgressColumn):
    """Images per second, once a second of work has measured it."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} img/s" if task.speed and (task.elapsed or 0) >= 1 else "")


class _StatsBelow(Progress):
    """A progress display whose tasks' ``stats`` field, when set, is a line of
    its own under the bar: a training run's losses do not fit in 80 columns
    beside it, and a column that does not fit is cut (``16…``)."""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.visible and task.fields.get("stats"):
                yield Text(str(task.fields["stats"]), overflow="fold")


def progress_bar(quiet: bool, info_column: ProgressColumn | None = None, console: Console | None = None) -> Progress:
    """The bar the long commands show on ``console`` (stderr): label, bar,
    done/total, ``info_column`` (short: a rate), times; a task's ``stats``
    field goes on the line below."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               *([info_column] if info_column is not None else []), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    return _StatsBelow(*columns, console=console or err, disable=quiet)
