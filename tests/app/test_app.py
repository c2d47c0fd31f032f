"""The web app of ``camkit serve``: the API (answers equal to the library's, upload limits as 413 / 415 / 422, 503
when full), the page in Chromium (upload, then another method changes the overlay; a bad upload shows its
message), a bounded load test on loopback with memory flat after warm-up, and the command itself."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import _browser
import camkit
from _browser import SMALL_SIZE, photo, pixel_std, png_bytes, save_screenshot
from camkit.app import AppConfig, BackgroundServer, create_app, is_loopback
from camkit.cli import app as cli
from camkit.localize import localize

MODEL = "resnet18"
CONFIG = AppConfig(model=MODEL, pretrained=False, seed=0, max_bytes=300_000, max_pixels=200_000, workers=2,
                   queue=4, input_size=SMALL_SIZE)  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


@pytest.fixture(scope="module")
def web() -> FastAPI:
    return create_app(CONFIG)


@pytest.fixture(scope="module")
def client(web: FastAPI) -> TestClient:
    return TestClient(web, base_url="http://127.0.0.1")  # the app answers only hosts it serves


def _map(answer: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4").reshape(answer["map_shape"])


def _expected(
    web: FastAPI, picture: Image.Image, method: str, target: str | int | None = None
) -> camkit.Explanation:
    loaded = web.state.models.get(MODEL)
    return camkit.explain(loaded.model, [picture], method, targets=target, preprocess=loaded.preprocess,
                          labels=loaded.labels)  # fmt: skip


def test_explain_answers_the_librarys_map_top5_and_boxes(web: FastAPI, client: TestClient) -> None:
    pic = photo(120, 90, 3)
    res = client.post("/api/explain", data={"model": MODEL, "method": "layercam", "alpha": "0.3"},
                      files={"file": ("p.png", png_bytes(pic), "image/png")})  # fmt: skip
    assert res.status_code == 200, res.text
    ans = res.json()
    expl = _expected(web, pic, "layercam")
    np.testing.assert_array_equal(_map(ans), expl.maps[0].numpy())
    assert ans["map_shape"] == [SMALL_SIZE, SMALL_SIZE] and ans["size"] == [120, 90]
    assert ans["class"] == int(expl.classes[0]) and ans["label"] == expl.labels[0]
    assert ans["prob"] == pytest.approx(float(expl.probs[0]))
    assert ans["top5"][0]["class"] == ans["class"] and len(ans["top5"]) == 5
    png = base64.b64decode(ans["overlay"].removeprefix("data:image/png;base64,"))
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (120, 90)
    assert np.array_equal(np.asarray(overlay), np.asarray(expl.overlay(0, alpha=0.3)))
    boxes = localize(expl)[0]
    assert [b["box"] for b in ans["boxes"]] == [b.xyxy for b in boxes]
    # a typed class name, and a sample instead of an upload
    res = client.post("/api/explain", data={"model": MODEL, "sample": "coffee", "target": "zebra"})
    assert res.status_code == 200 and res.json()["label"] == "zebra" and res.json()["class"] == 340
    np.testing.assert_array_equal(
        _map(res.json()), _expected(web, camkit.sample_image("coffee"), "gradcam", "zebra").maps[0].numpy()
    )


def test_layers_lists_hookable_layers_and_the_auto_choice(client: TestClient) -> None:
    res = client.get("/api/layers", params={"model": MODEL})
    assert res.status_code == 200
    names = [row["name"] for row in res.json()["layers"]]
    assert res.json()["auto"] == "layer4" and "layer3.1" in names and "avgpool" not in names
    cfg = client.get("/api/config").json()
    assert cfg["model"] == MODEL and cfg["samples"] == ["chelsea", "coffee", "astronaut"]
    assert "gradcam" in [m["name"] for m in cfg["methods"]] and cfg["max_bytes"] == 300_000
    rows = {m["name"]: m for m in cfg["methods"]}
    assert rows["polycam"]["family"] == "own-pass" and "backward" in rows["polycam"]["cost"]
    assert "development set" in rows["polycam"]["prefer"]  # the measured recommendation, shown by the page


def _cut() -> bytes:
    data = png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    )
    return data[: len(data) // 2]  # a whole header, half the pixels


def _ico() -> bytes:
    return png_bytes(photo(32, 32), format="ICO")


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        (
            {"file": ("big.bmp", b"BM" + bytes(300_001), "image/bmp")},
            {},
            413,
            "larger than the limit of 300000 bytes",
        ),
        ({"file": ("huge.bin", bytes(2_000_000), "image/png")}, {}, 413, "larger than the limit"),
        (
            {"file": ("wide.png", png_bytes(Image.new("RGB", (1000, 300))), "image/png")},
            {},
            413,
            "300000 pixels",
        ),
        (
            {"file": ("notes.txt", b"hello, not a picture", "text/plain")},
            {},
            415,
            "not an image camkit can read",
        ),
        ({"file": ("icon.ico", _ico(), "image/x-icon")}, {}, 415, "format ICO are not accepted"),
        ({"file": ("empty.png", b"", "image/png")}, {}, 422, "empty"),
        ({"file": ("cut.png", _cut(), "image/png")}, {}, 415, "could not be decoded"),
        (None, {}, 422, "no image"),
        (None, {"sample": "moon"}, 422, "unknown sample"),
        (None, {"sample": "chelsea", "method": "nope"}, 422, "unknown method"),
        (None, {"sample": "chelsea", "layer": "layer9"}, 422, "unknown layer 'layer9'"),
        (None, {"sample": "chelsea", "target": "not a class"}, 422, "unknown class name"),
        (None, {"sample": "chelsea", "target": "top3"}, 422, "not topK"),
        (None, {"sample": "chelsea", "alpha": "1.5"}, 422, "alpha"),
        (None, {"sample": "chelsea", "model": "no_such_net"}, 422, "model 'no_such_net' is not served here"),
    ],
)
def test_bad_requests_get_their_status_and_a_clear_message(
    client: TestClient, files: dict | None, data: dict, status: int, message: str
) -> None:
    res = client.post("/api/explain", data={"model": MODEL, **data}, files=files)
    assert res.status_code == status, res.text
    assert message in res.json()["detail"]


def test_full_queue_answers_503_then_recovers(web: FastAPI, client: TestClient) -> None:
    limiter = web.state.limiter
    taken = 0
    try:
        while limiter.try_acquire():
            taken += 1
        assert taken == CONFIG.workers + CONFIG.queue
        res = client.post("/api/explain", data={"model": MODEL, "sample": "chelsea"})
        assert res.status_code == 503 and "busy" in res.json()["detail"] and res.headers["retry-after"] == "1"
        assert client.get("/api/layers", params={"model": MODEL}).status_code == 503
    finally:
        for _ in range(taken):
            limiter.release()
    assert client.post("/api/explain", data={"model": MODEL, "sample": "chelsea"}).status_code == 200
    assert limiter.busy == 0


def test_concurrent_requests_beyond_capacity_are_refused_not_queued_forever() -> None:
    web = create_app(AppConfig(model=MODEL, pretrained=False, workers=1, queue=0, input_size=SMALL_SIZE))
    cache = web.state.models
    gate = threading.Event()
    real_get = cache.get

    def slow_get(name: str) -> camkit.LoadedModel:
        gate.wait(10)  # the first request holds the only worker until the second has been answered
        return real_get(name)

    cache.get = slow_get
    with BackgroundServer(web) as srv:
        first: dict[str, int] = {}
        t = threading.Thread(target=lambda: first.update(
            code=httpx.post(srv.url + "api/explain", data={"model": MODEL, "sample": "chelsea"}, timeout=60).status_code))  # fmt: skip
        t.start()
        deadline = time.monotonic() + 10
        while web.state.limiter.busy == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = httpx.post(srv.url + "api/explain", data={"model": MODEL, "sample": "coffee"}, timeout=60)
        gate.set()
        t.join(60)
    assert second.status_code == 503 and first["code"] == 200


def test_load_on_loopback_all_answers_equal_the_library_and_memory_stays_flat(web: FastAPI) -> None:
    """4 clients x 4 requests per round, 3 rounds after a warm-up round; every map is the library's."""
    pictures = {f"p{i}": photo(96, 72, i) for i in range(3)}
    methods = ["gradcam", "gradcam++", "layercam", "eigencam"]
    jobs = [(p, m) for p in pictures for m in methods]
    expected = {(p, m): _expected(web, pictures[p], m).maps[0].numpy() for p, m in jobs}
    uploads = {p: png_bytes(pic) for p, pic in pictures.items()}
    n_clients, per_client = 4, 4
    failures: list[str] = []

    def client_run(k: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for j in range(per_client):
                p, m = jobs[(k * per_client + j) % len(jobs)]
                res = c.post("/api/explain", data={"model": MODEL, "method": m},
                             files={"file": (f"{p}.png", uploads[p], "image/png")})  # fmt: skip
                if res.status_code != 200:
                    failures.append(f"{p} {m}: {res.status_code} {res.text[:200]}")
                elif not np.array_equal(_map(res.json()), expected[(p, m)]):
                    failures.append(f"{p} {m}: the map differs from the library's")

    def one_round(url: str) -> float:
        threads = [threading.Thread(target=client_run, args=(k, url)) for k in range(n_clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        return time.perf_counter() - start

    process = psutil.Process()
    with BackgroundServer(web) as srv:
        one_round(srv.url)  # warm-up: allocator pools, caches
        rss = []
        for _ in range(3):
            one_round(srv.url)
            rss.append(process.memory_info().rss)
    assert failures == []
    print(f"RSS after rounds 2-4: {[round(r / 2**20, 1) for r in rss]} MiB")
    growth = (rss[-1] - rss[0]) / 2**20
    assert growth < 25, f"RSS grew {growth:.1f} MiB over 2 rounds after warm-up: {[r >> 20 for r in rss]} MiB"


def test_page_in_chromium_upload_then_method_changes_the_overlay(
    chromium: object, web: FastAPI, tmp_path: Path
) -> None:
    upload = tmp_path / "disc.png"
    photo(160, 120, 5).save(upload)
    bad = tmp_path / "fake.png"
    bad.write_bytes(b"this is text, not a PNG")
    huge = tmp_path / "wide.png"
    Image.new("RGB", (1000, 400), "white").save(huge)
    with BackgroundServer(web) as srv:
        page = chromium.new_page(viewport={"width": 1150, "height": 820})  # type: ignore[attr-defined]
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(srv.url)
            ready = "(old) => document.body.dataset.state === 'ready' && document.getElementById('overlay').dataset.key !== old"
            page.wait_for_function(ready, arg="", timeout=60_000)  # the sample, explained on load
            assert page.input_value("#model") == MODEL
            assert page.locator("#layer option").count() > 10  # the model's layers were listed
            src0 = page.get_attribute("#overlay", "data-key")
            page.set_input_files("#file", str(upload))
            page.wait_for_function(ready, arg=src0, timeout=60_000)
            src1 = page.get_attribute("#overlay", "data-key")
            assert "160\u00d7120" in page.inner_text("#figures")
            page.select_option("#method", "layercam")
            page.wait_for_function(ready, arg=src1, timeout=60_000)
            src2 = page.get_attribute("#overlay", "data-key")
            assert src2 != src1 and "layercam" in page.inner_text("#figures")
            assert page.inner_text("#method-hint").startswith("1 forward")  # its cost, then when to prefer it
            assert page.get_attribute("#download", "download") == "disc_layercam.png"
            assert page.locator("#top5 tr").count() == 6 and page.locator("#classes option").count() == 5
            assert page.locator("#boxes rect").count() >= 1
            page.select_option("#layer", "layer3")
            page.wait_for_function(ready, arg=src2, timeout=60_000)
            assert "at layer3" in page.inner_text("#figures")
            with page.expect_download() as download:
                page.click("#download")
            saved = tmp_path / "down.png"
            download.value.save_as(saved)
            assert Image.open(saved).format == "PNG" and Image.open(saved).size == (160, 120)
            assert pixel_std(page.screenshot()) > 20  # not blank

            page.set_input_files("#file", str(bad))
            page.wait_for_function("() => document.body.dataset.state === 'error'", timeout=60_000)
            assert "error 415" in page.inner_text("#error") and "not an image" in page.inner_text("#error")
            page.set_input_files("#file", str(huge))
            page.wait_for_function(
                "() => document.getElementById('error').textContent.includes('413')", timeout=60_000
            )
            assert "pixels, more than the limit" in page.inner_text("#error")
            assert page.locator("#overlay").is_visible()  # kept, greyed
            assert "stale" in (page.get_attribute("#result", "class") or "")
            save_screenshot(page.screenshot(), "app_error.png", tmp_path)
            page.select_option("#sample", "chelsea")
            page.wait_for_function("() => document.body.dataset.state === 'ready'", timeout=60_000)
            assert not page.locator("#error").is_visible() and "stale" not in (
                page.get_attribute("#result", "class") or ""
            )
            assert errors == []
        finally:
            page.close()


def test_is_loopback() -> None:
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("::1")
        and is_loopback("localhost")
        and is_loopback("127.0.0.2")
    )
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    calls: list[dict] = []
    monkeypatch.setattr("camkit.app.serve", lambda config, host, port: calls.append(
        {"config": config, "host": host, "port": port}))  # fmt: skip
    yield calls


def test_cli_serve_warns_off_loopback_and_checks_its_options(fake_serve: list[dict]) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--model", MODEL, "--no-pretrained", "--max-upload-mb", "2"])
    assert res.exit_code == 0 and "warning" not in res.output
    assert fake_serve[-1]["host"] == "127.0.0.1" and fake_serve[-1]["port"] == 8000
    assert fake_serve[-1]["config"].max_bytes == 2_000_000 and not fake_serve[-1]["config"].pretrained
    res = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "9000"])
    assert res.exit_code == 0 and "warning:" in res.output and "reachable from other machines" in res.output
    for args, message in [(["--port", "70000"], "--port"), (["--workers", "0"], "workers"),
                          (["--max-upload-mb", "0"], "--max-upload-mb"), (["--queue", "-1"], "queue")]:  # fmt: skip
        res = runner.invoke(cli, ["serve", *args])
        assert res.exit_code == 2 and message in res.output, res.output
    assert len(fake_serve) == 2


def test_camkit_serve_command_starts_on_a_free_loopback_port() -> None:
    """The real command, as a user starts it: prints its address, answers, stops on SIGINT."""
    env = {**os.environ, "PYTHONPATH": str(Path(camkit.__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "camkit.cli", "serve", "--port", "0", "--model", MODEL, "--no-pretrained",
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stdout.read() if proc.poll() is not None else line
        res = httpx.get(match.group(0), timeout=30)
        assert res.status_code == 200 and "camkit" in res.text and "<script" in res.text
        assert "http" not in re.sub(r"\bhttp-equiv\b", "", res.text.split("<body", 1)[1])  # no remote asset
    finally:
        proc.send_signal(2)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
