"""The web app behind ``camkit serve``: a FastAPI application with one plain page and a small JSON API.

* ``GET /``: the page (vanilla HTML, CSS and script, shipped inside the package: nothing is fetched elsewhere).
* ``GET /api/config``: the defaults, the sample photos, the methods and the upload limits.
* ``GET /api/layers?model=NAME``: the model's hookable layers and its automatic choice.
* ``POST /api/explain`` (multipart form): ``file`` (an upload) or ``sample``, ``model``, ``method``, ``layer``,
  ``target`` (index or name, empty: top-1), ``alpha`` -> the overlay as a PNG ``data:`` URI, the map
  (float32, base64), the top-5, the explained class, the boxes.

Errors are JSON ``{"detail": message}``: 413 for an upload over the byte or pixel limit, 415 for a file that is not
an image of an accepted format, 422 for a wrong parameter (unknown model, method, layer or class), 503 when every
worker is busy and the queue is full.

Models are loaded once per name and kept (the last :attr:`AppConfig.cache_models` used). Explanations run on a
pool of :attr:`AppConfig.workers` threads sharing the models: :func:`camkit.explain` is safe to call from many
threads on one model (README, "Concurrency"). At most ``workers + queue`` requests are admitted at once; the
next one is answered 503 at once rather than waiting.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from camkit.io import LoadedModel

__all__ = ["ACCEPTED_FORMATS", "AppConfig", "Limiter", "ModelCache", "create_app"]

#: Image formats an upload may have (PIL's format names).
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

T = TypeVar("T")


@dataclass(frozen=True)
class AppConfig:
    """The app's settings (``camkit serve`` options).

    Attributes:
        model: the model selected when the page opens (any name :func:`camkit.load_model` accepts).
        pretrained: load the libraries' pretrained weights (False: random weights drawn from ``seed``, for tests).
        seed: torch's seed before a model is built with random weights.
        device: where the models run.
        max_bytes: largest upload, in bytes (413 above).
        max_pixels: largest upload, in pixels (width x height, read from the header before decoding; 413 above).
        workers: threads explaining at once.
        queue: requests admitted beyond ``workers``, waiting for a thread; the next are answered 503.
        cache_models: models kept in memory (least recently used dropped first).
        max_side: the longer side of the overlay returned, in pixels.
        input_size: classifiers only: resize images to this square size instead of the model's own (smaller is
            faster on a CPU, coarser maps); None: the model's size.
    """

    model: str = "efficientnet_lite0"
    pretrained: bool = True
    seed: int = 0
    device: str = "cpu"
    max_bytes: int = 10_000_000
    max_pixels: int = 25_000_000
    workers: int = 2
    queue: int = 8
    cache_models: int = 3
    max_side: int = 1024
    input_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "workers", "cache_models", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AppConfig.{name} must be a positive int, got {value!r}")
        if self.input_size is not None and (
            isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 16
        ):
            raise ValueError(f"AppConfig.input_size must be None or an int >= 16, got {self.input_size!r}")
        if isinstance(self.queue, bool) or not isinstance(self.queue, int) or self.queue < 0:
            raise ValueError(f"AppConfig.queue must be an int >= 0, got {self.queue!r}")


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


class ModelCache:
    """Models by name, each loaded once (concurrent first requests for one name wait for the same load)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._layers: dict[str, tuple[list[dict[str, Any]], str]] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def cached(self, name: str) -> LoadedModel | None:
        """The model if it is loaded, else None (never loads)."""
        with self._lock:
            return self._models.get(name.strip())

    def get(self, name: str) -> LoadedModel:
        """The model called ``name``, loaded on first use.

        Raises:
            ValueError: the name is empty or the model cannot be built (unknown name, weights not available).
        """
        import torch

        import camkit

        key = name.strip()
        if not key:
            raise ValueError("no model name given")
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                if not self.config.pretrained:
                    torch.manual_seed(self.config.seed)
                loaded = camkit.load_model(key, pretrained=self.config.pretrained, device=self.config.device)
                size = self.config.input_size
                if size is not None and loaded.task == "classification":
                    loaded.preprocess = replace(loaded.preprocess, size=(size, size))
            except Exception as err:  # any failure to build is the user's choice of name: a 422 with why
                raise ValueError(f"cannot load model {key!r}: {err}") from err
            with self._lock:
                self._models[key] = loaded
                while len(self._models) > self.config.cache_models:
                    dropped, _ = self._models.popitem(last=False)
                    self._layers.pop(dropped, None)
                self._loading.pop(key, None)
            return loaded

    def layers(self, name: str) -> tuple[list[dict[str, Any]], str]:
        """The hookable layers of a model (name, type, feature-map shape) and the automatic choice."""
        import torch

        from camkit.layers import describe_layers, pick_auto

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
        auto = pick_auto(infos) or (str(rows[-1]["name"]) if rows else "")
        with self._lock:
            self._layers[key] = (rows, auto)
        return rows, auto


