"""``camkit run``: explain a whole dataset into a resumable store (maps in zarr, one Parquet row per image).

A killed run restarted with the same command continues where it stopped (done shards are verified first); a
finished store with the same options is left as it is; other options against an existing store are refused
unless ``--overwrite``; a folder that is not a camkit store is never written into unless it is empty. ``torchrun --nproc-per-node N -m camkit run ...`` splits the work over N
processes; ``--engine ray`` over Ray Data actors. See :mod:`camkit.run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    DeviceOption,
    LayersOption,
    MaxPixelsOption,
    ModelOption,
    PretrainedOption,
    ProgressOption,
    PromptOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    err_console,
    join_methods,
    max_pixels_limit,
    out_option,
    split_methods,
    user_errors,
)
from camkit.cli.progress import images_progress, shown

__all__ = ["print_summary", "run"]


def run(
    data: Annotated[
        list[Path],
        typer.Argument(
            help="Image folders (recursive), an ImageFolder tree, a .csv/.jsonl manifest (paths relative to its "
            "folder) or .tar shards; annotation files go with --annotations."
        ),
    ],
    out: Annotated[
        Path,
        out_option(
            "The store folder: a new or empty folder, or a camkit store to resume (created when missing)."
        ),
    ] = Path("store"),
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods",
            "--method",
            "-m",
            show_default="gradcam",
            help="CAM methods, comma-separated or the option repeated; parameters in parentheses: 'finercam(alpha=0.5)'.",
        ),
    ] = None,
    layers: LayersOption = "auto",
    layout: Annotated[
        str, typer.Option(help="auto, folder, imagefolder (class = first folder), manifest or tar.")
    ] = "auto",
    annotations: Annotated[
        Path | None,
        typer.Option(
            "--annotations",
            "-a",
            help="camkit JSON, COCO JSON, Pascal VOC XML file or folder: class and boxes of the images it "
            "names (by file name), as camkit evaluate reads them.",
        ),
    ] = None,
    target: Annotated[
        str, typer.Option(help="top1 (the prediction) or true (the class of the manifest / ImageFolder).")
    ] = "top1",
    resolution: Annotated[
        str, typer.Option(help="Stored maps at the layer's 'feature' resolution or the model's 'input' size.")
    ] = "feature",
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            help="Per-image metrics, comma-separated: deletion,insertion,avg_drop,increase,road,arcc,pointing,pointing_strict,box,maxboxacc,"
            "energy_pointing,relevance_mass,relevance_rank,mask_auc,top_k,sparseness,entropy,effective_complexity,random_logit,mprt (those of camkit evaluate); "
            "settings in parentheses as there, 'infidelity(perturbation=gaussian),deletion' (docs/metrics.md).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps.")] = 20,
    topk: Annotated[int, typer.Option(help="Predicted classes kept per image, with probabilities.")] = 5,
    threshold: Annotated[float, typer.Option(help="Box threshold, a fraction of the map's max.")] = 0.2,
    thumbnails: Annotated[
        int, typer.Option(help="Longer side of the JPEG overlays per image and method (0: none).")
    ] = 0,
    image_size: Annotated[
        int | None, typer.Option(help="Resize images to N x N instead of the model's input size.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 16,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit of resumption).")] = 256,
    workers: Annotated[
        int, typer.Option(help="DataLoader worker processes (0: decode in the main one).")
    ] = 2,
    engine: Annotated[str, typer.Option(help="local (also under torchrun) or ray.")] = "local",
    ray_workers: Annotated[int, typer.Option(help="Ray actors (--engine ray).")] = 2,
    num_gpus: Annotated[float, typer.Option(help="GPUs per Ray actor (--engine ray).")] = 0.0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start a camkit store again: its own files are deleted (refused when it holds other files).",
        ),
    ] = False,
    model: ModelOption = "efficientnet_lite0",
    weights: WeightsOption = None,
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    prompt: PromptOption = None,
    device: DeviceOption = "cpu",
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    progress: ProgressOption = None,
) -> None:
    """Explain every image of a dataset into a resumable store: maps (zarr), a table (Parquet), a summary.

    Exit status: 0 when every image was explained, 1 when some could not be read (status 'error' in the table),
    2 on a usage error.
    """
    from camkit.run import ModelSpec, RunOptions
    from camkit.run import run as run_dataset
    from camkit.run.distributed import env_rank

    with user_errors():
        options = RunOptions(
            methods=tuple(split_methods(join_methods(methods, "gradcam"))),
            layers=layers,
            target=target,
            resolution=resolution,
            topk=topk,
            threshold=threshold,
            metrics=_metric_keys(split_methods(join_methods(metrics, ""))),
            steps=steps,
            thumbnails=thumbnails,
            image_size=image_size,
            batch_size=batch_size,
            shard_size=shard_size,
            max_pixels=max_pixels_limit(max_pixels),
        )
        options.check()
        spec = ModelSpec(
            name=model,
            weights=str(weights) if weights is not None else None,
            pretrained=pretrained,
            seed=seed,
            device=device,
            threads=threads,
            prompts=tuple(prompt or ()),
        )
        rank = env_rank()[0]
        with images_progress(shown(progress) and rank == 0) as bar:
            result = run_dataset(
                [str(d) for d in data],
                out,
                model=spec,
                options=options,
                layout=layout,
                annotations=annotations,
                overwrite=overwrite,
                workers=workers,
                engine=engine,
                ray_workers=ray_workers,
                num_gpus=num_gpus,
                progress=bar,
                note=_note if rank == 0 else None,
                warn=_warning,
            )
    if rank != 0:
        return
    print_summary(result.summary, str(out))
    if result.summary.get("errors"):
        raise typer.Exit(code=1)


def _note(message: str) -> None:
    """A remark on stderr before the work (``note: ...``), printed as plain text."""
    err_console.print(f"note: {message}", highlight=False, markup=False, soft_wrap=True)


def _warning(message: str) -> None:
    """A ``warning:`` line on stderr (a done shard that does not verify and is computed again)."""
    err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def print_summary(summary: dict[str, Any], where: str) -> None:
    """The summary of a store on stdout: counts, then a table of metric means per method."""
    from rich.table import Table

    from camkit.cli.common import console

    this = summary.get("this_run", {})
    line = f"{summary.get('ok', 0)} of {summary.get('images', 0)} images explained, {summary.get('errors', 0)} unreadable"
    if this:
        line += f"; this run computed {this.get('computed')} in {this.get('seconds')} s"
        if this.get("images_per_s"):
            line += f" ({this['images_per_s']} images/s, {this.get('processes', 1)} process(es), {this.get('engine')})"
    console.print(line, highlight=False, soft_wrap=True)
    if summary.get("without_boxes"):
        console.print(
            f"box metrics: {summary['without_boxes']} image(s) without ground-truth boxes left out (NaN)",
            highlight=False,
            soft_wrap=True,
        )
    metrics = summary.get("metrics", {})
    cols = sorted({c for v in metrics.values() for c in v})
    if cols:
        table = Table(title=f"means per method ({where})")
        table.add_column("method")
        for c in cols:
            table.add_column(c, justify="right")
        for m, vals in metrics.items():
            table.add_row(m, *("-" if vals.get(c) is None else f"{vals[c]:.4f}" for c in cols))
        console.print(table)
    console.print(f"store: {where} (read it with camkit.run.open_store)", highlight=False, soft_wrap=True)


def _metric_keys(specs: list[str]) -> tuple[str, ...]:
    """``--metrics`` items as the store records them: a spec with settings as its key (its settings checked,
    :func:`camkit.metrics.resolve_metrics`), a name as given."""
    from camkit.metrics.registry import resolve_metrics

    return tuple(resolve_metrics([m], have_boxes=True)[0] if "(" in m else m for m in specs)
