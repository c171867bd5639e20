"""The progress display of a sweep: one bar of epochs per variant and seed, on stderr."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from collections.abc import Sequence


def is_terminal() -> bool:
    """Whether stderr is a terminal (the default for showing progress)."""
    return sys.stderr.isatty()


def show_progress(progress: bool | None) -> bool:
    """`progress`, or by default whether stderr is a terminal."""
    if progress is None:
        return is_terminal()
    return bool(progress)


class Display:
    """A rich progress bar per run (variant and seed), or nothing.

    Args:
        enabled: Show anything at all.
        runs: (label, seed) per run, in training order.
        epochs: Epochs per run.
    """

    def __init__(self, enabled: bool, runs: Sequence[tuple[str, int]], epochs: int):
        self.enabled = enabled
        self.epochs = epochs
        self.tasks = {}
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn
        from rich.progress import MofNCompleteColumn
        from rich.progress import Progress
        from rich.progress import TextColumn
        from rich.progress import TimeElapsedColumn

        width = max(len(label) for label, _ in runs)
        seeds = len({seed for _, seed in runs}) > 1
        self.progress = Progress(
            TextColumn(f"{{task.fields[name]:<{width}}}"),
            TextColumn("seed {task.fields[seed]}" if seeds else ""),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs  {task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        for label, seed in runs:
            self.tasks[label, seed] = self.progress.add_task(
                "", total=epochs, name=label, seed=seed, info="waiting"
            )

    def __enter__(self) -> Display:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def epoch(self, run: tuple[str, int], epoch: int, values: Mapping[str, float]) -> None:
        if self.enabled:
            info = f"acc {values['accuracy']:.3f}  val acc {values['val_accuracy']:.3f}"
            self.progress.update(self.tasks[run], completed=epoch, info=info)

    def resumed(self, run: tuple[str, int], best_val_accuracy: float) -> None:
        if self.enabled:
            info = f"done earlier: best val acc {best_val_accuracy:.3f}"
            self.progress.update(self.tasks[run], completed=self.epochs, info=info)
