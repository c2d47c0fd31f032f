"""Fixtures of the report and app tests: a headless Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright;
nothing downloads a browser), a small random-weight model, and picture checks.

Used by ``tests/test_report*.py`` and ``tests/test_app.py``, which make fixtures of these generators and functions. Without Chromium
or Playwright the browser tests are skipped with the reason, unless ``CAMKIT_REQUIRE_BROWSER=1`` or ``CI=true``
(then a missing browser fails).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import camkit

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("CAMKIT_CHROMIUM", "/usr/bin/chromium")
SMALL_SIZE = 64  # the small model's input size: fast on a CPU


def _missing(reason: str) -> None:
    if os.environ.get("CAMKIT_REQUIRE_BROWSER") == "1" or os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{reason}; the browser tests are required here (CAMKIT_REQUIRE_BROWSER=1 or CI=true)")
    pytest.skip(reason)


def launch_chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's ``Browser``), as a fixture's generator."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium; or set CAMKIT_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing(
            "the playwright package is not installed (pip install playwright; no browser download needed)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def one_thread() -> Iterator[None]:
    """One torch thread per test (restored after): the app's workers, the browser and the test share the CPU, and
    on a small machine extra intra-op threads only fight each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def small_model() -> camkit.LoadedModel:
    """Random-weight ResNet-18 (seed 0) fed 64 x 64 images."""
    torch.manual_seed(0)
    loaded = camkit.load_model("resnet18", pretrained=False)
    loaded.preprocess = replace(loaded.preprocess, size=(SMALL_SIZE, SMALL_SIZE))
    return loaded


def photo(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A small synthetic photo: a smooth background and a bright disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.integers(width // 4, 3 * width // 4), rng.integers(height // 4, 3 * height // 4)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(width, height) // 5) ** 2
    rgb = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 80)], axis=-1).astype(np.uint8)
    rgb[disc] = rng.integers(150, 255, size=3)
    return Image.fromarray(rgb)


def png_bytes(picture: Image.Image, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format=format)
    return buf.getvalue()


def pixel_std(png: bytes) -> float:
    """Standard deviation of a screenshot's gray levels (a blank page: about 0)."""
    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64).std())


def save_screenshot(png: bytes, name: str, out: Path) -> Path:
    """Save a screenshot as a palette PNG (small) under ``out``, and return its path.

    The pictures of the docs (docs/screenshots/) are rewritten only by ``make screenshots``
    (``CAMKIT_UPDATE_SCREENSHOTS=1``): a test never writes into the repository.
    """
    new = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    path = out / name
    new.save(path, optimize=True)
    if os.environ.get("CAMKIT_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        new.save(SCREENSHOTS / name, optimize=True)
    return path
    new.save(path, optimize=True)
    return path