def _page() -> str:
    return resources.files("camkit.app").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")


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


def _explain(
    cache: ModelCache,
    picture: Image.Image,
    model: str,
    method: str,
    layer: str,
    target: str,
    alpha: float,
    config: AppConfig,
) -> dict[str, Any]:
    """One explanation, as the page reads it (run in a worker thread)."""
    import numpy as np
    import torch

    from camkit.localize import localize
    from camkit.outputs import logits_of
    from camkit.pipeline import explain
    from camkit.report import top_predictions
    from camkit.targets import TopK, parse_target

    start = time.perf_counter()
    loaded = cache.get(model)
    spec = parse_target(target.strip() or None)
    if isinstance(spec, TopK):
        raise ValueError("the app explains one class: give a class index or name, not topK")
    x = loaded.preprocess([picture]).to(config.device)
    with torch.no_grad():
        out = loaded.model(x)
    try:
        logits = logits_of(out)
        top5 = top_predictions(logits[0], loaded.labels) if logits.dim() == 2 else []
    except (TypeError, ValueError):
        top5 = []
    expl = explain(
        loaded.model, [picture], method=method, layers=layer.strip() or "auto", targets=spec,
        preprocess=loaded.preprocess, labels=loaded.labels,
    )  # fmt: skip
    m = expl.maps[0].detach().float().cpu()
    boxes = localize(m[None], image_sizes=[picture.size])[0]
    label = expl.labels[0] if expl.labels else None
    arr = np.ascontiguousarray(m.numpy(), dtype="<f4")
    return {
        "model": loaded.name,
        "method": expl.method,
        "layers": expl.layers,
        "class": int(expl.classes[0]) if expl.classes is not None else None,
        "label": label if isinstance(label, str) else None,
        "prob": float(expl.probs[0]) if expl.probs is not None else None,
        "score": float(expl.scores[0]),
        "top5": [{"class": p.cls, "label": p.label, "prob": p.prob} for p in top5],
        "size": list(picture.size),
        "boxes": [{"box": b.xyxy, "score": b.score} for b in boxes],
        "overlay": _png_uri(expl.overlay(0, alpha=alpha, max_side=config.max_side)),
        "map": base64.b64encode(arr.tobytes()).decode("ascii"),
        "map_shape": list(arr.shape),
        "seconds": time.perf_counter() - start,
    }


