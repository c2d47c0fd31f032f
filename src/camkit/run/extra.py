"""The ``camkit[run]`` extra: zarr (the maps) and pyarrow (the tables) of a ``camkit run`` store.

They are not core dependencies: :func:`camkit.run.run`, :func:`camkit.run.open_store` (``camkit report STORE``,
``camkit evaluate STORE``) call :func:`require_run_extra` first, which names the extra to install when either is
missing, and the modules of :mod:`camkit.run` import without them.
"""

from __future__ import annotations

import importlib

from camkit.errors import CamkitError

__all__ = ["RUN_EXTRA", "RUN_PACKAGES", "require_run_extra"]

#: The command that installs the extra.
RUN_EXTRA = 'pip install "camkit[run]"'
#: The packages of the extra, as imported.
RUN_PACKAGES = ("zarr", "pyarrow")


def require_run_extra(what: str = "camkit run") -> None:
    """Return when zarr and pyarrow import; else raise one CamkitError naming the extra.

    Raises:
        CamkitError: ``<what> needs zarr and pyarrow (not installed): pip install "camkit[run]"``.
    """
    missing = []
    for name in RUN_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CamkitError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{RUN_EXTRA}"
        )
