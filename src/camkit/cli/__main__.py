"""``python -m camkit.cli``: the ``camkit`` command."""

from camkit._entry import main

if __name__ == "__main__":
    main()
