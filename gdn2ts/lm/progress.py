"""A rich progress bar for LM training: steps done of the total, elapsed and remaining time, and the latest loss,
tokens/s and validation perplexity."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["TrainProgress"]


class TrainProgress:
    """Progress of ``total`` optimizer steps; silent when ``disable`` (quiet runs, processes other than rank 0).

    Example:
        >>> bar = TrainProgress(10, disable=True)
        >>> bar.start(0); bar.note(loss=2.5, tokens_per_s=1000.0); bar.advance(1); bar.stop()
        >>> bar.text()
        'loss 2.500  1,000 tok/s'
    """

    def __init__(self, total: int, disable: bool = False):
        self.total = total
        self.values: dict[str, float] = {}
        self.progress = None if disable else Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"))
        self.task = None

    def text(self) -> str:
        """The figures shown beside the bar."""
        v = self.values
        parts = []
        if "loss" in v:
            parts.append(f"loss {v['loss']:.3f}")
        if "tokens_per_s" in v:
            parts.append(f"{v['tokens_per_s']:,.0f} tok/s")
        if "val_ppl" in v:
            parts.append(f"val ppl {v['val_ppl']:.2f}")
        return "  ".join(parts)

    def start(self, step: int) -> None:
        """Show the bar at ``step`` (a resumed run starts part way)."""
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=step, info="")

    def note(self, **values: float) -> None:
        """Update the figures (``loss``, ``tokens_per_s``, ``val_ppl``)."""
        self.values.update(values)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, info=self.text())

    def advance(self, step: int) -> None:
        """``step`` optimizer steps are done."""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=step)

    def stop(self) -> None:
        """Leave the final bar on screen."""
        if self.progress is not None:
            self.progress.stop()
