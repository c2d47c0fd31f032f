"""The ``camkit`` command.

    camkit explain [IMAGES/FOLDERS...] [--model NAME] [--methods a,b] [--layers x,y] [--target T] [--out DIR]
    camkit layers MODEL
    camkit methods
    camkit evaluate [IMAGES/FOLDERS...] [--methods a,b] [--metrics m,n] [--annotations FILE] [--out DIR]
    camkit localize [IMAGES/FOLDERS...] [--method NAME] [--threshold T] [--mode largest|all] [--out DIR]
    camkit run DATA --out STORE [--methods a,b] [--metrics m,n] [--engine local|ray]   (resumable; torchrun -m camkit run)
    camkit report IMAGES... [--methods a,b] [--metrics m,n] -o report.html
    camkit serve [--host 127.0.0.1] [--port 8000] [--model NAME]

With no image, ``camkit explain`` runs on a sample photo shipped with scikit-image (``--sample``), with the
offline pretrained EfficientNet-Lite0.

One module per command (:mod:`camkit.cli.explain`, ...), what they share in :mod:`camkit.cli.common`. A user's
mistake (unknown layer, class, method, missing file...) prints one ``error:`` line and exits with status 2. The
commands that load a model share the model options (``--model``, ``--weights``, ``--no-pretrained``, ``--seed``,
``--threads``, ``--device``: :class:`camkit.cli.common.ModelOptions`). ``explain`` and ``localize`` skip inputs that
cannot be read (an ``error:`` line each) and exit with status 1 when they did.
"""

from __future__ import annotations

import sys

import typer

from camkit.cli import evaluate, explain, layers, localize, methods, run
from camkit.cli import report as report_cli
from camkit.cli import serve as serve_cli
from camkit.cli.common import err_console

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Class Activation Maps for PyTorch vision models: why did the model decide what it decided?",
    pretty_exceptions_enable=False,
)
app.command()(explain.explain)
app.command()(layers.layers)
app.command()(methods.methods)
app.command()(evaluate.evaluate)
app.command()(localize.localize)
app.command()(run.run)
app.command()(report_cli.report)
app.command()(serve_cli.serve)


def main() -> None:
    """Entry point of the ``camkit`` console script."""
    from camkit.runtime import tune_allocator

    tune_allocator()  # this process is ours: keep freed memory for reuse (CPU forwards 1.1-2.4x faster)
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
