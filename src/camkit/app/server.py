"""The web app behind ``camkit serve``: a FastAPI application with one plain page and a small JSON API.

* ``GET /``: the page (vanilla HTML, CSS and script, shipped inside the package: nothing is fetched elsewhere).
* ``GET /api/config``: the defaults, the models served, the sample photos, the methods, the metrics of the metric
  registry (``camkit.metrics.METRICS``) and the upload limits.
* ``GET /api/layers?model=NAME``: the model's hookable layers and its automatic choice.
* ``POST /api/explain`` (multipart form): ``file`` (an upload) or ``sample``, ``model``, ``method``, ``layer``,
  ``target`` (index or name, empty: top-1), ``alpha`` -> the overlay as a PNG ``data:`` URI, the photo and the
  colored map alone (PNG ``data:`` URIs: the page blends them at any alpha without asking again), the map
  (float32, base64), the top-5, the explained class, the boxes; with ``metrics`` (names of the metric registry,
  repeated or comma-separated) and ``boxes`` (JSON ``[[x0, y0, x1, y1], ...]`` in the image's pixels, for the box
  metrics), the metrics of the map (:mod:`camkit.app.metrics`).

Errors are JSON ``{"detail": message}``: 400 for a ``Host`` header that is not served, 403 for a cross-site
request, 413 for a body or an upload over the byte or pixel limit, 415 for a file that is not an image of an
accepted format, 422 for a wrong parameter (a model that is not served, an unknown method, layer or class), 503
when every worker is busy and the queue is full.

Trust boundary (docs/app.md): every request must name a served host (the bound address, ``localhost``,
``127.0.0.1``, ``::1`` or one of :attr:`AppConfig.allowed_hosts`), which defeats DNS rebinding; requests that change
or compute something must come from the app's own page (an ``Origin`` other than the app's own, or
``Sec-Fetch-Site`` other than ``same-origin`` / ``none``, is refused before the body is read). Every answer carries a
Content-Security-Policy without ``'unsafe-inline'`` (the page's one script and one style block are allowed by
their SHA-256), ``frame-ancestors 'none'``, ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer``.

Only the models of :attr:`AppConfig.models` are served (default: :attr:`AppConfig.model` and camkit's offline
default), each loaded once and kept within a budget (:attr:`AppConfig.cache_models` models and
:attr:`AppConfig.cache_bytes` bytes of parameters and buffers; least recently used dropped first). Explanations
run on a pool of :attr:`AppConfig.workers` threads sharing the models: :func:`camkit.explain` is safe to call from
many threads on one model (README, "Concurrency"). At most ``workers + queue`` requests are admitted at once; the
next one is answered 503 at once rather than waiting. When a client closes its connection, its request is dropped
if it is still waiting for a thread, and stopped after the current batch of forward passes if it is running (see
:class:`Activity`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from camkit.adapters import LoadedModel, ModelSpec
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.core.explanation import Explanation
    from camkit.methods.registry import Method

__all__ = [
    "ACCEPTED_FORMATS",
    "BUG_DETAIL",
    "FORM_OVERHEAD",
    "LOCAL_HOSTS",
    "METHOD_COST_SETTINGS",
    "Activity",
    "AppConfig",
    "AppState",
    "Cancelled",
    "ExplainRequest",
    "Limiter",
    "ModelCache",
    "allow_host",
    "bound_method_cost",
    "content_security_policy",
    "create_app",
    "model_bytes",
]

#: Image formats an upload may have (PIL's format names).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

#: Host names always served (besides the bound address and :attr:`AppConfig.allowed_hosts`).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

#: Bytes a request body may hold beyond :attr:`AppConfig.max_bytes` (the form's other fields and boundaries).
FORM_OVERHEAD = 64_000

T = TypeVar("T")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _positive_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


@dataclass(frozen=True)
class AppConfig:
    """The app's settings (``camkit serve`` options).

    Attributes:
        model: the model selected when the page opens (any name :func:`camkit.load_model` accepts).
        models: the model names the app serves; any other name is refused (422) before anything is built.
            Empty (default): :attr:`model` and camkit's offline default (``efficientnet_lite0``).
        pretrained: load the libraries' pretrained weights (False: random weights drawn from ``seed``, for tests).
        seed: torch's seed before a model is built with random weights.
        device: where the models run.
        max_bytes: largest upload, in bytes (413 above); a request body may hold :data:`FORM_OVERHEAD` more bytes
            for the form's other fields, counted while it arrives (also without a Content-Length).
        max_pixels: largest upload, in pixels (width x height, read from the header before decoding; 413 above).
        workers: threads explaining at once.
        queue: requests admitted beyond ``workers``, waiting for a thread; the next are answered 503.
        cache_models: models kept in memory at most (least recently used dropped first).
        cache_bytes: bytes of parameters and buffers kept in memory at most, all cached models together (least
            recently used dropped first; a model larger than this alone is refused).
        max_side: the longer side of the overlay returned, in pixels.
        input_size: classifiers only: resize images to this square size instead of the model's own (smaller is
            faster on a CPU, coarser maps); None: the model's size.
        batch_size: masked or ablated inputs per forward pass of the perturbation methods (Score-CAM, ...): the
            step at which the work of a client that disconnected stops. None: camkit's automatic size.
        allowed_hosts: host names or addresses accepted in the ``Host`` header besides the bound address,
            ``localhost``, ``127.0.0.1`` and ``::1`` (e.g. the machine's name when serving on a network).
        header_timeout: seconds a connection has to send a whole request head (request line and headers), from
            its opening or from the previous answer; then it is answered 408 and closed.
        body_timeout: seconds a request body may pause between two reads; then the connection is closed.
        prompts: the text prompts of the CLIP models served (``clip:``, ``hf:`` CLIP / SigLIP folders), one per
            zero-shot class; empty for other models.
        metrics: the metric names the app offers (names of :data:`camkit.metrics.METRICS`, or ``all``); any other
            is refused (422). Empty (default): :data:`camkit.app.metrics.DEFAULT_OFFERED`, every metric but those
            that explain the image many times again.
    """

    model: str = "efficientnet_lite0"
    models: tuple[str, ...] = ()
    pretrained: bool = True
    seed: int = 0
    device: str = "cpu"
    max_bytes: int = 10_000_000
    max_pixels: int = 25_000_000
    workers: int = 2
    queue: int = 8
    cache_models: int = 3
    cache_bytes: int = 2_000_000_000
    max_side: int = 1024
    input_size: int | None = None
    batch_size: int | None = None
    allowed_hosts: tuple[str, ...] = ()
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    prompts: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "workers", "cache_models", "cache_bytes", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CamkitError(f"AppConfig.{name} must be a positive int, got {value!r}")
        if self.input_size is not None and (
            isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 16
        ):
            raise CamkitError(f"AppConfig.input_size must be None or an int >= 16, got {self.input_size!r}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise CamkitError(f"AppConfig.batch_size must be None or a positive int, got {self.batch_size!r}")
        if isinstance(self.queue, bool) or not isinstance(self.queue, int) or self.queue < 0:
            raise CamkitError(f"AppConfig.queue must be an int >= 0, got {self.queue!r}")
        for name in ("header_timeout", "body_timeout"):
            if not _positive_number(getattr(self, name)):
                raise CamkitError(
                    f"AppConfig.{name} must be a positive number of seconds, got {getattr(self, name)!r}"
                )
        for name in ("models", "allowed_hosts", "metrics"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v.strip() for v in value):
                raise CamkitError(f"AppConfig.{name} must be a tuple of non-empty names, got {value!r}")
            object.__setattr__(self, name, tuple(v.strip() for v in value))
        if not isinstance(self.model, str) or not self.model.strip():
            raise CamkitError(f"AppConfig.model must be a model name, got {self.model!r}")
        from camkit.app.metrics import offered_metrics

        offered_metrics(self.metrics)  # an unknown metric name: refused here, with the registry's message
        if self.models and self.model.strip() not in self.models:
            raise CamkitError(
                f"the model shown first ({self.model!r}) must be one of the models served ({', '.join(self.models)})"
            )

    def spec(self, name: str) -> ModelSpec:
        """How the app builds the served model ``name`` (:class:`camkit.adapters.ModelSpec`): torch's seed set
        only for random weights."""
        return ModelSpec(
            name,
            pretrained=self.pretrained,
            seed=None if self.pretrained else self.seed,
            device=self.device,
            prompts=self.prompts if name.lower().startswith(("clip:", "hf:")) else (),
        )

    @property
    def served_metrics(self) -> tuple[str, ...]:
        """The metric names offered, in the registry's order (:attr:`metrics`, or
        :data:`camkit.app.metrics.DEFAULT_OFFERED`)."""
        from camkit.app.metrics import offered_metrics

        return offered_metrics(self.metrics)

    @property
    def served_models(self) -> tuple[str, ...]:
        """The model names served, in order (:attr:`models`, or :attr:`model` and the offline default)."""
        from camkit.adapters.zoo import DEFAULT_MODEL

        names = self.models or (self.model.strip(), DEFAULT_MODEL)
        return tuple(dict.fromkeys(names))


class Limiter:
    """Admits at most ``capacity`` requests at once; :meth:`try_acquire` never waits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        """Requests admitted and not finished."""
        return self._busy

    def try_acquire(self) -> bool:
        """Take a place if one is free (True), else False."""
        with self._lock:
            if self._busy >= self.capacity:
                return False
            self._busy += 1
            return True

    def release(self) -> None:
        """Give a place back."""
        with self._lock:
            self._busy = max(0, self._busy - 1)


