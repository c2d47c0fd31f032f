"""``camkit layers``: the hookable layers of a model, their output shapes, the automatic choice marked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    DeviceOption,
    ModelOptions,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    console,
    load_model,
    user_errors,
)

if TYPE_CHECKING:
    from camkit.layers import LayerInfo

__all__ = ["layers"]


def layers(
    model_name: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL", help="Model name (efficientnet_lite0, resnet50, ...); or give it with --model."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="The model, as with the other commands (default efficientnet_lite0)."),
    ] = None,
    weights: WeightsOption = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Load the pretrained weights too (layers and shapes do not depend on them; default: random "
            "weights drawn from --seed, nothing downloaded).",
        ),
    ] = False,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    device: DeviceOption = "cpu",
    all_layers: Annotated[
        bool, typer.Option("--all", help="Also list layers whose output is not a feature map.")
    ] = False,
) -> None:
    """List the hookable layers of a model with their output shapes; the automatic choice is marked."""
    import torch

    import camkit
    from camkit.layers import pick_auto

    with user_errors():
        if model_name is not None and model is not None and model_name != model:
            raise ValueError(f"two models given: {model_name!r} and --model {model!r}; give one")
        name = model_name or model or "efficientnet_lite0"
        loaded = load_model(ModelOptions(name, weights, pretrained, seed, threads, device))
        h, w = loaded.preprocess.size
        infos = camkit.describe_layers(loaded.model, torch.zeros(1, 3, h, w, device=device))
        auto = pick_auto(infos)
        console.print(
            _table(f"{loaded.name}: layers at input 3x{h}x{w} (forward order)", infos, auto, all_layers)
        )
        console.print(f"auto: [bold]{auto}[/]")


def _table(title: str, infos: list[LayerInfo], auto: str | None, all_layers: bool) -> Table:
    """One row per layer with a feature map (every layer with ``all_layers``), in forward order."""
    table = Table(title=title)
    table.add_column("name", overflow="fold")
    for col in ("type", "output (C, h, w)", "calls", ""):
        table.add_column(col)
    for info in infos:
        spatial = info.spatial is not None  # NCHW, channels-last or tokens (camkit.tokens)
        if not (all_layers or spatial):
            continue
        mark = "[bold green]<- auto[/]" if info.name == auto else ""
        shape = "x".join(map(str, info.spatial or info.shape or ())) or "-"
        if info.layout is not None and info.layout.describe():
            shape += f" ({info.layout.describe()})"
        table.add_row(info.name, info.type, shape, str(info.calls), mark)
    return table
