"""The ``interrupted`` line of the ``camkit`` command, shared by its entry point (:mod:`camkit._entry`) and the
commands (:mod:`camkit.cli`). Standard library only: it is imported before the command's heavy imports."""

from __future__ import annotations

import sys

__all__ = ["INTERRUPTED", "announce_interrupt", "state"]

INTERRUPTED = "interrupted"
"""The line printed on stderr when Ctrl-C ends the command (exit status 130)."""


class _State:
    announced = False  # the line is printed
    raised = False  # a KeyboardInterrupt was raised by the first Ctrl-C
    interrupted = False  # the command ends because of Ctrl-C (status 130)
    pid = -1  # the command's own process (not a forked worker)


state = _State()
"""The interrupt state of the ``camkit`` command's process (set by :mod:`camkit._entry`)."""


def announce_interrupt() -> None:
    """Print the ``interrupted`` line on stderr, once per process (which then ends with status 130)."""
    state.interrupted = True
    if state.announced:
        return
    state.announced = True
    try:
        sys.stderr.write(INTERRUPTED + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone: the exit status still says it
        pass