def create_app(config: AppConfig | None = None) -> FastAPI:
    """The FastAPI application of ``camkit serve`` (``app.state.models``: the :class:`ModelCache`;
    ``app.state.limiter``: the :class:`Limiter`)."""
    from camkit.io import sample_image
    from camkit.io.images import SAMPLES
    from camkit.methods import get_method, method_names

    config = config or AppConfig()
    cache = ModelCache(config)
    limiter = Limiter(config.workers + config.queue)
    pools: list[ThreadPoolExecutor] = []  # the running server's worker threads (a new pool after a restart)
    pools_lock = threading.Lock()

    def pool() -> ThreadPoolExecutor:
        with pools_lock:
            if not pools:
                pools.append(ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="camkit-app"))
            return pools[0]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        with pools_lock:
            while pools:
                pools.pop().shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="camkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.config = config
    app.state.models = cache
    app.state.limiter = limiter
    samples: dict[str, Image.Image] = {}
    samples_lock = threading.Lock()

    def sample(name: str) -> Image.Image:
        if name not in SAMPLES:
            raise HTTPException(422, f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
        with samples_lock:
            if name not in samples:
                samples[name] = sample_image(name)
            return samples[name]

    async def admitted(fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker pool if there is room (else 503); user errors (as the command line counts
        them: ValueError, KeyError, TypeError, RuntimeError) become 422 with their message."""
        if not limiter.try_acquire():
            raise HTTPException(
                503,
                f"the server is busy ({limiter.capacity} requests running or waiting); try again in a moment",
                headers={"Retry-After": "1"},
            )
        try:
            return await asyncio.get_running_loop().run_in_executor(pool(), fn)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # the CLI's user errors (exit 2)
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise HTTPException(422, str(message)) from err
        finally:
            limiter.release()

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})

    @app.get("/api/config")
    def api_config() -> dict[str, Any]:
        methods = []
        for name in method_names():
            kind = type(get_method(name)).__name__
            methods.append({"name": name, "kind": kind})
        return {
            "model": config.model,
            "pretrained": config.pretrained,
            "samples": list(SAMPLES),
            "methods": methods,
            "max_bytes": config.max_bytes,
            "max_pixels": config.max_pixels,
            "formats": list(ACCEPTED_FORMATS),
        }

    @app.get("/api/layers")
    async def api_layers(model: str = Query(...)) -> dict[str, Any]:
        rows, auto = await admitted(lambda: cache.layers(model))
        return {"model": model.strip(), "layers": rows, "auto": auto}

    @app.post("/api/explain")
    async def api_explain(
        file: UploadFile | None = File(None),
        sample_name: str = Form("", alias="sample"),
        model: str = Form(""),
        method: str = Form("gradcam"),
        layer: str = Form("auto"),
        target: str = Form(""),
        alpha: float = Form(0.5),
    ) -> JSONResponse:
        if not 0.0 <= alpha <= 1.0:
            raise HTTPException(422, f"alpha is the heatmap's weight, within [0, 1]; got {alpha}")
        try:
            get_method(method)
        except (ValueError, KeyError) as err:
            raise HTTPException(422, str(err)) from err
        if file is not None and file.filename:
            data = await file.read(config.max_bytes + 1)
            if len(data) > config.max_bytes:
                raise HTTPException(
                    413,
                    f"the file is larger than the limit of {config.max_bytes} bytes; shrink it first (or start "
                    "camkit serve with a larger --max-upload-mb)",
                )
            opened = _open_upload(data, config)  # header only: type and pixel limits before any decoding

            def picture() -> Image.Image:
                return _decode(opened)

        elif sample_name:
            chosen = sample(sample_name)

            def picture() -> Image.Image:
                return chosen

        else:
            raise HTTPException(422, "no image: upload a file or pick a sample")
        name = model.strip() or config.model
        result = await admitted(
            lambda: _explain(cache, picture(), name, method, layer, target, alpha, config)
        )
        return JSONResponse(result)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Callable[[Request], Any]) -> Any:
        """Refuse a body announced larger than the upload limit (plus room for the form) before reading it."""
        length = request.headers.get("content-length")
        if request.method == "POST" and length is not None and length.isdigit():
            if int(length) > config.max_bytes + 64_000:
                return JSONResponse(
                    {
                        "detail": f"the upload is larger than the limit of {config.max_bytes} bytes; shrink it first"
                    },
                    status_code=413,
                )
        return await call_next(request)

    return app
