"""A rich progress bar with rate and ETA, for replay, rebuild and the demo."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@contextmanager
def progress_bar(
    label: str,
    stderr: bool = False,
    *,
    console: Console | None = None,
    get_time: Callable[[], float] | None = None,
) -> Iterator[Callable[[int, int], None]]:
    """Yields the callback (done, total) that the work reports to. ``console`` and ``get_time``
    (a monotonic clock) replace rich's own, for tests."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Messages per second: rich's estimate over recent reports while the work moves, and
        once it is done the average over the whole bar. rich's estimate needs two reports
        that moved the count within its window, so a bar that ends in one jump (the demo's
        consumer catches up between two looks) or stops moving showed "0 msg/s"."""

        def render(self, task: Task) -> Text:
            if task.finished_time:
                return Text(f"{task.completed / task.finished_time:,.0f} msg/s")
            return Text(f"{task.speed or 0:,.0f} msg/s")

    if console is None and stderr:
        console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        get_time=get_time,
    ) as bar:
        task = bar.add_task("replay", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report
