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

Every command runs inside the same error handling (:class:`CamkitCommand`): an operating-system error that reaches
it (a full disk, a read-only or forbidden ``--out``...) prints one ``error:`` line naming the file or folder and
what to do, exit status 2; Ctrl-C prints ``interrupted``, exit status 130 (from the first instant of start-up when
started as ``camkit`` or ``python -m camkit``: :mod:`camkit._entry`). Any other exception is a bug (in camkit or in
the model it ran): its traceback is printed, then one line asking to report it, exit status
:data:`EXIT_BUG` (3); docs/cli-errors.md.
"""

from __future__ import annotations

import errno
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from camkit._interrupt import announce_interrupt
from camkit.cli import evaluate, explain, layers, localize, methods, run
from camkit.cli import report as report_cli
from camkit.cli import serve as serve_cli
from camkit.cli.common import err_console, error_line, fail, os_error_message

__all__ = ["BUG_LINE", "EXIT_BUG", "CamkitCommand", "app", "out_of_memory", "report_bug", "run_app"]

#: Exit status of a command stopped by a bug (an exception that is neither a user error nor an OS error).
EXIT_BUG = 3

#: The line printed under the traceback of a bug.
BUG_LINE = (
    "this is a bug in camkit or in the model it ran, not a mistake of yours: please report it with the traceback "
    "above and the command you ran"
)


def report_bug(err: BaseException) -> None:
    """Print the traceback of ``err`` and the :data:`BUG_LINE` on stderr."""
    traceback.print_exception(type(err), err, err.__traceback__)
    err_console.print(error_line(BUG_LINE), highlight=False, soft_wrap=True)


class CamkitCommand(TyperCommand):
    """A ``camkit`` command: what escapes its body ends in one line, never a traceback.

    * :class:`OSError` (ENOSPC, EDQUOT, EROFS, EACCES, ...; not a closed stdout pipe): one ``error:`` line naming
      the file (or the folder of a temporary file, or ``--out``) and what to do, exit status 2. Files are written
      atomically (a temporary name, renamed when complete), so what the command wrote before is whole, and the
      temporary file of the write that failed is removed.
    * :class:`KeyboardInterrupt` (Ctrl-C): ``interrupted``, exit status 130.
    * any other exception (not typer's own exits and usage errors): a bug; its traceback, then
      :data:`BUG_LINE`, exit status :data:`EXIT_BUG`.
    """

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            announce_interrupt()
            raise typer.Exit(code=130) from None
        except OSError as err:
            if isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE:
                raise  # stdout closed (`camkit methods | head`): typer exits quietly
            out = ctx.params.get("out")
            fail(os_error_message(err, Path(out) if isinstance(out, str | Path) else None))
        except Exception as err:
            if _command_flow(err):
                raise
            memory = out_of_memory(err)
            if memory is not None:
                fail(memory)
            report_bug(err)
            raise typer.Exit(code=EXIT_BUG) from None


def out_of_memory(err: BaseException) -> str | None:
    """The one line for an allocation that failed (``MemoryError``, torch's out-of-memory error, the CPU
    allocator's refusal), naming the size asked for when the message gives it; None for any other error."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    text = str(err)
    if not (
        isinstance(err, MemoryError)
        or (oom is not None and isinstance(err, oom))
        or (isinstance(err, RuntimeError) and "can't allocate memory" in text)
    ):
        return None
    found = re.search(r"allocate (\d+) bytes", text)
    asked = f" (an allocation of {int(found.group(1)) / 2**30:,.1f} GiB)" if found else ""
    return (
        f"out of memory{asked}: lower the sizes given (a method's samples or batch size, --batch-size, the number "
        "or size of the images) or free memory"
    )


def _command_flow(err: Exception) -> bool:
    """Whether ``err`` is typer's (or click's) own way to end a command: an exit with a status, an abort, a usage
    error the parser reports itself."""
    return type(err).__module__.split(".")[0] in ("typer", "click")


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Class Activation Maps for PyTorch vision models: why did the model decide what it decided?",
    pretty_exceptions_enable=False,
)
for _command in (
    explain.explain,
    layers.layers,
    methods.methods,
    evaluate.evaluate,
    localize.localize,
    run.run,
    report_cli.report,
    serve_cli.serve,
):
    app.command(cls=CamkitCommand)(_command)


def run_app() -> None:
    """Run the command line (``sys.argv``) in this process: :data:`app` with the allocator tuned."""
    from camkit.core.runtime import tune_allocator

    tune_allocator()  # this process is ours: keep freed memory for reuse (CPU forwards 1.1-2.4x faster)
    app()
