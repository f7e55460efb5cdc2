"""The progress bar of replay, rebuild and the demo: the rate it ends on."""

from __future__ import annotations

import io

from rich.console import Console

from usage_metrics.progress import progress_bar


def final_render(reports: list[tuple[float, int, int]]) -> str:
    """The bar as it is left on screen, after ``(time, done, total)`` reports on a clock of the
    test's own (seconds from the bar's start)."""
    clock = [0.0]
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    with progress_bar("consuming", console=console, get_time=lambda: clock[0]) as report:
        for at, done, total in reports:
            clock[0] = at
            report(done, total)
    return out.getvalue()


def test_a_bar_that_reaches_its_total_in_one_jump_ends_on_its_average_rate() -> None:
    """The demo's consumer catches up between two looks: the bar went from 0 to the total in
    one report and ended on "0 msg/s"."""
    text = final_render([(0.5, 0, 3000), (1.5, 0, 3000), (3.0, 3000, 3000)])
    assert "3000/3000" in text, text
    assert "1,000 msg/s" in text, text


def test_a_bar_that_moved_all_along_ends_on_its_average_rate() -> None:
    text = final_render([(1.0, 1000, 4000), (2.0, 2000, 4000), (5.0, 4000, 4000)])
    assert "800 msg/s" in text, text
