"""``camkit layers``: the hookable layers of a model, their output shapes, the automatic choice marked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from camkit.cli.common import (
    DeviceOption,
    ModelOptions,
    PromptOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    load_model,
    user_errors,
)
from camkit.cli.output import Format, FormatOption, emit, note
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from camkit.core.layers import LayerInfo

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
    prompt: PromptOption = None,
    device: DeviceOption = "cpu",
    all_layers: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also list pass-through modules (Identity, Dropout, DropPath, Flatten: their output is their "
            "input in eval mode) and layers whose output is not a feature map.",
        ),
    ] = False,
    fmt: FormatOption = Format.table,
) -> None:
    """List the hookable layers of a model with their output shapes; the automatic choice is marked."""
    import torch

    import camkit
    from camkit.core.layers import pick_auto

    with user_errors():
        if model_name is not None and model is not None and model_name != model:
            raise CamkitError(f"two models given: {model_name!r} and --model {model!r}; give one")
        name = model_name or model or "efficientnet_lite0"
        loaded = load_model(
            ModelOptions(name, weights, pretrained, seed, threads, device, prompts=tuple(prompt or ()))
        )
        h, w = loaded.preprocess.size
        frames = (
            getattr(loaded.preprocess, "frames", 0) if loaded.task == "video" else 0
        )  # a clip [1, 3, T, H, W]
        shape = (1, 3, frames, h, w) if frames else (1, 3, h, w)
        infos = camkit.describe_layers(loaded.model, torch.zeros(*shape, device=device))
        auto = pick_auto(infos, loaded.model)
        _print(f"{loaded.name}: layers at input 3x{h}x{w} (forward order)", infos, auto, all_layers, fmt)


#: Modules whose output is their input in eval mode: hidden by ``camkit layers`` unless ``--all``.
PASS_THROUGH = frozenset(
    {
        "Identity",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "AlphaDropout",
        "FeatureAlphaDropout",
        "DropPath",
        "StochasticDepth",
        "DropBlock2d",
        "Flatten",
        "Unflatten",
    }
)


def _shown(infos: list[LayerInfo], auto: str | None, all_layers: bool) -> list[LayerInfo]:
    """The layers listed: all with ``all_layers``, else those with a feature map that are not pass-through
    modules (the automatic choice always)."""
    if all_layers:
        return list(infos)
    return [i for i in infos if i.name == auto or (i.spatial is not None and i.type not in PASS_THROUGH)]


def _shape(info: LayerInfo) -> str:
    shape = "x".join(map(str, info.spatial or info.shape or ())) or "-"
    if info.layout is not None and info.layout.describe():
        shape += f" ({info.layout.describe()})"
    return shape


def _print(title: str, infos: list[LayerInfo], auto: str | None, all_layers: bool, fmt: Format) -> None:
    """The layer listing in ``fmt`` (the automatic choice marked in the table, a column in tsv/json)."""
    shown = _shown(infos, auto, all_layers)
    hidden = len(infos) - len(shown)
    extra = f" · {hidden} pass-through or non-map layers hidden (--all lists them)" if hidden else ""
    columns = ("name", "type", "output", "calls", "auto")
    rows = [(i.name, i.type, _shape(i), i.calls, i.name == auto) for i in shown]
    if fmt is not Format.table:
        emit(title, columns, rows, fmt)
        note(f"auto: {auto}{extra}", fmt)
        return
    table = Table(title=title)
    table.add_column("name", overflow="fold")
    for col in ("type", "output (C, h, w)", "calls", ""):
        table.add_column(col, overflow="fold")
    for name, type_, shape, calls, is_auto in rows:
        table.add_row(
            Text(name),
            Text(type_),
            Text(shape),
            str(calls),
            Text("<- auto", style="bold green") if is_auto else "",
        )
    emit(title, columns, rows, fmt, table=table)
    note(f"auto: {auto}{extra}", fmt)
