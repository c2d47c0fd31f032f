"""The one progress helper of the ``camkit`` commands: every bar is a transient :class:`rich.progress.Progress` on
stderr built by :func:`progress_bar`, whose text columns never read markup (a file name, label or message holding
``[bold]`` or ``[/x]`` is shown as it is).

* :func:`progress_bar`: the bar itself, from column specs (a string is a plain-text column).
* :class:`RunProgress` / :func:`run_progress`: ``explain`` and ``localize``: one bar over the images, moved within
  an image by the perturbation methods' forward passes.
* :func:`step_progress`: ``evaluate``: ``f(done, total, description)``.
* :func:`images_progress`: ``run``: ``start(to_do, total) -> advance(n)``, images/s and the time left.

A bar is shown when ``enabled`` is True, or, with ``enabled`` None, when stderr is a terminal (:func:`shown`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from camkit.cli.console import err_console

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn

__all__ = [
    "RunProgress",
    "images_progress",
    "progress_bar",
    "run_progress",
    "shown",
    "step_progress",
]


def shown(enabled: bool | None) -> bool:
    """``--progress/--no-progress``: as given, or (None) only when stderr is a terminal."""
    return err_console.is_terminal if enabled is None else enabled


@contextmanager
def progress_bar(*columns: str | ProgressColumn, enabled: bool = True) -> Iterator[Progress]:
    """A transient progress bar on stderr (disabled: nothing is drawn). A string column is a text column (a
    :class:`rich.progress.TextColumn` template such as ``"{task.description}"``) that reads no markup; the names
    ``"bar"``, ``"m/n"``, ``"%"``, ``"elapsed"`` and ``"remaining"`` stand for rich's own columns."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    named: dict[str, Callable[[], ProgressColumn]] = {
        "bar": BarColumn,
        "m/n": MofNCompleteColumn,
        "%": TaskProgressColumn,
        "elapsed": TimeElapsedColumn,
        "remaining": TimeRemainingColumn,
    }
    built = [
        c if not isinstance(c, str) else named[c]() if c in named else TextColumn(c, markup=False)
        for c in columns
    ]
    with Progress(*built, console=err_console, transient=True, disable=not enabled) as bar:
        yield bar


class RunProgress:
    """One progress bar for a whole command, with one fixed total: the number of images.

    Within an image the bar advances with the perturbation methods' forward passes: the engine reports
    ``(done, total)`` where ``total`` grows as each (method, layer) starts; each of the ``steps`` expected per
    image gets an equal share of the image, so the bar moves smoothly, never goes back and never restarts. The
    forward passes done so far in the whole command are counted beside it.
    """

    def __init__(self, bar: Any, n_images: int, steps: int = 0) -> None:
        self._bar = bar
        self._steps = steps  # forward-counting steps per image (perturbation methods x layers); 0: none
        self._task = bar.add_task("images", total=n_images, forwards="") if bar is not None else None
        self._images = 0
        self._fraction = 0.0  # of the current image
        self._forwards = 0  # forward passes of the images already done
        self._step = self._start = self._end = self._done = 0  # the current image's engine counts

    @property
    def completed(self) -> float:
        """Images done, with the current image's fraction."""
        return self._images + self._fraction

    def image_done(self, name: str) -> None:
        """One more image finished (``name`` shown beside the bar)."""
        self._images += 1
        self._fraction = 0.0
        self._forwards += self._done
        self._step = self._start = self._end = self._done = 0
        if self._bar is not None:
            self._bar.update(self._task, completed=self._images, description=f"images ({name})")

    def stage(self, text: str) -> None:
        """What the current image's work is at (shown beside the bar until the next stage or image)."""
        if self._bar is not None:
            self._bar.update(self._task, description=f"images ({text})")

    def forwards(self) -> Callable[[int, int], None] | None:
        """The ``f(done, total)`` callback of the current image's perturbation methods (None when not shown)."""
        if self._bar is None or self._steps == 0:
            return None
        return self._report

    def _report(self, done: int, total: int) -> None:
        if total > self._end:  # a new (method, layer) step starts where the last one ended
            self._step += 1
            self._start, self._end = self._end, total
        span = max(self._end - self._start, 1)
        share = (self._step - 1 + min(max(done - self._start, 0) / span, 1.0)) / self._steps
        self._fraction = max(self._fraction, min(share, 0.999))  # never back; 1 only when the image is done
        self._done = done
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.completed, forwards=f"{self._forwards + done} forwards"
            )


@contextmanager
def run_progress(n_images: int, steps: int = 0, enabled: bool | None = None) -> Iterator[RunProgress]:
    """A :class:`RunProgress` on stderr (``steps``: perturbation methods x layers per image, 0 when none)."""
    if not shown(enabled):
        yield RunProgress(None, n_images, steps)
        return
    columns = ("{task.description}", "bar", "m/n", "{task.fields[forwards]}", "elapsed", "remaining")
    with progress_bar(*columns) as bar:
        yield RunProgress(bar, n_images, steps)


@contextmanager
def step_progress(
    enabled: bool | None, unit: str = "image x method"
) -> Iterator[Callable[[float, int, str], None]]:
    """A bar fed by ``f(done, total, description)`` (the total set by the first call), ``unit`` beside it."""
    with progress_bar("{task.description}", "bar", "m/n", unit, "elapsed", enabled=shown(enabled)) as bar:
        task = bar.add_task("evaluating", total=None)

        def report(done: float, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        yield report


@contextmanager
def images_progress(enabled: bool | None) -> Iterator[Callable[[int, int], Callable[[int], None]]]:
    """A bar over the images of a dataset: ``start(to_do, total)`` opens it (a resumed run says how many images
    were already done) and returns ``advance(n)``; images/s and the time left beside it."""
    columns = ("explaining", "bar", "m/n", "%", "{task.fields[rate]}", "elapsed", "ETA", "remaining")
    with progress_bar(*columns, enabled=shown(enabled)) as bar:

        def start(to_do: int, total: int) -> Callable[[int], None]:
            task = bar.add_task("images", total=to_do, rate="")
            if to_do < total:
                err_console.print(
                    f"resuming: {total - to_do} of {total} images already in the store", highlight=False
                )

            def advance(n: int) -> None:
                bar.advance(task, n)
                speed = bar.tasks[task].speed
                bar.update(task, rate=f"{speed:.1f} images/s" if speed else "")

            return advance

        yield start
