"""``camkit evaluate``: score methods on images (faithfulness, and localization with boxes); CSV + JSON.

Everything the user can get wrong is checked before the model is loaded: the methods and metrics, the images
(folders are searched recursively), the annotation file (format, keys, boxes), the boxes against the image sizes,
and the ``--out`` folder. An image that cannot be read is reported on stderr, skipped, and listed in
evaluate.json; the command then exits with status 1 (0 when every input was evaluated, 2 on a user error).

``camkit evaluate STORE`` prints the summary of a ``camkit run`` store; the run computed its per-image metrics with
the same :class:`camkit.evaluate.MetricScorer`, so both forms give the same means for the same images and options.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    DeviceOption,
    LayersOption,
    MaxPixelsOption,
    ModelOption,
    ModelOptions,
    PretrainedOption,
    ProgressOption,
    PromptOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    err_console,
    given_options,
    join_methods,
    load_model,
    max_pixels_limit,
    out_option,
    refuse_for_store,
    split_methods,
    user_errors,
    versions,
    warn,
)
from camkit.cli.output import Format, FormatOption, emit, note
from camkit.cli.progress import step_progress
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from PIL import Image

    from camkit.evaluate import EvaluationResult, Skipped

__all__ = ["evaluate"]

#: Exit status when the run finished but some inputs could not be read (and were skipped).
EXIT_SOME_SKIPPED = 1


#: The methods of ``camkit evaluate`` without ``--methods``.
EVALUATE_METHODS = "gradcam,gradcam++,xgradcam,hirescam,layercam,center,random"


#: Options that decide what a model computes, or where files go: meaningless for a store, whose summary is read.
_MODEL_WORK = (
    "methods", "metrics", "annotations", "model", "weights", "pretrained", "seed", "threads", "prompt", "max_pixels",
    "layers", "steps", "batch_size", "compile", "out", "device",
)  # fmt: skip


def evaluate(
    ctx: typer.Context,
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image files and/or folders, searched recursively (default: the three sample photos)."
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--methods",
            "--method",
            "-m",
            show_default=EVALUATE_METHODS,
            help="Methods, comma-separated or the option repeated; also the reference maps 'center', 'random' (smooth) and 'noise' (per pixel).",
        ),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            help="deletion,insertion,avg_drop,increase,road,arcc,pointing,pointing_strict,box,maxboxacc,"
            "energy_pointing,relevance_mass,relevance_rank,mask_auc,top_k,sparseness,entropy,effective_complexity,random_logit,mprt or all (docs/metrics.md) "
            "(default: the first four, plus the box metrics with --annotations). Settings in parentheses, as for "
            "methods: 'infidelity(perturbation=gaussian,samples=5),deletion' (a configured metric's columns end "
            "with its settings). Each metric's settings and defaults: docs/metrics.md; an unknown setting's error "
            "lists them.",
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option("--annotations", "-a", help="camkit JSON, COCO JSON, Pascal VOC XML file or folder."),
    ] = None,
    model: ModelOption = "efficientnet_lite0",
    weights: WeightsOption = None,
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    prompt: PromptOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    layers: LayersOption = "auto",
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps.")] = 50,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per model call (default 8 on CPU, 64 on GPU).")
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Run the metrics' perturbed images through a compiled copy of the model (CPU: ONNX Runtime where "
            "camkit[onnx] is installed, else a frozen torch.jit trace; GPU: torch.compile), prepared once per "
            "batch shape and checked once against the model; a model it cannot take runs uncompiled, with a warning.",
        ),
    ] = False,
    out: Annotated[Path, out_option("Folder for evaluate.csv and evaluate.json.")] = Path("out"),
    device: DeviceOption = "cpu",
    fmt: FormatOption = Format.table,
    progress: ProgressOption = None,
) -> None:
    """Score methods on images: faithfulness (deletion, insertion, ...) and, with boxes, localization.

    Given a `camkit run` store (a folder with run.json), prints its summary without recomputing anything (the
    options that would change the results, or --out, are then an error).

    Exit status: 0 when every image was evaluated, 1 when some could not be read (skipped, listed on stderr and
    in evaluate.json), 2 on a usage error (nothing evaluated).
    """
    from camkit.evaluate import collect_images, probe_images, read_annotations
    from camkit.evaluate import evaluate as run_evaluation
    from camkit.io.files import prepare_out_dir, write_json
    from camkit.methods import get_method

    if images and len(images) == 1 and (images[0] / "run.json").is_file():
        _print_store(images[0], fmt, given_options(ctx))
        return
    with user_errors():
        method_list = split_methods(join_methods(methods, EVALUATE_METHODS))
        if not method_list:
            raise CamkitError("--methods is empty; give at least one method (see `camkit methods`)")
        for m in method_list:
            if m not in ("center", "random", "noise"):
                get_method(m)
        if steps < 1:
            raise CamkitError(f"--steps must be at least 1, got {steps}")
        if batch_size is not None and batch_size < 1:
            raise CamkitError(f"--batch-size must be at least 1, got {batch_size}")
        metric_list = _metric_list(metrics)
        anns = read_annotations(annotations) if annotations is not None else {}
        items: list[tuple[str, Path | Image.Image]] = (
            list(_samples()) if not images else _named(collect_images(images), anns)
        )
        limit = max_pixels_limit(max_pixels)
        probe_images(
            items, anns, limit
        )  # boxes against image sizes: an error here, before the model is loaded
        prepare_out_dir(out)
        prompts = tuple(prompt or ())
        options = ModelOptions(model, weights, pretrained, seed, threads, device, prompts=prompts)
        loaded = load_model(options)
        with step_progress(progress) as report:
            result = run_evaluation(
                loaded.model,
                items,
                methods=method_list,
                metrics=metric_list,
                annotations=anns,
                preprocess=loaded.preprocess,
                labels=loaded.labels,
                layers=layers,
                steps=steps,
                batch_size=batch_size,
                progress=report,
                on_skip=_report_skip,
                max_pixels=limit,
                compile=compile,
            )
        csv_path, json_path = out / "evaluate.csv", out / "evaluate.json"
        replaced = [str(f) for f in (csv_path, json_path) if f.exists()]
        result.to_csv(csv_path)
        record = {"run": {**options.to_dict(), **versions()}, **result.to_dict()}
        write_json(json_path, record)
    _print(result, loaded.name, fmt, [csv_path, json_path], record)
    if replaced:  # never silently: an earlier run's results in the same --out are gone
        err_console.print(f"note: replaced {' and '.join(replaced)} of an earlier run", highlight=False)
    if result.skipped:
        raise typer.Exit(code=EXIT_SOME_SKIPPED)


def _metric_list(metrics: list[str] | None) -> list[str] | None:
    """The ``--metrics`` given (repeated options joined), checked by name and settings before the model loads;
    None when the option is not given (the default metrics).

    Raises:
        CamkitError: an empty list, an unknown metric or a bad setting.
    """
    from camkit.metrics.registry import resolve_metrics

    if metrics is None:
        return None
    metric_list = split_methods(join_methods(metrics, ""))
    if not metric_list:
        raise CamkitError(
            "--metrics is empty; give at least one metric (docs/metrics.md), or leave it out for the default"
        )
    resolve_metrics(metric_list, have_boxes=True)
    return metric_list


def _print_store(path: Path, fmt: Format, given: set[str]) -> None:
    """The summary of a ``camkit run`` store (``summary.json``, or computed from its table), no model work; the
    options in ``given`` that would change the numbers (or ``--out``) are refused."""
    from camkit.cli.run import print_summary
    from camkit.run import open_store

    with user_errors():
        refuse_for_store(given, _MODEL_WORK, "summarised")
        store = open_store(path)
        summary = store.summary()
    if fmt is Format.json:
        emit("", [], [], fmt, data={"store": str(path), **summary})
        return
    if fmt is Format.tsv:  # stdout holds only the data: the means per method, as for images
        means = summary.get("metrics", {})
        cols = sorted({c for v in means.values() for c, x in v.items() if isinstance(x, (int, float))})
        nan = float("nan")
        rows = [(m, *(nan if v.get(c) is None else v[c] for c in cols)) for m, v in means.items()]
        emit("", ["method", *cols], rows, fmt)
        return
    if not store.complete:
        note(
            f"the run in {str(path)!r} is not finished: {len(store.done_shards())} of {store.n_shards} shards",
            fmt,
        )
    print_summary(summary, str(path))


def _named(paths: list[Path], anns: Mapping[str, object]) -> list[tuple[str, Path | Image.Image]]:
    """Each image's row name: its file name, or where two images share one, its path from their common folder
    (``a/x.jpg``, ``b/x.jpg``). Annotations are matched by file name, so a shared name that has an annotation
    is ambiguous: refused."""
    by_name: dict[str, list[Path]] = {}
    for p in paths:
        by_name.setdefault(p.name, []).append(p)
    named: list[tuple[str, Path | Image.Image]] = []
    for p in paths:
        same = by_name[p.name]
        if len(same) == 1:
            named.append((p.name, p))
            continue
        if p.name in anns:
            listed = ", ".join(str(q) for q in same[:3])
            raise CamkitError(
                f"{len(same)} images are named {p.name!r} ({listed}) and the annotations match images by file "
                "name: rename the files or evaluate the folders one at a time"
            )
        root = Path(os.path.commonpath([str(q.parent.resolve()) for q in same]))
        named.append((p.resolve().relative_to(root).as_posix(), p))
    return named


def _report_skip(entry: Skipped) -> None:
    warn(f"skipped {entry.file!r}: {entry.reason}")


def _samples() -> list[tuple[str, Image.Image]]:
    """The sample photos, by name."""
    from camkit.io import SAMPLES, sample_image

    return [(s, sample_image(s)) for s in SAMPLES]


def _print(
    result: EvaluationResult, model: str, fmt: Format, files: list[Path], record: dict[str, object]
) -> None:
    """The means per method in ``fmt`` (json: the ``record`` written to evaluate.json and the files), then what
    was excluded or skipped and where the files are."""
    from camkit.evaluate import METRICS

    cols = list(result.columns) + (["maxboxacc"] if result.maxboxacc else [])
    rows = [(method, *(vals.get(c, float("nan")) for c in cols)) for method, vals in result.summary.items()]
    notes = []
    if result.excluded:
        names = ", ".join(result.excluded[:5]) + (", ..." if len(result.excluded) > 5 else "")
        notes.append(
            f"box metrics over {result.config.images - len(result.excluded)} image(s): "
            f"{len(result.excluded)} without ground-truth boxes excluded ({names})"
        )
    if result.skipped:
        notes.append(f"{len(result.skipped)} input(s) could not be read and were skipped (see evaluate.json)")
    t = result.timing
    notes.append(
        f"{t['total']:.1f} s ({t['explain']:.1f} s explaining, {t['metric_forwards']:.1f} s in model calls on "
        f"{int(t['metric_images'])} perturbed images) · written to {', '.join(str(f) for f in files)}"
    )
    if fmt is Format.json:
        data = {**record, "files": [str(f) for f in files]}
        emit("", [], [], fmt, data=data)
    elif fmt is Format.tsv:
        emit("", ["method", *cols], rows, fmt)
    else:
        title = f"camkit evaluate · {model} · {result.config.images} image(s), mean per method"
        table = Table(title=title)
        table.add_column("method", overflow="fold")
        for col in cols:
            base = col.partition("(")[0]  # a configured metric's column: its own column, then its settings
            lower = next(
                (m.column_lower_is_better(col) for k, m in METRICS.items() if base in m.columns or base == k),
                False,
            )
            table.add_column(f"{col} {'↓' if lower else '↑'}", justify="right", overflow="fold")
        for method, *vals in rows:
            table.add_row(Text(str(method)), *(f"{v:.3f}" for v in vals))
        emit(title, [], [], fmt, table=table)
    for line in notes:
        note(line, fmt)
