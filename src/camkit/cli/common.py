"""What the ``camkit`` commands share: consoles, options, the ``error:`` exit, progress bars, image loading.

Heavy imports (torch, the library) stay inside the functions so that ``camkit --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "USER_ERRORS",
    "DeviceOption",
    "ImagesArgument",
    "LayersOption",
    "WeightsOption",
    "console",
    "err_console",
    "evaluation_progress",
    "fail",
    "forwards_progress",
    "load_pictures",
    "model_option",
    "new_table",
    "out_option",
    "split",
    "user_errors",
]

console = Console()
err_console = Console(stderr=True)

#: Exceptions that mean "the user asked for something wrong": one ``error:`` line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, TypeError, KeyError)

# Options several commands take with the same flags and help.
ImagesArgument = Annotated[
    list[Path] | None, typer.Argument(help="Image files (default: the --sample photo).")
]
WeightsOption = Annotated[Path | None, typer.Option("--weights", help="Local state_dict file.")]
LayersOption = Annotated[str, typer.Option("--layers", "--layer", "-l", help="Target layer(s) or auto.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, ...")]


def model_option(help: str) -> Any:
    """The ``--model`` option with a command's own help text."""
    return typer.Option("--model", help=help)


def out_option(help: str) -> Any:
    """The ``--out`` / ``-o`` output folder option with a command's own help text."""
    return typer.Option("--out", "-o", help=help)


def fail(err: BaseException) -> None:
    """Print ``error: <message>`` on stderr and exit with status 2."""
    err_console.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the user's mistakes (:data:`USER_ERRORS`) raised inside the block into :func:`fail`."""
    try:
        yield
    except USER_ERRORS as err:
        fail(err)


def split(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def new_table(title: str, columns: Sequence[str]) -> Table:
    """A rich table with these plain columns."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    return table


@contextmanager
def forwards_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar of forward passes on stderr fed by ``f(done, total)``; ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("forwards"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield report


@contextmanager
def evaluation_progress(total: int) -> Iterator[Callable[[int, str], None]]:
    """A progress bar on stderr of ``total`` steps fed by ``f(done, description)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("evaluating", total=total)

        def report(done: int, description: str) -> None:
            bar.update(task, completed=done, description=description)

        yield report


def load_pictures(images: Sequence[Path] | None, sample: str) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs: the image files (named by their stem), or the sample photo when none."""
    from camkit.io import load_image, sample_image

    if images:
        return [(p.stem, load_image(p)) for p in images]
    return [(sample, sample_image(sample))]
