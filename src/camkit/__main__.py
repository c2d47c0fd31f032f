"""``python -m camkit``: the ``camkit`` command (so ``torchrun -m camkit run ...`` works)."""

from camkit.cli import main

if __name__ == "__main__":
    main()
