"""The ``camkit`` command's entry point (the console script and ``python -m camkit``): Ctrl-C from the first instant.

This module imports nothing but the standard library. It takes over SIGINT before the command's heavy imports
(typer, rich, torch, the library), so that a Ctrl-C at any moment (during start-up, in a command, while it cleans
up) ends the process with exit status 130 and one line on stderr, ``interrupted``, never a traceback:

* the first Ctrl-C raises :class:`KeyboardInterrupt` where the program is, so that ``finally`` blocks and context
  managers run (temporary files are removed, locks released);
* a second Ctrl-C while that clean-up runs, or one that arrives after the command has finished, ends the process at
  once (``os._exit(130)``);
* after an interrupt the process ends with status 130 once the ``atexit`` handlers have run, also when the
  interrupt landed in code that an extension ran through ``PyRun_String`` during an import (which would otherwise
  make Python end itself with SIGINT at exit).

A process that was started with SIGINT ignored (a background job of a non-interactive shell) keeps ignoring it.
Processes forked from the command (DataLoader workers) get Python's usual ``KeyboardInterrupt`` and print nothing.
"""

from __future__ import annotations

import _signal as signal  # the signal module without its enum wrapper (which costs milliseconds of start-up)
import atexit
import os
import sys

from camkit._interrupt import INTERRUPTED, announce_interrupt, state

TYPE_CHECKING = False  # not typing's (tens of milliseconds of start-up)
if TYPE_CHECKING:
    from types import FrameType

__all__ = ["INTERRUPTED", "announce_interrupt", "main"]


def _exit_now() -> None:
    announce_interrupt()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(130)


def _last_at_exit() -> None:
    """Registered before anything else, so it runs after every other ``atexit`` handler."""
    if state.interrupted:
        _exit_now()


def _on_sigint(_signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != state.pid:  # a forked worker (DataLoader): Python's own behaviour, never a line
        raise KeyboardInterrupt
    if state.raised:
        _exit_now()
    state.raised = True
    raise KeyboardInterrupt


def _after_sigint(_signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != state.pid:
        raise KeyboardInterrupt
    _exit_now()


def _take_over_sigint() -> bool:
    """Install :func:`_on_sigint` where Python's own handler is; whether it was installed."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_sigint)
            return True
    except ValueError:  # not the main thread of the main interpreter: leave Python's handling alone
        pass
    return False


def _finishing(interrupted: bool) -> None:
    """The command is over. Interrupted: a second Ctrl-C (while the interpreter shuts down) ends the process at
    once. Otherwise Python's own handler is back (``main`` may have been called inside a longer-lived process)."""
    try:
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, _after_sigint if interrupted else signal.default_int_handler)
    except ValueError:
        pass


def _run() -> str | int | None:
    """The command's exit status: its own, or 130 after a Ctrl-C."""
    code: str | int | None = 0
    try:
        from camkit.cli import run_app

        run_app()
    except KeyboardInterrupt:
        announce_interrupt()
        code = 130
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, str | int) or exit_.code is None else 1
        if code == 130:
            announce_interrupt()
    if state.raised and code != 130:
        # the KeyboardInterrupt of a Ctrl-C was caught on its way up (by a library, or turned into another error
        # inside an extension): the command still ends as interrupted
        announce_interrupt()
        code = 130
    return code


def _passive_openmp(argv: list[str]) -> None:
    """``camkit evaluate --compile``: torch's OpenMP threads sleep, rather than spin, between operations, unless
    ``OMP_WAIT_POLICY`` is set already. There the model's forwards run in ONNX Runtime's own threads, and torch's
    spinning threads would take the same cores between them. OpenMP reads the variable once, when torch is
    imported: hence here, before any import of torch. Torch's own forwards (the default path) are faster with
    spinning threads, so nothing else changes it."""
    if argv[1:2] == ["evaluate"] and "--compile" in argv[2:] and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> None:
    """Run the ``camkit`` command (``sys.argv``): returns on success, else exits with status 1 (some inputs
    skipped), 2 (an error, one ``error:`` line) or 130 (Ctrl-C, one ``interrupted`` line)."""
    state.pid = os.getpid()
    _passive_openmp(sys.argv)
    _take_over_sigint()
    atexit.register(_last_at_exit)
    try:
        code = _run()
    finally:
        _finishing(state.interrupted)
    if code:
        sys.exit(code)
