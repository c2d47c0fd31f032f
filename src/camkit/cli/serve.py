"""``camkit serve``: the local web app (FastAPI + uvicorn, one plain page), on 127.0.0.1 by default."""

from __future__ import annotations

from typing import Annotated

import typer

from camkit.cli.common import (
    DeviceOption,
    ModelOption,
    PretrainedOption,
    SeedOption,
    ThreadsOption,
    err_console,
    error_line,
    fail,
    user_errors,
)

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
    device: DeviceOption = "cpu",
    workers: Annotated[
        int, typer.Option(help="Explanations computed at once (threads sharing the models).")
    ] = 2,
    queue: Annotated[int, typer.Option(help="Requests waiting beyond --workers; more are answered 503.")] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload, in megabytes (413 above).")] = 10.0,
    max_pixels: Annotated[
        int, typer.Option(help="Largest upload, in pixels, read from the header before decoding (413 above).")
    ] = 25_000_000,
) -> None:
    """A local web app: upload a photo or pick a sample; choose the model, method, layer, class and alpha; see the
    overlay, the top-5 and the boxes; download the overlay as PNG.

    The model given by --model is loaded before the server starts; others typed in the page are loaded on first
    use and kept. --no-pretrained applies to every model (random weights drawn from --seed).
    """
    try:
        from camkit.app import AppConfig, is_loopback
        from camkit.app import serve as run_app
    except ImportError as err:
        fail(f"camkit serve needs FastAPI and uvicorn ({err}); install them with: pip install 'camkit[app]'")
        return
    with user_errors():
        if not 0 <= port <= 65535:
            raise ValueError(f"--port must be within 0..65535, got {port}")
        if max_upload_mb <= 0:
            raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"--threads must be at least 1, got {threads}")
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
        )
        if not is_loopback(host):
            err_console.print(
                error_line(
                    f"--host {host} makes the app reachable from other machines; it has no authentication and "
                    "runs models on their uploads. Use it only on a network you trust.",
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
