"""Running the app: :func:`serve` (in the foreground, as ``camkit serve`` does) and :class:`BackgroundServer` (in a
thread, on a free port: tests and notebooks)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from camkit.app.server import AppConfig, create_app

__all__ = ["BackgroundServer", "is_loopback", "serve"]


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({err}); choose another --port") from err
    sock.listen(128)
    return sock


def serve(
    config: AppConfig | None = None, host: str = "127.0.0.1", port: int = 8000, preload: bool = True
) -> None:
    """Serve the app until interrupted.

    Args:
        config: the app's settings.
        host: the address to listen on; anything but loopback makes the app reachable from other machines (it
            has no authentication).
        port: the port (0: any free one, printed).
        preload: load ``config.model`` before the first request.
    """
    config = config or AppConfig()
    app = create_app(config)
    if preload:
        app.state.models.get(config.model)
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"camkit serve: http://{shown}:{sock.getsockname()[1]}/  (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])


class BackgroundServer:
    """The app served from a daemon thread on a free loopback port, as a context manager.

    >>> with BackgroundServer(AppConfig(model="resnet18", pretrained=False)) as srv:
    ...     httpx.get(srv.url + "api/config")
    """

    def __init__(
        self, config: AppConfig | FastAPI | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app = config if isinstance(config, FastAPI) else create_app(config)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
