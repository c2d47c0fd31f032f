"""``python -m camkit.cli``: the ``camkit`` command."""

from camkit.cli import main

if __name__ == "__main__":
    main()
