"""The one rich console and progress-bar factory every command uses."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
out = Console()


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar with count, elapsed time and ETA; ``extra_columns`` add e.g. loss or tokens/s.

    Extra fields are set with ``progress.update(task, loss=..., tok_s=...)`` and shown with
    ``TextColumn("loss {task.fields[loss]:.3f}")``.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
