"""``python -m camkit``: the ``camkit`` command (so ``torchrun -m camkit run ...`` works).

Only :mod:`camkit._entry` is imported here: it takes over Ctrl-C before the command's heavy imports.
"""

from camkit._entry import main

if __name__ == "__main__":
    main()
