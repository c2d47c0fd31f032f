"""``camkit report``: one self-contained HTML file (photos, top-5, methods x layers overlays, boxes, metrics)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    DeviceOption,
    ImagesArgument,
    LayersOption,
    MaxPixelsOption,
    ModelOption,
    ModelOptions,
    PretrainedOption,
    SampleOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    console,
    err_console,
    load_model,
    max_pixels_limit,
    read_or_skip,
    resolve_inputs,
    split,
    user_errors,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["report"]


def report(
    images: ImagesArgument = None,
    model: ModelOption = "efficientnet_lite0",
    weights: WeightsOption = None,
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    methods: Annotated[
        str, typer.Option("--methods", "--method", "-m", help="CAM methods, comma-separated.")
    ] = "gradcam",
    layers: LayersOption = "auto",
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Class index or name (default: each image's top-1).")
    ] = None,
    metrics: Annotated[
        str,
        typer.Option(
            help="Metrics per image and method, comma-separated: deletion, insertion, avg_drop, increase."
        ),
    ] = "",
    steps: Annotated[int, typer.Option(help="Steps of the deletion / insertion curves.")] = 20,
    threshold: Annotated[
        str, typer.Option(help="Localisation threshold: fraction of the max (0.2), value:0.5, or otsu.")
    ] = "0.2",
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "camkit report",
    per_page: Annotated[int, typer.Option(help="Images per page.")] = 20,
    thumb_side: Annotated[int, typer.Option(help="Longer side of the thumbnails, pixels.")] = 224,
    full_side: Annotated[
        int,
        typer.Option(help="Longer side of the view on click, pixels (0: thumbnails only, smallest file)."),
    ] = 800,
    image_format: Annotated[str, typer.Option("--format", help="Picture format: webp or jpeg.")] = "webp",
    quality: Annotated[int, typer.Option(help="Picture quality, 1-100.")] = 80,
    alpha: Annotated[float, typer.Option(help="Weight of the heatmap in the overlays.")] = 0.5,
    cmap: Annotated[str, typer.Option(help="Colormap of the overlays.")] = "jet",
    sample: SampleOption = "chelsea",
    device: DeviceOption = "cpu",
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
) -> None:
    """One HTML file that opens offline: per image the photo, the top-5, methods x layers overlays, the boxes and
    the metrics asked for; a sortable, filterable table over the images; pages of --per-page images.

    Exit status: 0 when every image is in the report, 1 when some inputs could not be read (each named on stderr,
    the others reported), 2 on a usage error or when no image could be read.
    """
    from camkit.localize import parse_threshold
    from camkit.methods import get_method
    from camkit.report import ReportOptions, build_records, write_report
    from camkit.targets import parse_target
    from camkit.viz import colormap_table

    opts = ModelOptions(model, weights, pretrained, seed, threads, device)
    failed: list[str] = []
    with user_errors():
        method_list = split(methods)
        if not method_list:
            raise ValueError("--methods is empty: give at least one method (see `camkit methods`)")
        for m in method_list:
            get_method(m)
        metric_list = split(metrics)
        parsed = parse_threshold(threshold)
        spec = parse_target(target)
        colormap_table(cmap)
        options = ReportOptions(
            title=title,
            per_page=per_page,
            thumb_side=thumb_side,
            full_side=full_side,
            format=image_format,
            quality=quality,
            cmap=cmap,
            alpha=alpha,
        )
        if out.is_dir():
            raise ValueError(
                f"--out {str(out)!r} is a folder; give the report's file name, e.g. {str(out / 'report.html')!r}"
            )
        if not out.parent.exists():
            raise ValueError(f"the folder of --out {str(out)!r} does not exist")
        limit = max_pixels_limit(max_pixels)
        inputs = resolve_inputs(images, sample, "")
        loaded = load_model(opts)
        options = replace(
            options,
            meta=f"{len(inputs)} images · model {loaded.name} · {', '.join(method_list)} · layers {layers}",
        )

        def pictures() -> Iterator[tuple[str, Image.Image | Path]]:
            for item in inputs:
                pil = read_or_skip(item, limit, alone=len(inputs) == 1)
                if pil is None:
                    failed.append(item.name)
                    continue
                yield item.name, pil

        records = build_records(loaded, pictures(), method_list, layers, spec, metric_list, steps, parsed)
        stats = write_report(records, out, options)
        console.print(
            f"written {out} ({stats.bytes / 1e6:.2f} MB, {stats.images} images, "
            f"{stats.bytes_per_image / 1e3:.0f} kB per image)"
        )
    if failed:
        err_console.print(
            f"{len(failed)} of {len(inputs)} inputs could not be read and were skipped", highlight=False
        )
        raise typer.Exit(code=1)
