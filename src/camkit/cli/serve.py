"""``camkit serve``: the local web app (FastAPI + uvicorn, one plain page), on 127.0.0.1 by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from camkit.cli.common import (
    DeviceOption,
    ModelOption,
    PretrainedOption,
    PromptOption,
    SeedOption,
    ThreadsOption,
    err_console,
    error_line,
    fail,
    user_errors,
)
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.app import AppConfig

__all__ = ["ServeArgs", "serve"]


def serve(
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Anything but 127.0.0.1 / ::1 / localhost exposes the app "
            "(no authentication) to other machines: a warning is printed."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port, printed).")] = 8000,
    model: ModelOption = "efficientnet_lite0",
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    prompt: PromptOption = None,
    device: DeviceOption = "cpu",
    workers: Annotated[
        int, typer.Option(help="Explanations computed at once (threads sharing the models).")
    ] = 2,
    queue: Annotated[int, typer.Option(help="Requests waiting beyond --workers; more are answered 503.")] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload, in megabytes (413 above).")] = 10.0,
    max_pixels: Annotated[
        int, typer.Option(help="Largest upload, in pixels, read from the header before decoding (413 above).")
    ] = 25_000_000,
    models: Annotated[
        list[str] | None,
        typer.Option(
            help="The models served, separated by commas or the option repeated (any other name is refused; the page opens on --model, "
            "or on the first of these when --model is not given). Default: --model and efficientnet_lite0."
        ),
    ] = None,
    cache_mb: Annotated[
        float,
        typer.Option(
            help="Memory for the models kept loaded (parameters and buffers, in megabytes; least "
            "recently used dropped first)."
        ),
    ] = 2000.0,
    cache_models: Annotated[int, typer.Option(help="Models kept loaded at most.")] = 3,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            help="Host names accepted in requests besides the bound address, localhost, 127.0.0.1 and ::1, "
            "separated by commas or the option repeated (e.g. the machine's name when serving on a network)."
        ),
    ] = None,
    header_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a request's head; then 408 and the connection closed."
        ),
    ] = 10.0,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            help="The metrics the app offers, separated by commas or the option repeated (names of the metric registry, or all; any "
            "other is refused). Default: all but max_sensitivity, avg_sensitivity and mprt, which explain the "
            "image many times again (docs/app.md)."
        ),
    ] = None,
) -> None:
    """A local web app: upload a photo or pick a sample; choose the model, method, layer, class and alpha; see the
    overlay, the top-5, the boxes and the metrics chosen; download the overlay as PNG.

    Only the models of --models are served (default: --model and efficientnet_lite0). The model given by --model
    is loaded before the server starts, the others on first use, and kept within --cache-mb and --cache-models.
    --no-pretrained applies to every model (random weights drawn from --seed). Only the metrics of --metrics are
    offered. Requests must name this server's address (or one of --allowed-hosts) and come from the app's own page
    (docs/app.md).
    """
    args = ServeArgs(
        host, port, model, pretrained, seed, threads, tuple(prompt or ()), device, workers, queue, max_upload_mb,
        max_pixels, _joined(models), cache_mb, cache_models, _joined(allowed_hosts), header_timeout,
        _joined(metrics),
    )  # fmt: skip
    try:
        from camkit.app import serve as run_app
    except ImportError as err:
        fail(f"camkit serve needs FastAPI and uvicorn ({err}); install them with: pip install 'camkit[app]'")
        return
    with user_errors():
        config = _config(args)
        _warn_if_exposed(host)
    try:
        with user_errors():
            run_app(config, host=host, port=port)
    except KeyboardInterrupt:
        pass


def _joined(given: list[str] | None) -> str | None:
    """A list option that may be repeated (``--models a --models b``) as one comma-separated text, in order; None
    when it is not given."""
    return None if given is None else ",".join(given)


@dataclass(frozen=True)
class ServeArgs:
    """The options of ``camkit serve`` as given on the command line (see :func:`serve`)."""

    host: str
    port: int
    model: str
    pretrained: bool
    seed: int
    threads: int | None
    prompts: tuple[str, ...]
    device: str
    workers: int
    queue: int
    max_upload_mb: float
    max_pixels: int
    models: str | None
    cache_mb: float
    cache_models: int
    allowed_hosts: str | None
    header_timeout: float
    metrics: str | None


def _names(text: str | None, option: str, what: str) -> tuple[str, ...]:
    """A comma-separated option's names (empty when the option is not given).

    Raises:
        CamkitError: the option given without any name.
    """
    if text is None:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise CamkitError(f"{option} needs at least one {what} name (names separated by commas)")
    return names


def _config(a: ServeArgs) -> AppConfig:
    """The app's settings from the options, checked (one-line errors).

    Raises:
        CamkitError: a value out of range, an empty list.
    """
    from camkit.app import AppConfig

    if not 0 <= a.port <= 65535:
        raise CamkitError(f"--port must be within 0..65535, got {a.port}")
    if a.max_upload_mb <= 0:
        raise CamkitError(f"--max-upload-mb must be positive, got {a.max_upload_mb}")
    if a.cache_mb <= 0:
        raise CamkitError(f"--cache-mb must be positive, got {a.cache_mb}")
    if a.header_timeout <= 0:
        raise CamkitError(f"--header-timeout must be a positive number of seconds, got {a.header_timeout}")
    served = _names(a.models, "--models", "model")
    model = a.model
    if served and model.strip() not in served and model == "efficientnet_lite0":
        model = served[0]  # the default --model gives way to the first model served
    if a.threads is not None:
        if a.threads < 1:
            raise CamkitError(f"--threads must be at least 1, got {a.threads}")
        import torch

        torch.set_num_threads(a.threads)
    return AppConfig(
        model=model,
        pretrained=a.pretrained,
        seed=a.seed,
        device=a.device,
        max_bytes=int(a.max_upload_mb * 1_000_000),
        max_pixels=a.max_pixels,
        workers=a.workers,
        queue=a.queue,
        models=served,
        cache_models=a.cache_models,
        cache_bytes=max(1, int(a.cache_mb * 1_000_000)),
        allowed_hosts=tuple(h.strip() for h in (a.allowed_hosts or "").split(",") if h.strip()),
        header_timeout=a.header_timeout,
        prompts=a.prompts,
        metrics=_names(a.metrics, "--metrics", "metric"),
    )


def _warn_if_exposed(host: str) -> None:
    """Warn on stderr when ``host`` is not a loopback address."""
    from camkit.app import is_loopback

    if not is_loopback(host):
        err_console.print(
            error_line(
                f"--host {host} makes the app reachable from other machines; it has no authentication and "
                "runs models on their uploads. Use it only on a network you trust; requests must name this "
                "address or one of --allowed-hosts in their Host header.",
                label="warning:",
                style="bold yellow",
            ),
            highlight=False,
            soft_wrap=True,
        )
