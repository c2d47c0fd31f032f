"""The screenshots of the README (docs/screenshots/), taken with the offline pretrained default model: the app
explaining the sample cat, and a report of the three sample photos. Marked slow (real weights)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import _browser
import camkit
from _browser import pixel_std, save_screenshot
from camkit.app import AppConfig, BackgroundServer
from camkit.io import SAMPLES
from camkit.report import ReportOptions, build_records, write_report

pytestmark = pytest.mark.slow

CATS = ("Egyptian cat", "tabby", "tiger cat")


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


def test_app_screenshot_with_the_pretrained_default(chromium: object, tmp_path: Path) -> None:
    with BackgroundServer(AppConfig(workers=1, queue=2)) as srv:
        page = chromium.new_page(viewport={"width": 1150, "height": 760})  # type: ignore[attr-defined]
        try:
            page.goto(srv.url)
            # functions, not expressions: the app's Content-Security-Policy forbids the eval of a string
            page.wait_for_function("() => document.body.dataset.state === 'ready'", timeout=120_000)
            assert page.input_value("#model") == "efficientnet_lite0"
            assert any(cat in page.inner_text("#figures") for cat in CATS), page.inner_text("#figures")
            page.select_option("#method", "gradcam++")
            page.wait_for_function("() => document.body.dataset.state === 'ready' && "
                                   "document.getElementById('figures').textContent.includes('gradcam++')",
                                   timeout=120_000)  # fmt: skip
            shot = page.screenshot()
            assert pixel_std(shot) > 20
            assert save_screenshot(shot, "app.png", tmp_path).stat().st_size < 300_000
        finally:
            page.close()


def test_report_screenshot_of_the_samples_with_the_pretrained_default(
    chromium: object, tmp_path: Path
) -> None:
    loaded = camkit.load_model()
    records = build_records(loaded, [(s, camkit.sample_image(s)) for s in SAMPLES], ["gradcam", "layercam"],
                            "blocks.5,bn2", metrics=["insertion"], steps=8)  # fmt: skip
    stats = write_report(
        records,
        tmp_path / "report.html",
        ReportOptions(
            title="camkit report: sample photos",
            meta="3 images · model efficientnet_lite0 · gradcam, layercam · layers blocks.5,bn2",
        ),
    )
    page = chromium.new_page(viewport={"width": 1150, "height": 1000})  # type: ignore[attr-defined]
    try:
        page.goto(stats.path.as_uri())
        assert page.locator("section.card").count() == 3
        page.click("#head th:text-is('gradcam insertion')")
        page.click("#head th:text-is('gradcam insertion')")  # the best insertion first
        assert page.locator("#rows tr").count() == 3
        shot = page.screenshot()
        assert pixel_std(shot) > 20
        assert save_screenshot(shot, "report.png", tmp_path).stat().st_size < 300_000
    finally:
        page.close()
