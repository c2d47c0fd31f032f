"""Regenerate docs/compatibility.md from the model-family test matrix (tests/adapters/test_families.py).

    .venv/bin/python tools/compat_table.py      # or: make compat

Runs the matrix with CAMKIT_WRITE_COMPAT=1: its last test renders the results it collected and writes the table
instead of comparing it with the committed file. Without that variable the same test fails when the committed
table differs from what the matrix produced, so the table cannot drift from the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = dict(os.environ, CAMKIT_WRITE_COMPAT="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "adapters" / "test_families.py"),
        "-k",
        "test_family or compatibility",
    ]
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code == 0:
        print(f"wrote {ROOT / 'docs' / 'compatibility.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
