"""The local web app of ``camkit serve``: upload a photo (or pick a sample), choose the model, method, layer,
class and alpha, and see the overlay, the top-5, the boxes and, when chosen, metrics of the map (the metric
registry's: :mod:`camkit.app.metrics`).

>>> from camkit.app import AppConfig, create_app, serve
>>> serve(AppConfig(model="efficientnet_lite0"), host="127.0.0.1", port=8000)   # blocks; Ctrl-C stops

FastAPI and uvicorn (``pip install camkit[app]``) serve one plain page with a small script: no asset is fetched
from anywhere else, so the app works offline. :class:`BackgroundServer` runs it in a thread (tests, notebooks).
What the app accepts and refuses (hosts, origins, models, sizes, timeouts, disconnections) is in docs/app.md.
"""

from camkit.app.run import BackgroundServer, is_loopback, serve, server_config
from camkit.app.server import (
    ACCEPTED_FORMATS,
    Activity,
    AppConfig,
    Limiter,
    ModelCache,
    allow_host,
    create_app,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "Activity",
    "AppConfig",
    "BackgroundServer",
    "Limiter",
    "ModelCache",
    "allow_host",
    "create_app",
    "is_loopback",
    "serve",
    "server_config",
]
