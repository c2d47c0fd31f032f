"""``camkit evaluate``: score methods on images (faithfulness, and localization with boxes); CSV + JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    DeviceOption,
    LayersOption,
    WeightsOption,
    console,
    evaluation_progress,
    model_option,
    out_option,
    split,
    user_errors,
)

if TYPE_CHECKING:
    from PIL import Image

    from camkit.evaluate import EvaluationResult

__all__ = ["evaluate"]


def evaluate(
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files and/or folders (default: the three sample photos)."),
    ] = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            "--method",
            "-m",
            help="Methods, comma-separated; also the reference maps 'center', 'random' (smooth) and 'noise' (per pixel).",
        ),
    ] = "gradcam,gradcam++,xgradcam,hirescam,layercam,center,random",
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="deletion,insertion,avg_drop,increase,road,pointing,pointing_strict,box,maxboxacc or all "
            "(default: the first four, plus the box metrics with --annotations).",
        ),
    ] = None,
    annotations: Annotated[
        Path | None,
        typer.Option("--annotations", "-a", help="camkit JSON, COCO JSON, Pascal VOC XML file or folder."),
    ] = None,
    model: Annotated[str, model_option("Model name (see `camkit explain`).")] = "efficientnet_lite0",
    weights: WeightsOption = None,
    layers: LayersOption = "auto",
    steps: Annotated[int, typer.Option(help="Deletion/insertion steps.")] = 50,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per model call (default 8 on CPU, 64 on GPU).")
    ] = None,
    out: Annotated[Path, out_option("Folder for evaluate.csv and evaluate.json.")] = Path("out"),
    device: DeviceOption = "cpu",
) -> None:
    """Score methods on images: faithfulness (deletion, insertion, ...) and, with boxes, localization."""
    import camkit
    from camkit.evaluate import collect_images
    from camkit.evaluate import evaluate as run_evaluation

    with user_errors():
        items = _samples() if not images else collect_images(images)
        loaded = camkit.load_model(model, weights=weights, device=device)
        method_list = split(methods)
        with evaluation_progress(len(items) * len(method_list)) as report:
            result = run_evaluation(
                loaded.model,
                items,
                methods=method_list,
                metrics=split(metrics) if metrics else None,
                annotations=annotations,
                preprocess=loaded.preprocess,
                labels=loaded.labels,
                layers=layers,
                steps=steps,
                batch_size=batch_size,
                progress=report,
            )
        out.mkdir(parents=True, exist_ok=True)
        result.to_csv(out / "evaluate.csv")
        result.to_json(out / "evaluate.json")
        title = f"camkit evaluate · {loaded.name} · {result.config.images} image(s), mean per method"
        console.print(_table(result, title))
        t = result.timing
        console.print(
            f"{t['total']:.1f} s ({t['explain']:.1f} s explaining, {t['metric_forwards']:.1f} s in "
            f"model calls on {int(t['metric_images'])} perturbed images) · written to {out}/evaluate.csv, evaluate.json"
        )


def _samples() -> list[tuple[str, Image.Image]]:
    """The sample photos, by name."""
    from camkit.io import SAMPLES, sample_image

    return [(s, sample_image(s)) for s in SAMPLES]


def _table(result: EvaluationResult, title: str) -> Table:
    """One row per method: its mean of each column, with whether lower (↓) or higher (↑) is better."""
    from camkit.evaluate import METRICS

    cols = list(result.columns) + (["maxboxacc"] if result.maxboxacc else [])
    table = Table(title=title)
    table.add_column("method")
    for col in cols:
        lower = next((m.lower_is_better for k, m in METRICS.items() if col in m.columns or col == k), False)
        table.add_column(f"{col} {'↓' if lower else '↑'}", justify="right")
    for method, vals in result.summary.items():
        table.add_row(method, *(f"{vals.get(c, float('nan')):.3f}" for c in cols))
    return table
