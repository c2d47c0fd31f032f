"""Running the app: :func:`serve` (in the foreground, as ``camkit serve`` does) and :class:`BackgroundServer` (in a
thread, on a free port: tests and notebooks)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from types import TracebackType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from camkit.app.server import AppConfig, allow_host, create_app
from camkit.errors import CamkitError

__all__ = ["BackgroundServer", "GuardedH11Protocol", "is_loopback", "serve", "server_config"]

_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: 42\r\n\r\nthe request head did not arrive in time.\r\n"
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two deadlines uvicorn does not have: a request head (request line and headers)
    must arrive within :attr:`header_timeout` seconds of the connection's opening or of the previous answer (then a
    408 and the connection is closed), and a request body may not pause longer than :attr:`body_timeout` seconds
    (then the connection is closed). uvicorn's keep-alive timeout is cancelled by any byte received, so a client
    sending half a request line would otherwise hold its connection forever. :func:`_guarded_protocol` makes the
    subclass with the app's deadlines."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    _guard: asyncio.TimerHandle | None = None
    _guard_phase = ""

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._guard_phase = phase
        self._guard = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        self._guard_phase = ""

    def _follow(self) -> None:
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._guard_phase != "head":  # the head's deadline runs from the start, not from the last byte
                self._arm("head", self.header_timeout)
        elif state is h11.SEND_BODY:
            self._arm("body", self.body_timeout)  # restarted by each piece of the body
        else:
            self._disarm()

    def _expire(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        if (
            self._guard_phase == "head"
            and self.conn.their_state is h11.IDLE
            and (self.cycle is None or self.cycle.response_complete)
        ):
            self.transport.write(_TIMEOUT_408)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _guarded_protocol(header_timeout: float, body_timeout: float) -> type[asyncio.Protocol]:
    """:class:`GuardedH11Protocol` with these deadlines (seconds)."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )


def server_config(app: FastAPI, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn settings of the app: h11 with the head and body deadlines of ``app.state.config``
    (:attr:`AppConfig.header_timeout`, :attr:`AppConfig.body_timeout`)."""
    config: AppConfig = app.state.config
    return uvicorn.Config(
        app,
        http=_guarded_protocol(config.header_timeout, config.body_timeout),
        log_level="warning",
        timeout_graceful_shutdown=2,
        **kwargs,
    )


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
        raise CamkitError(f"cannot listen on {host}:{port} ({err}); choose another --port") from err
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
    allow_host(app, host)
    if preload:
        app.state.models.get(config.model)
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"camkit serve: http://{shown}:{sock.getsockname()[1]}/  (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(server_config(app))
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
        allow_host(self.app, host)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/"
        self._server = uvicorn.Server(server_config(self.app))
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