@dataclass
class Activity:
    """What the app did, counted since it started (``app.state.activity``; read by the tests and for monitoring).

    Attributes:
        started: admitted requests whose work began on a worker thread.
        finished: requests whose work ran to the end.
        dropped: requests whose client disconnected while they waited for a thread: their work never ran.
        stopped: requests whose client disconnected while their work ran: it stopped at the next check (between
            two batches of forward passes of a perturbation method, or between the steps of any method).
        forwards: forward passes of the perturbation methods and of the metrics run so far (all requests
            together).
        last_stop: ``(done, total)`` forward passes of the last stopped perturbation run (None: none yet).
        refused_host: requests refused for their ``Host`` header.
        refused_origin: requests refused as cross-site.
        refused_size: requests refused for a body over the limit.
    """

    started: int = 0
    finished: int = 0
    dropped: int = 0
    stopped: int = 0
    forwards: int = 0
    last_stop: tuple[int, int] | None = None
    refused_host: int = 0
    refused_origin: int = 0
    refused_size: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (thread-safe)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class Cancelled(Exception):
    """Raised inside a request's work when its client disconnected."""


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (what the cache budget counts)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
    return int(total)


class ModelCache:
    """The served models by name, each loaded once (concurrent first requests for one name wait for the same load)
    and kept within :attr:`AppConfig.cache_models` and :attr:`AppConfig.cache_bytes` (least recently used dropped
    first)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.allowed: tuple[str, ...] = config.served_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._layers: dict[str, tuple[list[dict[str, Any]], str]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def names(self) -> list[str]:
        """The names of the models in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    @property
    def bytes(self) -> int:
        """Bytes of parameters and buffers of the models in memory."""
        with self._lock:
            return sum(self._sizes.values())

    def check(self, name: str) -> str:
        """The served name ``name`` stands for (stripped).

        Raises:
            ValueError: the name is empty or not served, saying which names are.
        """
        key = name.strip() if isinstance(name, str) else ""
        if not key:
            raise CamkitError(f"no model name given; choose one of {', '.join(self.allowed)}")
        if key not in self.allowed:
            raise CamkitError(
                f"model {key!r} is not served here; choose one of {', '.join(self.allowed)} "
                "(the operator chooses them with camkit serve --models)"
            )
        return key

    def cached(self, name: str) -> LoadedModel | None:
        """The model if it is loaded, else None (never loads)."""
        with self._lock:
            return self._models.get(name.strip())

    def get(self, name: str) -> LoadedModel:
        """The served model called ``name``, loaded on first use.

        Raises:
            ValueError: the name is not served, the model cannot be built (weights not available), or it is larger
                than the cache budget alone.
        """
        key = self.check(name)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            try:
                loaded = self.config.spec(key).load()
                size = self.config.input_size
                if size is not None and loaded.task == "classification":
                    loaded.preprocess = replace(loaded.preprocess, size=(size, size))
            except Exception as err:  # any failure to build is reported to the user: a 422 with why
                raise CamkitError(f"cannot load model {key!r}: {err}") from err
            nbytes = model_bytes(loaded.model)
            if nbytes > self.config.cache_bytes:
                del loaded
                raise CamkitError(
                    f"model {key!r} holds {nbytes / 1e6:.1f} MB of parameters, more than the model cache's budget "
                    f"of {self.config.cache_bytes / 1e6:.1f} MB; start camkit serve with a larger --cache-mb"
                )
            with self._lock:
                self._models[key] = loaded
                self._sizes[key] = nbytes
                while len(self._models) > 1 and (
                    len(self._models) > self.config.cache_models
                    or sum(self._sizes.values()) > self.config.cache_bytes
                ):
                    dropped, _ = self._models.popitem(last=False)
                    self._sizes.pop(dropped, None)
                    self._layers.pop(dropped, None)
                self._loading.pop(key, None)
            return loaded

    def layers(self, name: str) -> tuple[list[dict[str, Any]], str]:
        """The hookable layers of a model (name, type, feature-map shape) and the automatic choice."""
        import torch

        from camkit.core.layers import describe_layers, pick_auto

        loaded = self.get(name)
        key = name.strip()
        with self._lock:
            if key in self._layers:
                return self._layers[key]
        h, w = loaded.preprocess.size
        example = torch.zeros(1, 3, h, w, device=self.config.device)
        infos = describe_layers(loaded.model, example)
        rows: list[dict[str, Any]] = [
            {"name": i.name, "type": i.type, "shape": list(i.spatial) if i.spatial else None}
            for i in infos
            if not i.passthrough and i.spatial is not None
        ]
        auto = pick_auto(infos, loaded.model) or (str(rows[-1]["name"]) if rows else "")
        with self._lock:
            if key in self._models:
                self._layers[key] = (rows, auto)
        return rows, auto


