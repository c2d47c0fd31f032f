"""``camkit serve``: the local web app (FastAPI + uvicorn, one plain page), on 127.0.0.1 by default."""

from __future__ import annotations

from typing import Annotated

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

__all__ = ["serve"]


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
        str | None,
        typer.Option(
            help="The models served, separated by commas (any other name is refused; the page opens on --model, "
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
        str | None,
        typer.Option(
            help="Host names accepted in requests besides the bound address, localhost, 127.0.0.1 and ::1, "
            "separated by commas (e.g. the machine's name when serving on a network)."
        ),
    ] = None,
    header_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a request's head; then 408 and the connection closed."
        ),
    ] = 10.0,
) -> None:
    """A local web app: upload a photo or pick a sample; choose the model, method, layer, class and alpha; see the
    overlay, the top-5, the boxes and the metrics chosen; download the overlay as PNG.

    Only the models of --models are served (default: --model and efficientnet_lite0). The model given by --model
    is loaded before the server starts, the others on first use, and kept within --cache-mb and --cache-models.
    --no-pretrained applies to every model (random weights drawn from --seed). Requests must name this server's
    address (or one of --allowed-hosts) and come from the app's own page (docs/app.md).
    """
    try:
        from camkit.app import AppConfig, is_loopback
        from camkit.app import serve as run_app
    except ImportError as err:
        fail(f"camkit serve needs FastAPI and uvicorn ({err}); install them with: pip install 'camkit[app]'")
        return
    with user_errors():
        if not 0 <= port <= 65535:
            raise CamkitError(f"--port must be within 0..65535, got {port}")
        if max_upload_mb <= 0:
            raise CamkitError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        if cache_mb <= 0:
            raise CamkitError(f"--cache-mb must be positive, got {cache_mb}")
        if header_timeout <= 0:
            raise CamkitError(f"--header-timeout must be a positive number of seconds, got {header_timeout}")
        served = tuple(n.strip() for n in models.split(",") if n.strip()) if models is not None else ()
        if models is not None and not served:
            raise CamkitError("--models needs at least one model name (names separated by commas)")
        if served and model.strip() not in served and model == "efficientnet_lite0":
            model = served[0]  # the default --model gives way to the first model served
        hosts = tuple(h.strip() for h in allowed_hosts.split(",") if h.strip()) if allowed_hosts else ()
        if threads is not None:
            if threads < 1:
                raise CamkitError(f"--threads must be at least 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        config = AppConfig(
            model=model,
            pretrained=pretrained,
            seed=seed,
            device=device,
            max_bytes=int(max_upload_mb * 1_000_000),
            max_pixels=max_pixels,
            workers=workers,
            queue=queue,
            models=served,
            cache_models=cache_models,
            cache_bytes=max(1, int(cache_mb * 1_000_000)),
            allowed_hosts=hosts,
            header_timeout=header_timeout,
            prompts=tuple(prompt or ()),
        )
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
    try:
        with user_errors():
            run_app(config, host=host, port=port)
    except KeyboardInterrupt:
        pass
