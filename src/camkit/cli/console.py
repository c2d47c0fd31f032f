"""The consoles of the ``camkit`` commands: stdout and stderr, neither reading Rich markup nor emoji codes.

File names, labels and messages may hold ``[bold]``, ``[/x]`` or ``:smile:``: they are printed exactly as they are.
Styles are applied with :class:`rich.text.Text`, never with markup in a string.
"""

from __future__ import annotations

from rich.console import Console

__all__ = ["console", "err_console"]

#: stdout of the commands (no markup, no emoji codes).
console = Console(markup=False, emoji=False)
#: stderr of the commands: ``error:`` lines, warnings, progress bars (no markup, no emoji codes).
err_console = Console(stderr=True, markup=False, emoji=False)