def _page() -> str:
    return resources.files("camkit.app").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")


def _hashes(page: str, tag: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) of the page's inline ``<script>`` or ``<style>`` blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode("ascii") + "'"
        for b in blocks
    ]


def content_security_policy(page: str) -> str:
    """The Content-Security-Policy of every answer: nothing but the page's own script and style (by hash), images
    from the app or ``data:`` URIs, requests to the app only; no frames, forms, plugins or ``<base>``."""
    return (
        f"default-src 'none'; script-src {' '.join(_hashes(page, 'script'))}; "
        f"style-src {' '.join(_hashes(page, 'style'))}; img-src 'self' data: blob:; connect-src 'self'; "
        "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


def _split_host(value: str) -> tuple[str, str]:
    """``(host, port)`` of a Host header or an origin's authority (host lowercased, brackets removed)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.removeprefix(":")
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, ""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class _Refuse(Exception):
    """A request refused by :class:`_Guard` before it reaches the app."""

    def __init__(self, status: int, message: str, counter: str) -> None:
        super().__init__(message)
        self.status, self.message, self.counter = status, message, counter


class _Guard:
    """ASGI middleware in front of the app: the Host and cross-site checks, the security headers, and the body
    limit counted while the body arrives (with or without a Content-Length), before any form parsing."""

    SAFE = ("GET", "HEAD", "OPTIONS")

    def __init__(
        self, app: ASGIApp, config: AppConfig, hosts: set[str], activity: Activity, csp: str
    ) -> None:
        self.app = app
        self.config = config
        self.hosts = hosts
        self.activity = activity
        self.limit = config.max_bytes + FORM_OVERHEAD
        self.headers = [
            (b"content-security-policy", csp.encode("ascii")),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cross-origin-resource-policy", b"same-origin"),
        ]

    def _check(self, scope: Scope) -> None:
        host_header = _header(scope, b"host")
        if host_header is None:
            raise _Refuse(
                400,
                "the request has no Host header; camkit serve answers only requests naming it",
                "refused_host",
            )
        host, _ = _split_host(host_header)
        if host not in self.hosts:
            raise _Refuse(
                400,
                f"host {host!r} is not served here: open the app at 127.0.0.1 or localhost, or start camkit serve "
                f"with --allowed-hosts {host} if that name is meant to reach it",
                "refused_host",
            )
        method = scope.get("method", "GET")
        site = (_header(scope, b"sec-fetch-site") or "").strip().lower()
        origin = _header(scope, b"origin")
        cross = site not in ("", "same-origin", "none")
        if method not in self.SAFE:
            if origin is not None:
                scheme, sep, authority = origin.strip().lower().partition("://")
                if not sep or scheme not in ("http", "https") or authority != host_header.strip().lower():
                    cross = True
            if cross:
                raise _Refuse(
                    403,
                    f"cross-site request refused (Origin {origin!r}, Sec-Fetch-Site {site or 'absent'!r}): only the "
                    "app's own page may send it",
                    "refused_origin",
                )
        elif cross and scope.get("path", "/") != "/":
            raise _Refuse(
                403,
                f"cross-site request refused (Sec-Fetch-Site {site!r}): only the app's own page may send it",
                "refused_origin",
            )
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            raise _Refuse(413, self._too_large(), "refused_size")

    def _too_large(self) -> str:
        return (
            f"the upload is larger than the limit of {self.config.max_bytes} bytes; shrink it first (or start "
            "camkit serve with a larger --max-upload-mb)"
        )

    async def _answer(self, send: Send, status: int, message: str, close: bool = False) -> None:
        import json

        body = json.dumps({"detail": message}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers + self.headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check(scope)
        except _Refuse as refused:
            self.activity.add(refused.counter)
            await self._answer(send, refused.status, refused.message, close=refused.status == 413)
            return
        received = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    self.activity.add("refused_size")
                    if not started:
                        await self._answer(send, 413, self._too_large(), close=True)
                    raise _Refuse(413, self._too_large(), "refused_size")
            return message

        async def with_headers(message: Message) -> None:
            nonlocal started
            if over:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        try:
            await self.app(scope, counted, with_headers)
        except Exception:
            if not over:
                raise


def _open_upload(data: bytes, config: AppConfig) -> Image.Image:
    """The uploaded image opened (its header read, nothing decoded), or an HTTPException (413 pixels, 415 type,
    422 empty)."""
    if not data:
        raise HTTPException(422, "the uploaded file is empty; choose an image file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # beyond twice PIL's own limit
        raise HTTPException(413, f"the image has too many pixels ({err}); shrink it first") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise HTTPException(
            415, f"the file is not an image camkit can read; upload one of {', '.join(ACCEPTED_FORMATS)}"
        ) from err
    if im.format not in ACCEPTED_FORMATS:
        im.close()
        raise HTTPException(
            415, f"images in format {im.format} are not accepted; use one of {', '.join(ACCEPTED_FORMATS)}"
        )
    w, h = im.size
    if w * h > config.max_pixels:
        im.close()
        raise HTTPException(
            413,
            f"the image is {w}x{h} = {w * h} pixels, more than the limit of {config.max_pixels}; "
            "shrink it first (or start camkit serve with a larger --max-pixels)",
        )
    return im


def _decode(im: Image.Image) -> Image.Image:
    """An opened upload decoded to RGB (in a worker thread), or an HTTPException 415."""
    from camkit.io import to_rgb

    with im:
        try:
            im.load()
            return to_rgb(im)
        except (OSError, SyntaxError, ValueError) as err:
            raise HTTPException(
                415, f"the image could not be decoded ({err}); is the file complete?"
            ) from err


def _png_uri(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ExplainRequest:
    """What ``POST /api/explain`` asks for (the form's fields, the image aside).

    Attributes:
        model: a served model name.
        method: a method name.
        layer: a layer name or ``"auto"`` (empty: auto).
        target: a class index or name (empty: top-1).
        alpha: weight of the heatmap in the overlay.
        metrics: metric specs of :data:`camkit.metrics.METRICS` to compute for the map, among those the app
            offers (checked by :func:`camkit.app.metrics.choose_metrics`).
        boxes: the ground-truth boxes of the box metrics, ``(x0, y0, x1, y1)`` in the image's pixels.
    """

    model: str
    method: str = "gradcam"
    layer: str = "auto"
    target: str = ""
    alpha: float = 0.5
    metrics: tuple[str, ...] = ()
    boxes: tuple[tuple[float, ...], ...] = ()


class _Watch:
    """A request's cancellation as its work sees it: :meth:`check` between steps, :meth:`progress` after each batch
    of forward passes of a perturbation method (the forwards are counted in :class:`Activity`)."""

    def __init__(self, cancel: threading.Event, activity: Activity) -> None:
        self.cancel = cancel
        self.activity = activity
        self.counted = 0

    def check(self) -> None:
        """Raise :class:`Cancelled` once the client has disconnected."""
        if self.cancel.is_set():
            raise Cancelled("the client disconnected")

    def count(self, n: int) -> None:
        """Count ``n`` forward passes of the metrics."""
        self.activity.add("forwards", n)

    def again(self) -> _Watch:
        """A watch of the same request for another perturbation run (its own count of forwards done)."""
        return _Watch(self.cancel, self.activity)

    def progress(self, done: int, total: int) -> None:
        """The perturbation engine's ``f(done, total)``: count the forwards, stop when cancelled."""
        self.activity.add("forwards", done - self.counted)
        self.counted = done
        if self.cancel.is_set():
            with self.activity._lock:
                self.activity.last_stop = (done, total)
            raise Cancelled("the client disconnected")


def _explain(
    cache: ModelCache,
    picture: Callable[[], Image.Image],
    ask: ExplainRequest,
    config: AppConfig,
    watch: _Watch,
) -> dict[str, Any]:
    """One explanation, as the page reads it (run in a worker thread). ``watch`` is checked between the steps and
    after each batch of forward passes of a perturbation method. The model runs only the forwards the method needs:
    the top-5 are read from the explained forward's output (``Explanation.output``)."""
    from camkit.core.pipeline import explain
    from camkit.core.targets import TopK, parse_target
    from camkit.methods.engine import PerturbationOptions

    start = time.perf_counter()
    image = picture()
    watch.check()
    loaded = cache.get(ask.model)
    watch.check()
    spec = parse_target(ask.target.strip() or None)
    if isinstance(spec, TopK):
        raise CamkitError("the app explains one class: give a class index or name, not topK")
    expl = explain(
        loaded.model, [image], method=ask.method, layers=ask.layer.strip() or "auto", targets=spec,
        preprocess=loaded.preprocess, labels=loaded.labels,
        perturbation=PerturbationOptions(batch_size=config.batch_size, progress=watch.progress),
    )  # fmt: skip
    watch.check()
    answer = {"model": loaded.name, **_answer(expl, image, loaded, ask.alpha, config.max_side)}
    if ask.metrics:
        answer["metrics"] = _metrics(loaded, image, expl, ask, config, watch)
        watch.check()
    return {**answer, "seconds": time.perf_counter() - start}


def _metrics(
    loaded: LoadedModel,
    image: Image.Image,
    expl: Explanation,
    ask: ExplainRequest,
    config: AppConfig,
    watch: _Watch,
) -> list[dict[str, Any]]:
    """The metrics asked for, of the map just made (:func:`camkit.app.metrics.score_metrics`)."""
    from camkit.app.metrics import MetricJob, score_metrics

    job = MetricJob(ask.metrics, ask.boxes, ask.method, ask.layer.strip() or "auto", config.batch_size)
    return score_metrics(loaded, image, expl, job, watch)


def _top5(expl: Explanation, labels: list[str] | None) -> list[dict[str, Any]]:
    """The five most probable classes of the explained forward's output (none for an output that is not
    Tensor[B, classes])."""
    from camkit.report import top_predictions

    out = expl.output
    if out is None or out.dim() != 2:
        return []
    return [{"class": p.cls, "label": p.label, "prob": p.prob} for p in top_predictions(out[0], labels)]


def _answer(
    expl: Explanation, image: Image.Image, loaded: LoadedModel, alpha: float, max_side: int
) -> dict[str, Any]:
    """The JSON fields of an explanation: what was explained, the top-5, the boxes, the pictures and the map."""
    import numpy as np

    from camkit.localize import localize

    m = expl.maps[0].detach().float().cpu()
    boxes = localize(m[None], image_sizes=[image.size])[0]
    label = expl.labels[0] if expl.labels else None
    arr = np.ascontiguousarray(m.numpy(), dtype="<f4")
    return {
        "method": expl.method,
        "layers": expl.layers,
        "class": int(expl.classes[0]) if expl.classes is not None else None,
        "label": label if isinstance(label, str) else None,
        "prob": float(expl.probs[0]) if expl.probs is not None else None,
        "score": float(expl.scores[0]),
        "top5": _top5(expl, loaded.labels),
        "size": list(image.size),
        "boxes": [{"box": b.xyxy, "score": b.score} for b in boxes],
        "alpha": alpha,
        "overlay": _png_uri(expl.overlay(0, alpha=alpha, max_side=max_side)),
        "photo": _png_uri(expl.overlay(0, alpha=0.0, max_side=max_side)),
        "heatmap": _png_uri(expl.overlay(0, alpha=1.0, max_side=max_side)),
        "map": base64.b64encode(arr.tobytes()).decode("ascii"),
        "map_shape": list(arr.shape),
    }


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body was read) closes its connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def allow_host(app: FastAPI, host: str) -> None:
    """Accept ``host`` (e.g. the address the server is bound to) in the ``Host`` header of ``app``'s requests."""
    hosts: set[str] = app.state.hosts
    name = host.strip().lower()
    hosts.add(name[1:].partition("]")[0] if name.startswith("[") else name)


#: The ``detail`` of a 500: an exception that is neither camkit's own refusal nor one of the app's checks.
BUG_DETAIL = (
    "internal error ({kind}): this is a bug in camkit or in the model it ran, not a mistake in the request; the "
    "server's log holds its traceback: please report it"
)

_log = logging.getLogger("camkit.app")


class AppState:
    """What the app's routes share (``app.state.camkit``): the settings, the model cache, the limiter, the
    activity counters, the worker pool and the sample photos."""

    def __init__(self, config: AppConfig, page: str) -> None:
        self.config = config
        self.page = page
        self.cache = ModelCache(config)
        self.limiter = Limiter(config.workers + config.queue)
        self.activity = Activity()
        self._pools: list[
            ThreadPoolExecutor
        ] = []  # the running server's worker threads (new after a restart)
        self._lock = threading.Lock()
        self._samples: dict[str, Image.Image] = {}

    def pool(self) -> ThreadPoolExecutor:
        """The worker threads (started on first use)."""
        with self._lock:
            if not self._pools:
                pool = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="camkit-app")
                self._pools.append(pool)
            return self._pools[0]

    def shutdown(self) -> None:
        """Stop the worker threads: work still waiting never runs (the server is stopping)."""
        with self._lock:
            while self._pools:
                self._pools.pop().shutdown(wait=False, cancel_futures=True)

    def sample(self, name: str) -> Image.Image:
        """A sample photo by name, read once (422 for another name)."""
        from camkit.io import sample_image
        from camkit.io.images import SAMPLES

        if name not in SAMPLES:
            raise HTTPException(422, f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
        with self._lock:
            if name not in self._samples:
                self._samples[name] = sample_image(name)
            return self._samples[name]

    def served(self, model: str) -> str:
        """The served model name ``model`` stands for (422 when it is not served)."""
        try:
            return self.cache.check(model)
        except CamkitError as err:
            raise HTTPException(422, str(err)) from err

    def submit(self, fn: Callable[[threading.Event], T], cancel: threading.Event) -> Future[T]:
        """``fn(cancel)`` on the worker pool, counted in :attr:`activity`; the limiter's place (taken by the
        caller) is given back when it ends."""

        def job() -> T:
            if cancel.is_set():
                self.activity.add("dropped")
                raise Cancelled("the client disconnected before the work began")
            self.activity.add("started")
            try:
                result = fn(cancel)
            except Cancelled:
                self.activity.add("stopped")
                raise
            self.activity.add("finished")
            return result

        try:
            future: Future[T] = self.pool().submit(job)
        except BaseException:
            self.limiter.release()
            raise
        future.add_done_callback(lambda _: self.limiter.release())
        return future

    async def admitted(self, request: Request, fn: Callable[[threading.Event], T]) -> T:
        """Run ``fn(cancel)`` on the worker pool if there is room (else 503). A :class:`CamkitError` (camkit's own
        refusal of what was asked) becomes a 422 with its message; any other exception is a bug: a 500 saying so,
        its traceback in the server's log.

        If the client disconnects first, ``cancel`` is set: work still waiting for a thread never runs, running
        work stops at its next check; the place is given back when the work has stopped.
        """
        if not self.limiter.try_acquire():
            raise HTTPException(
                503,
                f"the server is busy ({self.limiter.capacity} requests running or waiting); try again in a moment",
                headers={"Retry-After": "1"},
            )
        cancel = threading.Event()
        future = self.submit(fn, cancel)
        work = asyncio.wrap_future(future)
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved also when no one waits
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            waited: set[asyncio.Future[Any]] = {work, gone}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                cancel.set()
                if future.cancel():  # still queued: it never runs
                    self.activity.add("dropped")
                raise HTTPException(499, "the client closed the connection; its work was dropped")
            return work.result()
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()
            raise
        except Exception as err:
            answer = _http_error(err)
            if answer is err:
                raise
            raise answer from err
        finally:
            gone.cancel()


def _http_error(err: Exception) -> HTTPException:
    """The answer to an exception raised by a request's work: as it is (an HTTPException), 499 (the client went
    away as its work began or ended), 422 (a :class:`CamkitError`), else 500 (a bug; its traceback logged)."""
    if isinstance(err, HTTPException):
        return err
    if isinstance(err, Cancelled):
        return HTTPException(499, "the client closed the connection; its work was dropped")
    if isinstance(err, CamkitError):
        return HTTPException(422, str(err))
    _log.error("a request failed with a bug", exc_info=err)
    return HTTPException(500, BUG_DETAIL.format(kind=type(err).__name__))


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.camkit
    return state


def index(request: Request) -> HTMLResponse:
    """``GET /``: the page."""
    return HTMLResponse(_state(request).page, headers={"Cache-Control": "no-store"})


def api_config(request: Request) -> dict[str, Any]:
    """``GET /api/config``: the defaults, the models served, the samples, the methods, the metrics and the upload
    limits."""
    from camkit.app.metrics import STEPS, metric_rows
    from camkit.io.images import SAMPLES
    from camkit.methods import get_method, method_names

    config = _state(request).config
    return {
        "model": config.model.strip(),
        "models": list(_state(request).cache.allowed),
        "pretrained": config.pretrained,
        "samples": list(SAMPLES),
        "methods": [_method_row(get_method(n)) for n in method_names()],
        "metrics": metric_rows(config.served_metrics),
        "metric_steps": STEPS,
        "max_bytes": config.max_bytes,
        "max_pixels": config.max_pixels,
        "formats": list(ACCEPTED_FORMATS),
    }


def _method_row(method: Method) -> dict[str, str]:
    """One method of ``/api/config``: its name, class, family, cost in passes per image and when to prefer it
    (the page shows the last two beside the method list, as ``camkit methods`` does)."""
    return {
        "name": method.name,
        "kind": type(method).__name__,
        "family": method.family,
        "cost": method.cost,
        "prefer": method.prefer,
    }


async def api_layers(request: Request, model: str = Query(...)) -> dict[str, Any]:
    """``GET /api/layers?model=NAME``: the model's hookable layers and its automatic choice."""
    state = _state(request)
    name = state.served(model)
    rows, auto = await state.admitted(request, lambda _cancel: state.cache.layers(name))
    return {"model": name, "layers": rows, "auto": auto}


async def _picture(state: AppState, file: UploadFile | None, sample: str) -> Callable[[], Image.Image]:
    """How the worker gets the request's image: the upload, checked here (bytes, type and pixels, from its header)
    and decoded there; or a sample photo."""
    config = state.config
    if file is not None and file.filename:
        data = await file.read(config.max_bytes + 1)
        if len(data) > config.max_bytes:
            raise HTTPException(
                413,
                f"the file is larger than the limit of {config.max_bytes} bytes; shrink it first (or start "
                "camkit serve with a larger --max-upload-mb)",
            )
        opened = _open_upload(data, config)  # header only: type and pixel limits before any decoding
        return lambda: _decode(opened)
    if sample:
        chosen = state.sample(sample)
        return lambda: chosen
    raise HTTPException(422, "no image: upload a file or pick a sample")


async def api_explain(
    request: Request,
    file: UploadFile | None = File(None),
    sample_name: str = Form("", alias="sample"),
    model: str = Form(""),
    method: str = Form("gradcam"),
    layer: str = Form("auto"),
    target: str = Form(""),
    alpha: float = Form(0.5),
    metrics: list[str] = Form([]),
    boxes: str = Form(""),
) -> JSONResponse:
    """``POST /api/explain``: one explanation (:func:`_explain`), with the metrics asked for."""
    from camkit.app.metrics import choose_metrics, parse_boxes
    from camkit.methods import get_method

    state = _state(request)
    if not 0.0 <= alpha <= 1.0:
        raise HTTPException(422, f"alpha is the heatmap's weight, within [0, 1]; got {alpha}")
    try:
        get_method(method)
        bound_method_cost(method)
        gt = parse_boxes(boxes)
        chosen = choose_metrics(metrics, bool(gt), state.config.served_metrics)
    except CamkitError as err:
        raise HTTPException(422, str(err)) from err
    name = state.served(model.strip() or state.config.model)
    ask = ExplainRequest(name, method, layer, target, alpha, chosen, gt)
    picture = await _picture(state, file, sample_name)
    result = await state.admitted(
        request,
        lambda cancel: _explain(state.cache, picture, ask, state.config, _Watch(cancel, state.activity)),
    )
    return JSONResponse(result)


#: The method settings that set how much work one explanation is (passes, samples, scales, blur kernel, batch
#: memory): a request may lower them, not raise them above the method's default (:func:`bound_method_cost`).
METHOD_COST_SETTINGS = frozenset(
    {"samples", "n", "n_similar", "scales", "batch_size", "groups", "kernel_size", "top_channels"}
)


def bound_method_cost(spec: str) -> None:
    """Refuse a method spec whose settings make one explanation cost more than the method's default
    (:data:`METHOD_COST_SETTINGS`): numbers above the default, more scales or a larger one. A local page's request
    must not hold a worker for hours; ``camkit explain`` takes any value.

    Raises:
        CamkitError: a setting above its default, naming it, the default and where larger values are allowed.
    """
    from camkit.methods.registry import method_parameters
    from camkit.methods.spec import parse_spec

    base, settings = parse_spec(spec)
    defaults = method_parameters(base)
    for key, value in (settings or {}).items():
        if key not in METHOD_COST_SETTINGS or key not in defaults:
            continue
        default = defaults[key]
        if _costlier(value, default):
            raise CamkitError(
                f"{base}: {key}={value!r} costs more than the app allows (at most the default, {default!r}); "
                "run `camkit explain` for larger values"
            )


def _costlier(value: object, default: object) -> bool:
    """Whether a cost setting ``value`` asks for more work than ``default`` (None: every channel, the most)."""
    if value is None:
        return default is not None
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        nums = [float(v) for v in value if isinstance(v, (int, float))]
        return len(value) > len(default) or bool(nums and max(nums) > max(float(d) for d in default))
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) > float(default)
    return default is not None and isinstance(value, (int, float))


def create_app(config: AppConfig | None = None) -> FastAPI:
    """The FastAPI application of ``camkit serve`` (``app.state.camkit``: the :class:`AppState` its routes share;
    ``app.state.models``: the :class:`ModelCache`; ``app.state.limiter``: the :class:`Limiter`;
    ``app.state.activity``: the :class:`Activity`; ``app.state.hosts``: the host names served, see
    :func:`allow_host`)."""
    config = config or AppConfig()
    state = AppState(config, _page())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.shutdown()

    app = FastAPI(title="camkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.camkit = state
    app.state.config = config
    app.state.models = state.cache
    app.state.limiter = state.limiter
    app.state.activity = state.activity
    app.state.hosts = {h.lower() for h in LOCAL_HOSTS}
    for host in config.allowed_hosts:
        allow_host(app, host)
    csp = content_security_policy(state.page)
    app.add_middleware(_Guard, config=config, hosts=app.state.hosts, activity=state.activity, csp=csp)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/api/config", api_config, methods=["GET"])
    app.add_api_route("/api/layers", api_layers, methods=["GET"])
    app.add_api_route("/api/explain", api_explain, methods=["POST"])
    return app
