"""``camkit serve`` under hostile use: only the operator's models are built and the cache keeps a budget; a body
without Content-Length is stopped at the limit while it arrives; foreign Host headers and cross-site requests are
refused (also from a real page in Chromium on another loopback port); the work of clients that disconnect is dropped
or stopped; half-open connections are closed; the page blends the overlay itself when the alpha slider moves, and a
new image starts from its own top-1.

Every server here listens on 127.0.0.1 only, with a random-weight ResNet-18 fed 64 x 64 images."""

from __future__ import annotations

import base64
import http.server
import io
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import _browser
import camkit
from _browser import SMALL_SIZE, photo
from camkit.app import AppConfig, BackgroundServer, create_app
from camkit.app.server import model_bytes
from camkit.cli import app as cli

MODEL = "resnet18"


def config(**changes: Any) -> AppConfig:
    base: dict[str, Any] = {"model": MODEL, "pretrained": False, "seed": 0, "max_bytes": 300_000,
                            "max_pixels": 200_000, "workers": 1, "queue": 4, "input_size": SMALL_SIZE}  # fmt: skip
    return AppConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


def until(condition: Callable[[], bool], seconds: float = 60.0, what: str = "") -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.01)


def form(fields: dict[str, str], boundary: str = "XyZb0und") -> tuple[bytes, str]:
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def raw_post(port: int, path: str, fields: dict[str, str]) -> socket.socket:
    """A complete POST sent on a raw socket whose answer is not read (the caller closes it: a client leaving)."""
    body, ctype = form(fields)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names ``camkit.load_model`` is asked to build from now on."""
    names: list[str] = []
    real = camkit.load_model

    def counted(name: str, *args: Any, **kwargs: Any) -> camkit.LoadedModel:
        names.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(camkit, "load_model", counted)
    return names


# ------------------------------------------------------------------------------------------------- 13: models


def test_a_model_the_operator_did_not_allow_is_refused_before_anything_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads = count_loads(monkeypatch)
    web = create_app(config())
    client = TestClient(web, base_url="http://127.0.0.1")
    for res in (
        client.get("/api/layers", params={"model": "vit_huge_patch14_224"}),
        client.get("/api/layers", params={"model": "alexnet"}),
        client.post("/api/explain", data={"sample": "chelsea", "model": "alexnet"}),
    ):
        assert res.status_code == 422, res.text
        detail = res.json()["detail"]
        assert "is not served here" in detail and f"choose one of {MODEL}, efficientnet_lite0" in detail
    assert loads == [] and web.state.models.names == []
    assert client.get("/api/config").json()["models"] == [MODEL, "efficientnet_lite0"]
    assert client.get("/api/layers", params={"model": f" {MODEL} "}).status_code == 200
    assert loads == [MODEL]
    # --models: exactly the names given
    web2 = create_app(config(models=(MODEL, "squeezenet1_1")))
    client2 = TestClient(web2, base_url="http://127.0.0.1")
    assert client2.get("/api/config").json()["models"] == [MODEL, "squeezenet1_1"]
    assert client2.get("/api/layers", params={"model": "squeezenet1_1"}).status_code == 200
    assert client2.get("/api/layers", params={"model": "efficientnet_lite0"}).status_code == 422
    with pytest.raises(ValueError, match="must be one of the models served"):
        AppConfig(model="alexnet", models=(MODEL,))


def test_the_model_cache_keeps_within_its_count_and_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    names = (MODEL, "squeezenet1_1", "mobilenet_v3_small")
    sizes = {n: model_bytes(camkit.load_model(n, pretrained=False).model) for n in names}
    loads = count_loads(monkeypatch)
    # bytes: resnet18 and squeezenet do not fit together, squeezenet and mobilenet do
    budget = sizes[MODEL] + sizes["squeezenet1_1"] - 1
    assert budget >= sizes["squeezenet1_1"] + sizes["mobilenet_v3_small"]
    cache = create_app(config(models=names, cache_bytes=budget, cache_models=3)).state.models
    for n in names:
        cache.get(n)
        assert cache.bytes <= budget
    assert cache.names == ["squeezenet1_1", "mobilenet_v3_small"]
    cache.get("squeezenet1_1")  # used: now the most recent
    cache.get(MODEL)
    assert cache.names == [MODEL] and cache.bytes == sizes[MODEL]
    assert loads == [*names, MODEL]
    # count
    cache = create_app(config(models=names, cache_models=2)).state.models
    for n in names:
        cache.get(n)
    assert cache.names == ["squeezenet1_1", "mobilenet_v3_small"]
    # a model larger than the whole budget alone is refused, and not kept
    web = create_app(config(models=names, cache_bytes=sizes[MODEL] - 1))
    res = TestClient(web, base_url="http://127.0.0.1").get("/api/layers", params={"model": MODEL})
    assert res.status_code == 422 and "more than the model cache's budget" in res.json()["detail"]
    assert "--cache-mb" in res.json()["detail"] and web.state.models.names == []


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    calls: list[dict] = []
    monkeypatch.setattr("camkit.app.serve", lambda config, host, port: calls.append(
        {"config": config, "host": host, "port": port}))  # fmt: skip
    yield calls


def test_cli_serve_takes_the_models_the_cache_budget_and_the_hosts(fake_serve: list[dict]) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--models", f"{MODEL}, squeezenet1_1", "--cache-mb", "500",
                              "--allowed-hosts", "box.lan,10.0.0.7", "--header-timeout", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = fake_serve[-1]["config"]
    assert (
        cfg.served_models == (MODEL, "squeezenet1_1") and cfg.model == MODEL
    )  # the default --model gives way
    assert cfg.cache_bytes == 500_000_000 and cfg.allowed_hosts == ("box.lan", "10.0.0.7")
    assert cfg.header_timeout == 3
    res = runner.invoke(cli, ["serve"])
    assert fake_serve[-1]["config"].served_models == ("efficientnet_lite0",)
    for args, message in [(["--models", " , "], "--models"), (["--cache-mb", "0"], "--cache-mb"),
                          (["--header-timeout", "0"], "--header-timeout"),
                          (["--model", "alexnet", "--models", MODEL], "must be one of the models served")]:  # fmt: skip
        res = runner.invoke(cli, ["serve", *args])
        assert res.exit_code == 2 and message in res.output, res.output


# ------------------------------------------------------------------------------------------ 14: body limit


def test_a_chunked_upload_is_stopped_at_the_limit_while_it_arrives() -> None:
    """No Content-Length: the server counts the body as it comes and answers 413 once it passes the limit, without
    reading (or spooling to disk) the rest, and before the request takes a worker's place."""
    web = create_app(config())
    total = 96 << 20  # the client would send 96 MiB; the limit is 300 kB (+ the form's allowance)
    with BackgroundServer(web) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        sock.sendall(
            f"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=XyZb0und\r\n\r\n".encode()
        )
        part = (b'--XyZb0und\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")  # fmt: skip
        block = bytes(1 << 16)
        sent, answer = 0, b""
        with sock:
            sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered
                try:
                    sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                except OSError:
                    break  # the server closed the connection
                sent += len(block)
            try:
                while chunk := sock.recv(1 << 16):
                    answer += chunk
            except OSError:  # a reset after the answer: the unread rest of the body
                pass
        # what the client got through is the limit plus what the sockets' buffers hold, far from all of it
        assert sent < total // 4, f"the server read {sent} bytes of a body over its limit"
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"larger than the limit of 300000 bytes" in answer
        assert web.state.activity.refused_size == 1 and web.state.activity.started == 0
        assert web.state.limiter.busy == 0
        # the server still answers
        res = httpx.post(srv.url + "api/explain", data={"sample": "chelsea"}, timeout=60)
        assert res.status_code == 200


def test_an_announced_body_over_the_limit_is_refused_before_it_is_read() -> None:
    web = create_app(config())
    with BackgroundServer(web) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(
            f"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Length: 50000000\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode()
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()


# -------------------------------------------------------------------------------------- 15: Host and Origin


def test_a_foreign_host_header_is_refused_and_does_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = count_loads(monkeypatch)
    web = create_app(config(allowed_hosts=("camkit.lan",)))
    with BackgroundServer(web) as srv:
        port = srv.port
        for host in (
            "evil.example",
            f"evil.example:{port}",
            f"rebind.attacker.test:{port}",
            "127.0.0.1.nip.io",
        ):
            for res in (
                httpx.get(srv.url, headers={"Host": host}),
                httpx.get(srv.url + "api/layers", params={"model": MODEL}, headers={"Host": host}),
                httpx.post(srv.url + "api/explain", data={"sample": "chelsea"}, headers={"Host": host}),
            ):
                assert res.status_code == 400, (host, res.status_code)
                assert (
                    "is not served here" in res.json()["detail"] and "--allowed-hosts" in res.json()["detail"]
                )
        assert loads == [] and web.state.activity.started == 0
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"LOCALHOST:{port}",
            f"[::1]:{port}",
            "camkit.lan",
        ):
            res = httpx.get(srv.url + "api/config", headers={"Host": host})
            assert res.status_code == 200, (host, res.text)


def test_cross_site_requests_are_refused_before_the_body_is_read() -> None:
    web = create_app(config())
    with BackgroundServer(web) as srv:
        own = f"http://127.0.0.1:{srv.port}"

        def post(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(srv.url + "api/explain", data={"sample": "chelsea"}, headers=headers)

        for headers in (
            {"Origin": "http://127.0.0.1:9"},  # another loopback port: another origin
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": own, "Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ):
            res = post(headers)
            assert res.status_code == 403 and "cross-site request refused" in res.json()["detail"], headers
        res = httpx.get(
            srv.url + "api/layers", params={"model": MODEL}, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert res.status_code == 403
        assert web.state.activity.started == 0 and web.state.activity.refused_origin == 6
        # the app's own page, and clients without a browser's headers
        assert post({"Origin": own, "Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert post({}).status_code == 200
        assert (
            httpx.get(srv.url, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
        )  # a link to the app


def test_every_answer_carries_the_security_headers() -> None:
    client = TestClient(create_app(config()), base_url="http://127.0.0.1")
    answers = [client.get("/"), client.get("/api/config"), client.get("/nope"),
               client.post("/api/explain", data={"sample": "moon"}),
               client.get("/", headers={"Host": "evil.example"})]  # fmt: skip
    for res in answers:
        csp = res.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
        assert "form-action 'none'" in csp and "base-uri 'none'" in csp and "script-src 'sha256-" in csp
        assert res.headers["x-frame-options"] == "DENY" and res.headers["x-content-type-options"] == "nosniff"
        assert res.headers["referrer-policy"] == "no-referrer"
    assert [r.status_code for r in answers] == [200, 200, 404, 422, 400]


class _Attacker(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: object) -> None:
        pass


def test_in_chromium_a_page_on_another_loopback_port_cannot_post_to_the_app_nor_frame_it(
    chromium: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = create_app(config())
    cache = web.state.models
    calls: list[str] = []
    real_get = cache.get
    monkeypatch.setattr(cache, "get", lambda name: (calls.append(name), real_get(name))[1])
    with BackgroundServer(web) as srv:
        target = srv.url + "api/explain"
        _Attacker.page = f"""<!DOCTYPE html><html><body>
<form id="f" method="POST" enctype="multipart/form-data" action="{target}">
<input name="sample" value="chelsea"><input name="model" value="{MODEL}"></form>
<iframe id="frame" src="{srv.url}"></iframe>
<script>
window.results = [];
const body = new FormData(); body.append("sample", "coffee"); body.append("model", "{MODEL}");
fetch("{target}", {{method: "POST", mode: "no-cors", body}}).then(r => window.results.push("no-cors " + r.type),
  e => window.results.push("no-cors failed"));
fetch("{target}", {{method: "POST", body}}).then(r => window.results.push("cors " + r.status),
  e => window.results.push("cors failed"));
</script></body></html>""".encode()
        attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
        thread = threading.Thread(target=attacker.serve_forever, daemon=True)
        thread.start()
        page = chromium.new_page()
        statuses: list[tuple[str, int]] = []
        page.on("response", lambda r: statuses.append((r.url, r.status)))
        try:
            page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
            page.wait_for_function("() => window.results.length === 2", timeout=30_000)
            # neither script reads anything (the no-cors answer is also withheld: Cross-Origin-Resource-Policy)
            assert sorted(page.evaluate("() => window.results")) == ["cors failed", "no-cors failed"]
            # the app's page does not load inside the other site's frame
            page.wait_for_timeout(500)
            frame = page.frame_locator("#frame")
            assert frame.locator("#form").count() == 0
            with page.expect_navigation():
                page.evaluate("() => document.getElementById('f').submit()")
            assert page.url == target and "cross-site request refused" in page.content()
        finally:
            page.close()
            attacker.shutdown()
            attacker.server_close()
        posts = [s for u, s in statuses if u == target]
        assert posts and set(posts) == {403}, statuses
        assert web.state.activity.refused_origin >= 3 and web.state.activity.started == 0 and calls == []


# ------------------------------------------------------------------------------ 24: clients that disconnect


def test_queued_work_of_a_closed_connection_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    web = create_app(config(workers=1, queue=4))
    cache = web.state.models
    gate = threading.Event()
    calls: list[str] = []
    real_get = cache.get

    def slow_get(name: str) -> camkit.LoadedModel:
        calls.append(name)
        gate.wait(30)  # the first request holds the only worker until the others have left
        return real_get(name)

    monkeypatch.setattr(cache, "get", slow_get)
    with BackgroundServer(web) as srv:
        first: dict[str, int] = {}
        t = threading.Thread(target=lambda: first.update(code=httpx.post(
            srv.url + "api/explain", data={"sample": "chelsea"}, timeout=60).status_code))  # fmt: skip
        t.start()
        until(lambda: calls == [MODEL], what="the first request holds the worker")
        waiting = [
            raw_post(srv.port, "/api/explain", {"sample": "coffee", "method": "scorecam"}) for _ in range(3)
        ]
        until(lambda: web.state.limiter.busy == 4, what="three requests wait for the worker")
        for sock in waiting:
            sock.close()  # the clients leave
        until(lambda: web.state.activity.dropped == 3, what="the closed requests are dropped")
        assert web.state.limiter.busy == 1  # their places are free again
        gate.set()
        t.join(60)
        until(lambda: web.state.limiter.busy == 0, what="the first request ends")
    assert first["code"] == 200
    assert calls == [MODEL]  # the dropped requests never ran
    act = web.state.activity
    assert (act.started, act.finished, act.dropped, act.stopped) == (1, 1, 3, 0)


def test_running_work_of_a_closed_connection_stops_at_the_next_batch() -> None:
    web = create_app(config(workers=1, batch_size=4))
    act = web.state.activity
    with BackgroundServer(web) as srv:
        sock = raw_post(
            srv.port, "/api/explain", {"sample": "coffee", "method": "scorecam", "layer": "layer3"}
        )
        until(lambda: act.forwards >= 8, what="the Score-CAM run has begun")
        sock.close()
        until(lambda: web.state.limiter.busy == 0, what="the run stops")
        assert act.stopped == 1 and act.finished == 0 and act.last_stop is not None
        done, total = act.last_stop
        assert total >= 64 and done < total // 2, act.last_stop  # it did not run to the end
        forwards = act.forwards
        # the next request runs normally (and the model was left as it was)
        res = httpx.post(srv.url + "api/explain", data={"sample": "coffee", "method": "gradcam"}, timeout=60)
        assert res.status_code == 200 and act.finished == 1 and act.forwards == forwards


def test_half_open_connections_are_closed_after_the_header_timeout() -> None:
    web = create_app(config(header_timeout=0.5, body_timeout=0.5))
    with BackgroundServer(web) as srv:
        opened = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(40)]
        for i, sock in enumerate(socks):
            if i % 4 == 1:
                sock.sendall(b"GET /api/con")  # half a request line
            elif i % 4 == 2:
                sock.sendall(
                    f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-A: ".encode()
                )  # half the headers
            elif i % 4 == 3:  # the head, then a body that stops
                sock.sendall(f"POST /api/explain HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                             "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000\r\n\r\n--x\r\n"
                             .encode())  # fmt: skip
            # i % 4 == 0: nothing at all
        drip = socket.create_connection(("127.0.0.1", srv.port), timeout=10)  # one byte every 0.1 s
        closed_after = None
        for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - opened
                break
            if select.select([drip], [], [], 0.1)[0]:
                closed_after = time.monotonic() - opened
                break
        assert closed_after is not None and closed_after < 5, (
            "a client trickling its headers kept its connection"
        )
        answers = []
        for sock in socks:
            with sock:
                data = b""
                try:
                    while chunk := sock.recv(
                        4096
                    ):  # b"": closed by the server (a timeout here fails the test)
                        data += chunk
                except ConnectionResetError:
                    pass
                answers.append(data)
        drip.close()
        assert time.monotonic() - opened < 10
        for i, data in enumerate(answers):
            if i % 4 == 3:
                assert data == b"", data[:100]  # the body stopped: closed without an answer
            else:
                assert data.startswith(b"HTTP/1.1 408"), (i, data[:100])
        # a plain client is served as before
        assert httpx.get(srv.url + "api/config").status_code == 200


# ---------------------------------------------------------------------------------------- 25: the page


def _canvas(page: Any) -> np.ndarray:
    uri = page.evaluate("() => document.getElementById('overlay').toDataURL('image/png')")
    return np.asarray(
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=np.int16
    )


def test_in_chromium_the_slider_blends_in_the_page_and_a_new_image_starts_from_its_top1(
    chromium: Any, tmp_path: Path
) -> None:
    web = create_app(config())
    loaded = web.state.models.get(MODEL)
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    photo(160, 120, 1).save(first)
    photo(128, 96, 7).save(second)
    with BackgroundServer(web) as srv:
        page = chromium.new_page()
        api: list[str] = []
        console: list[str] = []
        page.on("request", lambda r: api.append(r.url) if "/api/explain" in r.url else None)
        page.on("console", lambda m: console.append(m.text))
        page.on("pageerror", lambda e: console.append(str(e)))
        ready = "(old) => document.body.dataset.state === 'ready' && document.getElementById('overlay').dataset.key !== old"
        try:
            page.goto(srv.url)
            page.wait_for_function(ready, arg="", timeout=60_000)
            key = page.get_attribute("#overlay", "data-key")
            page.set_input_files("#file", str(first))
            page.wait_for_function(ready, arg=key, timeout=60_000)
            key = page.get_attribute("#overlay", "data-key")
            expl = camkit.explain(loaded.model, [Image.open(first).convert("RGB")], "gradcam",
                                  preprocess=loaded.preprocess, labels=loaded.labels)  # fmt: skip
            calls = len(api)
            page.focus("#alpha")
            seen = []
            for keyname, alpha in (
                ("End", 1.0),
                ("Home", 0.0),
                ("ArrowLeft", 0.0),
                *[("ArrowRight", 0.05 * (i + 1)) for i in range(6)],
            ):
                page.keyboard.press(keyname)
                assert page.get_attribute("#overlay", "data-alpha") == f"{alpha:.2f}"
                seen.append(_canvas(page))
                want = np.asarray(expl.overlay(0, alpha=round(alpha, 2)), dtype=np.int16)
                assert np.abs(seen[-1] - want).max() <= 2, (alpha, np.abs(seen[-1] - want).max())
            page.wait_for_timeout(400)
            assert len(api) == calls, "moving the slider asked the server again"
            assert page.get_attribute("#overlay", "data-key") == key and np.abs(seen[0] - seen[1]).max() > 50
            # the downloaded PNG is what the page shows
            with page.expect_download() as download:
                page.click("#download")
            saved = tmp_path / "down.png"
            download.value.save_as(saved)
            assert np.array_equal(np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16), seen[-1])

            # a class typed for the first image, then the second image: explained for its own top-1
            page.fill("#target", "zebra")
            page.dispatch_event("#target", "change")
            page.wait_for_function(ready, arg=key, timeout=60_000)
            assert "zebra (class 340)" in page.inner_text("#figures")
            key = page.get_attribute("#overlay", "data-key")
            page.set_input_files("#file", str(second))
            page.wait_for_function(ready, arg=key, timeout=60_000)
            top1 = camkit.explain(loaded.model, [Image.open(second).convert("RGB")], "gradcam",
                                  preprocess=loaded.preprocess, labels=loaded.labels)  # fmt: skip
            assert page.input_value("#target") == ""
            assert f"{top1.labels[0]} (class {int(top1.classes[0])})" in page.inner_text("#figures")
            first_row = page.locator("#top5 td").first.inner_text().strip()
            assert page.locator("#classes option").first.get_attribute("value") == first_row
        finally:
            page.close()
    assert [m for m in console if "Content Security Policy" in m or "Refused" in m] == [], console
