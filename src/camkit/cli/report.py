"""``camkit report``: one self-contained HTML file (photos, top-5, methods x layers overlays, boxes, metrics).

``camkit report STORE`` (a folder holding a ``camkit run`` store) reports the stored results instead, without a
model: :func:`camkit.report.store.report_store`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    AnnotationsOption,
    DeviceOption,
    ImagesArgument,
    LayersOption,
    MaxPixelsOption,
    ModelOption,
    ModelOptions,
    PretrainedOption,
    ProgressOption,
    PromptOption,
    SampleOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    annotated_targets,
    console,
    err_console,
    given_options,
    join_methods,
    load_model,
    max_pixels_limit,
    read_annotated,
    read_or_skip,
    refuse_for_store,
    resolve_inputs,
    run_progress,
    split_methods,
    user_errors,
)
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from PIL import Image

    from camkit.report import ImageRecord, ReportOptions

__all__ = ["ReportArgs", "report"]


#: Options that decide what a model computes: meaningless for a store, whose results are read as stored.
_MODEL_WORK = (
    "model", "weights", "pretrained", "seed", "threads", "layers", "target", "annotations", "metrics", "steps", "threshold",
    "sample", "device", "max_pixels",
)  # fmt: skip


def report(
    ctx: typer.Context,
    images: ImagesArgument = None,
    model: ModelOption = "efficientnet_lite0",
    weights: WeightsOption = None,
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    prompt: PromptOption = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods",
            "--method",
            "-m",
            show_default="gradcam",
            help="CAM methods, comma-separated or the option repeated; parameters in parentheses: 'finercam(alpha=0.5),gradcam'.",
        ),
    ] = None,
    layers: LayersOption = "auto",
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Class index or name (default: each image's top-1).")
    ] = None,
    annotations: AnnotationsOption = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            help="Metrics per image and method, comma-separated: the per-image metrics of camkit evaluate (deletion, "
            "insertion, avg_drop, increase, road, arcc, ..., sparseness, entropy, effective_complexity, "
            "random_logit, mprt; `camkit evaluate --help`); settings in parentheses as for camkit evaluate: "
            "'road(noise=0.05),deletion' (docs/metrics.md). Those that explain again (max_sensitivity, "
            "avg_sensitivity, random_logit, mprt) multiply the cost of the methods: mprt explains each image once "
            "per module with parameters.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Steps of the deletion / insertion curves.")] = 20,
    threshold: Annotated[
        str, typer.Option(help="Localisation threshold: fraction of the max (0.2), value:0.5, or otsu.")
    ] = "0.2",
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "camkit report",
    per_page: Annotated[int, typer.Option(help="Images per page.")] = 20,
    thumb_side: Annotated[
        int, typer.Option(help="Longer side of the thumbnails, pixels (a store's default: 128).")
    ] = 224,
    full_side: Annotated[
        int,
        typer.Option(
            help="Longer side of the view on click, pixels (0: thumbnails only, smallest file; a store's "
            "default: 0)."
        ),
    ] = 800,
    limit: Annotated[
        int | None, typer.Option(help="A store: report its first N images only (default: all).")
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="A store: the folder its relative image paths are read from (default: the folder the run "
            "recorded: a manifest's folder for its rows, else where camkit run was started)."
        ),
    ] = None,
    image_format: Annotated[str, typer.Option("--format", help="Picture format: webp or jpeg.")] = "webp",
    quality: Annotated[int, typer.Option(help="Picture quality, 1-100.")] = 80,
    alpha: Annotated[float, typer.Option(help="Weight of the heatmap in the overlays.")] = 0.5,
    cmap: Annotated[str, typer.Option(help="Colormap of the overlays.")] = "jet",
    sample: SampleOption = "chelsea",
    device: DeviceOption = "cpu",
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    progress: ProgressOption = None,
) -> None:
    """One HTML file that opens offline: per image the photo, the top-5, methods x layers overlays, the boxes and
    the metrics asked for; a sortable, filterable table over the images; pages of --per-page images.

    Given a `camkit run` store (a folder with run.json), reports its stored table and maps: nothing is recomputed
    and no model is loaded (--methods picks some of the store's methods; --limit the first N images; an
    unfinished run is reported as far as it is done, with a warning).

    Exit status: 0 when every image is in the report, 1 when some inputs could not be read (each named on stderr,
    the others reported), 2 on a usage error or when no image could be read.
    """
    from camkit.report.store import is_store

    args = ReportArgs(
        images=tuple(images or ()),
        model=ModelOptions(model, weights, pretrained, seed, threads, device, prompts=tuple(prompt or ())),
        methods=join_methods(methods, "gradcam"),
        layers=layers,
        target=target,
        annotations=annotations,
        metrics=join_methods(metrics, ""),
        steps=steps,
        threshold=threshold,
        out=out,
        title=title,
        per_page=per_page,
        thumb_side=thumb_side,
        full_side=full_side,
        image_format=image_format,
        quality=quality,
        alpha=alpha,
        cmap=cmap,
        limit=limit,
        image_root=image_root,
        sample=sample,
        max_pixels=max_pixels,
        given=frozenset(given_options(ctx)),
        progress=progress,
    )
    with user_errors():
        if len(args.images) == 1 and is_store(args.images[0]):
            _report_store(args)
            return
        failed, total = _report_images(args)
    if failed:
        err_console.print(f"{failed} of {total} inputs could not be read and were skipped", highlight=False)
        raise typer.Exit(code=1)


@dataclass(frozen=True)
class ReportArgs:
    """The options of one ``camkit report`` run, as given on the command line (see :func:`report`).

    Attributes:
        given: the parameters set on the command line (not left at their defaults): a store's report has its
            own defaults for the thumbnail and full sides (:meth:`page`).
    """

    images: tuple[Path, ...]
    model: ModelOptions
    methods: str
    layers: str
    target: str | None
    metrics: str
    steps: int
    threshold: str
    out: Path
    title: str
    per_page: int
    thumb_side: int
    full_side: int
    image_format: str
    quality: int
    alpha: float
    cmap: str
    limit: int | None
    image_root: Path | None
    sample: str
    max_pixels: int
    given: frozenset[str]
    annotations: Path | None = None
    progress: bool | None = None

    def page(self, store: bool, meta: str | None = None) -> ReportOptions:
        """The report's page options (checked); a store's: thumbnails of 128 pixels and no full view unless
        given."""
        from camkit.report import ReportOptions

        return ReportOptions(
            title=self.title,
            per_page=self.per_page,
            thumb_side=128 if store and "thumb_side" not in self.given else self.thumb_side,
            full_side=0 if store and "full_side" not in self.given else self.full_side,
            format=self.image_format,
            quality=self.quality,
            cmap=self.cmap,
            alpha=self.alpha,
            meta=meta,
        )


def _check_out(out: Path) -> None:
    """``--out`` names a file in an existing folder."""
    if out.is_dir():
        raise CamkitError(
            f"--out {str(out)!r} is a folder; give the report's file name, e.g. {str(out / 'report.html')!r}"
        )
    if not out.parent.exists():
        raise CamkitError(f"the folder of --out {str(out)!r} does not exist")


def _report_images(args: ReportArgs) -> tuple[int, int]:
    """``camkit report IMAGES``: the model run on the images; ``(inputs not read, inputs)``."""
    from camkit.core.targets import parse_target
    from camkit.localize import parse_threshold
    from camkit.methods import get_method
    from camkit.report import build_records, write_report
    from camkit.viz import colormap_table

    if args.limit is not None or args.image_root is not None:
        raise CamkitError("--limit and --image-root are for a `camkit run` store (a folder holding run.json)")
    method_list = split_methods(args.methods)
    if not method_list:
        raise CamkitError("--methods is empty: give at least one method (see `camkit methods`)")
    for m in method_list:
        get_method(m)
    parsed = parse_threshold(args.threshold)
    spec = parse_target(args.target)
    colormap_table(args.cmap)
    page = args.page(store=False)
    _check_out(args.out)
    limit = max_pixels_limit(args.max_pixels)
    inputs = resolve_inputs(list(args.images), args.sample, "")
    anns = read_annotated(args.annotations, inputs)  # before any model work
    loaded = load_model(args.model)
    targets = annotated_targets(anns, loaded) if args.annotations is not None else None
    meta = f"{len(inputs)} images · model {loaded.name} · {', '.join(method_list)} · layers {args.layers}"
    failed: list[str] = []

    def pictures() -> Iterator[tuple[str, Image.Image | Path]]:
        for item in inputs:
            pil = read_or_skip(item, limit, alone=len(inputs) == 1)
            if pil is None:
                failed.append(item.name)
                continue
            yield item.name, pil

    with run_progress(len(inputs), enabled=args.progress) as bar:
        records = build_records(
            loaded,
            pictures(),
            method_list,
            args.layers,
            spec,
            split_methods(args.metrics),
            args.steps,
            parsed,
            targets,
            stage=bar.stage,
        )

        def counted() -> Iterator[ImageRecord]:
            for record in records:
                bar.image_done(record.name)
                yield record

        stats = write_report(counted(), args.out, replace(page, meta=meta))
    console.print(
        f"written {args.out} ({stats.bytes / 1e6:.2f} MB, {stats.images} images, "
        f"{stats.bytes_per_image / 1e3:.0f} kB per image)"
    )
    return len(failed), len(inputs)


def _report_store(args: ReportArgs) -> None:
    """``camkit report STORE``: the stored results as a report, no model loaded."""
    from camkit.report.store import report_store
    from camkit.run import open_store
    from camkit.viz import colormap_table

    path, out, limit = args.images[0], args.out, args.limit
    options = args.page(store=True)
    colormap_table(options.cmap)
    refuse_for_store(args.given, _MODEL_WORK, "reported")
    if limit is not None and limit < 1:
        raise CamkitError(f"--limit must be at least 1, got {limit}")
    _check_out(out)
    store = open_store(path)
    if not store.complete:
        done = len(store.done_shards())
        err_console.print(
            f"warning: the run in {str(path)!r} is not finished ({done} of {store.n_shards} shards done): the "
            "report holds the images done so far; run the same `camkit run` command to finish it",
            highlight=False,
        )
    methods = split_methods(args.methods) if "methods" in args.given else None
    result = report_store(store, out, options, methods=methods, limit=limit, image_root=args.image_root)
    stats = result.stats
    console.print(
        f"written {out} ({stats.bytes / 1e6:.2f} MB, {stats.images} images, "
        f"{stats.bytes_per_image / 1e3:.1f} kB per image)"
    )
    if result.errors:
        err_console.print(f"{result.errors} error row(s): images the run could not read", highlight=False)
    if result.missing_photos:
        err_console.print(
            f"{result.missing_photos} photo(s) could not be read now (see their cards); relative paths are read "
            "from --image-root (default: the folder the run recorded)",
            highlight=False,
        )
