"""Progress listeners: a session reports frames received; the CLI draws them as a rich bar."""

from __future__ import annotations

import contextlib

LISTENERS: list = []


def report(progress) -> None:
    for listener in list(LISTENERS):
        listener(progress)


@contextlib.contextmanager
def console_progress(console):
    """Show a progress bar for every session streaming in this process while the block runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("frames"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    task = {}

    def listener(p) -> None:
        if "id" not in task:
            task["id"] = bar.add_task("frames", total=p.frames_expected)
        bar.update(task["id"], completed=p.frames_received, total=p.frames_expected)
        live = getattr(p, "live_image", None)
        if live is not None and task.get("live") != live:
            task["live"] = live
            bar.console.print(f"live image (bright and dark field, redrawn as the scan fills in): {live}")

    LISTENERS.append(listener)
    try:
        with bar:
            yield
    finally:
        LISTENERS.remove(listener)
