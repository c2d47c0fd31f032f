"""The reference libraries of the agreement tests in this folder: pytorch-grad-cam 1.5.7, torchcam 0.5.0 and
Quantus 0.6.0 (the ``reference`` extra, which ``make test`` installs), checked in this one place.

Every test of this folder is marked ``reference``. Where a reference library is missing (a user who installed
camkit without the extra), this folder is left out of the run and the report's header says why; under
``CI=true`` a missing reference library is an error, so the agreement tests never go unrun there. Tests outside
this folder never need a reference library.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REFERENCES = {
    "pytorch_grad_cam": "grad-cam==1.5.7",
    "torchcam": "torchcam==0.5.0",
    "quantus": "quantus==0.6.0",
}
MISSING = [pip for module, pip in REFERENCES.items() if importlib.util.find_spec(module) is None]

if MISSING and os.environ.get("CI") == "true":
    raise RuntimeError(f"the agreement tests need {', '.join(MISSING)}: pip install -e '.[reference]'")

collect_ignore_glob = ["test_*.py"] if MISSING else []


def pytest_report_header() -> str | None:
    if MISSING:
        return f"tests/peers left out: {', '.join(MISSING)} not installed (pip install -e '.[reference]')"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.reference)
