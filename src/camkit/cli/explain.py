"""``camkit explain``: overlay PNGs of one or more methods on images, a grid when comparing, summary.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    ImagesArgument,
    console,
    forwards_progress,
    load_pictures,
    new_table,
    split,
    user_errors,
)

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from camkit.explanation import Explanation
    from camkit.io import LoadedModel
    from camkit.methods.engine import PerturbationOptions
    from camkit.targets import TargetSpec
    from camkit.tasks import ChosenTarget

__all__ = ["SummaryRow", "TaskInfo", "explain"]

_COLUMNS = ("image", "class", "prob", "method", "layers", "file")


@dataclass(frozen=True)
class TaskInfo:
    """The summary.json fields of a segmentation / detection target.

    Attributes:
        task: ``"segmentation"`` or ``"detection"``.
        region: ``"mask"``, ``"image"`` or ``"box"`` (:class:`camkit.tasks.ChosenTarget`).
        box: detection: the explained box in pixels of the original image.
        coverage: segmentation: fraction of the image predicted as the class.
    """

    task: str
    region: str
    box: list[float] | None = None
    coverage: float | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON fields; ``box`` and ``coverage`` only when known."""
        out: dict[str, object] = {"task": self.task, "region": self.region}
        if self.box is not None:
            out["box"] = self.box
        if self.coverage is not None:
            out["coverage"] = self.coverage
        return out


@dataclass(frozen=True)
class SummaryRow:
    """One overlay written by ``camkit explain``: a row of its table and of summary.json."""

    image: str
    cls: int | None
    label: str | None
    prob: float | None
    method: str
    layers: list[str]
    file: Path
    task: TaskInfo | None = None

    def to_dict(self) -> dict[str, object]:
        """The summary.json object (key ``class`` for :attr:`cls`)."""
        return {
            "image": self.image,
            "class": self.cls,
            "label": self.label,
            "prob": self.prob,
            "method": self.method,
            "layers": self.layers,
            "file": str(self.file),
            **(self.task.to_dict() if self.task is not None else {}),
        }

    def cells(self) -> tuple[str, ...]:
        """The table row (columns ``_COLUMNS``)."""
        prob = f"{self.prob:.3f}" if self.prob is not None else "-"
        return (
            self.image,
            f"{self.cls} {self.label or ''}".strip(),
            prob,
            self.method,
            ",".join(self.layers),
            self.file.name,
        )


@dataclass(frozen=True)
class _Job:
    """What every image of one ``camkit explain`` run is explained with and written as."""

    loaded: LoadedModel
    methods: list[str]
    slow: list[str]  # the perturbation methods among them (a progress bar)
    layers: str
    spec: TargetSpec
    fusion: str | None
    perturbation: PerturbationOptions
    device: str
    out: Path
    cmap: str
    alpha: float


@dataclass(frozen=True)
class _Picture:
    """One input image and, for segmentation / detection models, what is explained in it."""

    stem: str
    image: Image.Image
    chosen: ChosenTarget | None


def explain(
    images: ImagesArgument = None,
    model: Annotated[
        str, typer.Option("--model", help="efficientnet_lite0 (offline default), a torchvision or timm name.")
    ] = "efficientnet_lite0",
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local state_dict file (loaded with weights_only=True).")
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained",
            help="Use the library's pretrained weights (network needed except for the default).",
        ),
    ] = True,
    methods: Annotated[
        str,
        typer.Option(
            "--method", "--methods", "-m", help="Method name(s), comma-separated; see `camkit methods`."
        ),
    ] = "gradcam",
    layers: Annotated[
        str,
        typer.Option(
            "--layer",
            "--layers",
            "-l",
            help="Target layer(s), comma-separated, or 'auto'; see `camkit layers MODEL`.",
        ),
    ] = "auto",
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="Class to explain: index, name ('tabby cat') or topK ('top3'). Default: top-1; segmentation "
            "models: the class covering most of the predicted mask; detection models: the best detection.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the PNG files.")] = Path("out"),
    cmap: Annotated[str, typer.Option(help="Matplotlib colormap.")] = "jet",
    alpha: Annotated[float, typer.Option(help="Weight of the heatmap in the overlay (0..1).")] = 0.5,
    fusion: Annotated[str | None, typer.Option(help="Fusion of several layers: max or mean.")] = None,
    sample: Annotated[
        str, typer.Option(help="Sample photo used when no image is given: chelsea, coffee, astronaut.")
    ] = "chelsea",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Perturbation methods: masked inputs per forward (default: from free memory)."),
    ] = None,
    top_channels: Annotated[
        int | None,
        typer.Option(help="Perturbation methods: only the k most active channels (faster, approximate)."),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="SS-CAM noise draws (default 35) / IS-CAM steps (default 10).")
    ] = None,
    weighting: Annotated[
        str,
        typer.Option(
            help="Score-CAM family: 'prob' (the authors' code) or 'channel-softmax' (pytorch-grad-cam, torchcam)."
        ),
    ] = "prob",
    ablation: Annotated[
        str, typer.Option(help="Ablation-CAM: 'zero' (the paper) or 'gradcam-min' (pytorch-grad-cam).")
    ] = "zero",
    input_size: Annotated[
        int | None,
        typer.Option(
            help="Segmentation/detection models: square input size (default 520; detection: the model's own, "
            "at most 640)."
        ),
    ] = None,
    det_threshold: Annotated[
        float | None,
        typer.Option(
            help="Detection models: score threshold of the detections (default: the model's own); 0 keeps all."
        ),
    ] = None,
) -> None:
    """Explain the model's decision on images and write overlay PNGs (and a grid when comparing)."""
    import camkit

    with user_errors():
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha is the heatmap's weight and must lie in [0, 1], got {alpha}")
        method_list, slow = _methods(methods)
        loaded = camkit.load_model(
            model, weights=weights, pretrained=pretrained, device=device, input_size=input_size
        )
        pics = load_pictures(images, sample)
        spec = _target_spec(loaded, target)
        _set_det_threshold(loaded, det_threshold)
        out.mkdir(parents=True, exist_ok=True)
        job = _Job(
            loaded=loaded,
            methods=method_list,
            slow=slow,
            layers=layers,
            spec=spec,
            fusion=fusion,
            perturbation=camkit.PerturbationOptions(  # checks its values
                batch_size=batch_size,
                top_channels=top_channels,
                samples=samples,
                weighting=weighting,  # type: ignore[arg-type]
                ablation=ablation,  # type: ignore[arg-type]
            ),
            device=device,
            out=out,
            cmap=cmap,
            alpha=alpha,
        )
        table = new_table(f"camkit explain · {loaded.name}", _COLUMNS)
        rows = [row for stem, pil in pics for row in _explain_picture(job, stem, pil, table)]
        (out / "summary.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        console.print(table)
        console.print(f"written to {out}/")


def _methods(text: str) -> tuple[list[str], list[str]]:
    """The ``--methods`` names (each checked) and the slow ones among them (perturbation methods)."""
    from camkit.methods import PerturbationMethod, get_method

    names = split(text)
    kinds = [(name, get_method(name)) for name in names]  # an unknown name raises here
    return names, [name for name, method in kinds if isinstance(method, PerturbationMethod)]


def _target_spec(loaded: LoadedModel, target: str | None) -> TargetSpec:
    """``--target`` parsed; segmentation / detection models take one class, not topK."""
    from camkit.targets import TopK, parse_target

    spec = parse_target(target)
    if loaded.task != "classification" and isinstance(spec, TopK):
        raise ValueError(
            f"{loaded.name} is a {loaded.task} model: --target takes one class (index or name), not topK"
        )
    return spec


def _set_det_threshold(loaded: LoadedModel, threshold: float | None) -> None:
    """``--det-threshold``: the detection model's score threshold (refused for other models)."""
    if threshold is None:
        return
    from camkit.tasks import set_score_threshold

    if loaded.task != "detection":
        raise ValueError(f"--det-threshold is for detection models; {loaded.name} is a {loaded.task} model")
    set_score_threshold(loaded.model, threshold)


def _explain_picture(job: _Job, stem: str, pil: Image.Image, table: Table) -> list[SummaryRow]:
    """Explain one image with every method, write its overlays (and grids), add them to the table."""
    chosen = _task_target(job, pil) if job.loaded.task != "classification" else None
    pic = _Picture(stem, pil, chosen)
    if chosen is not None:
        console.print(
            f"{stem}: {job.loaded.task}, explaining {_describe(job.loaded, pil, chosen)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    results = _run_methods(job, pic)
    first = next(iter(results.values()))
    n_targets = first.maps.shape[1] if first.maps.dim() == 4 else 1
    rows: list[SummaryRow] = []
    for t in range(n_targets):
        written, grid = _write_target(job, pic, results, t)
        for row in written:
            table.add_row(*row.cells())
        if grid is not None:
            table.add_row(stem, "", "", "grid", "", grid.name)
        rows += written
    return rows


def _run_methods(job: _Job, pic: _Picture) -> dict[str, Explanation]:
    """All methods on one image (:func:`camkit.compare`), with a progress bar for the slow ones."""
    from camkit.pipeline import compare

    with forwards_progress(f"{pic.stem}: {', '.join(job.slow)}", enabled=bool(job.slow)) as report:
        return compare(
            job.loaded.model,
            pic.image,
            methods=job.methods,
            layers=job.layers,
            targets=job.spec if pic.chosen is None else pic.chosen.target,
            preprocess=job.loaded.preprocess,
            labels=job.loaded.labels,
            fusion=job.fusion,
            perturbation=replace(job.perturbation, progress=report),
        )


def _write_target(
    job: _Job, pic: _Picture, results: dict[str, Explanation], t: int
) -> tuple[list[SummaryRow], Path | None]:
    """The overlays of target ``t`` (``_topK`` in the names for topK) and, when comparing, their grid."""
    from camkit.targets import TopK
    from camkit.viz import grid

    suffix = f"_top{t + 1}" if isinstance(job.spec, TopK) else ""
    decorate = _decorator(job.loaded, pic)
    rows: list[SummaryRow] = []
    cells: dict[str, dict[str, Image.Image]] = {}
    for name, expl in results.items():
        file = job.out / f"{pic.stem}_{name}{suffix}.png"
        fused = decorate(expl.overlay(0, target=t, cmap=job.cmap, alpha=job.alpha))
        fused.save(file)
        cells[name] = {
            layer: decorate(expl.overlay(0, target=t, cmap=job.cmap, alpha=job.alpha, layer=layer))
            for layer in (expl.layers if len(expl.layers) > 1 else [])
        }
        cells[name]["fused" if len(expl.layers) > 1 else expl.layers[0]] = fused
        rows.append(_summary_row(job, pic, name, expl, t, file))
    if len(results) > 1 or len(next(iter(results.values())).layers) > 1:
        file = job.out / f"{pic.stem}_grid{suffix}.png"
        grid(cells, image=pic.image, title=f"{pic.stem}: {rows[-1].label or rows[-1].cls}").save(file)
        return rows, file
    return rows, None


def _summary_row(job: _Job, pic: _Picture, method: str, expl: Explanation, t: int, file: Path) -> SummaryRow:
    """The class, label and probability of target ``t``; a task target's own when there is one."""
    if pic.chosen is not None:  # a task target: no classifier probabilities
        chosen = pic.chosen
        info = _task_info(job.loaded, pic.image, chosen)
        return SummaryRow(
            pic.stem, chosen.category, chosen.label, chosen.score, method, expl.layers, file, info
        )
    cls = _of_target(expl.classes, t)
    prob = _of_target(expl.probs, t)
    label = expl.labels[0] if expl.labels else None
    if isinstance(label, list):
        label = label[t]
    return SummaryRow(
        pic.stem,
        int(cls) if cls is not None else None,
        label,
        float(prob) if prob is not None else None,
        method,
        expl.layers,
        file,
    )


def _of_target(values: Tensor | None, t: int) -> Tensor | None:
    """The first image's value of target ``t`` (values: Tensor[B] or Tensor[B, k] for topK)."""
    if values is None:
        return None
    first = values[0]
    return first[t] if first.dim() == 1 else first


def _task_target(job: _Job, pil: Image.Image) -> ChosenTarget:
    """What to explain in a segmentation / detection model's output (:func:`camkit.tasks.default_target`)."""
    import torch

    from camkit.targets import TopK
    from camkit.tasks import default_target, score_threshold

    spec, loaded = job.spec, job.loaded
    assert not isinstance(spec, TopK) and (spec is None or isinstance(spec, (int, str)))
    x = loaded.preprocess(pil).to(job.device)
    with torch.no_grad():
        out = loaded.model(x)
    return default_target(
        out,
        loaded.task,
        category=spec,
        labels=loaded.labels,
        threshold=score_threshold(loaded.model) if loaded.task == "detection" else None,
    )


def _image_box(loaded: LoadedModel, pil: Image.Image, box: list[float]) -> list[float]:
    """A box in model-input pixels -> pixels of the original image (the whole image was resized)."""
    h, w = loaded.preprocess.size
    sx, sy = pil.size[0] / w, pil.size[1] / h
    return [round(box[0] * sx, 1), round(box[1] * sy, 1), round(box[2] * sx, 1), round(box[3] * sy, 1)]


def _task_info(loaded: LoadedModel, pil: Image.Image, chosen: ChosenTarget) -> TaskInfo:
    """The summary.json fields of a segmentation / detection target."""
    return TaskInfo(
        task=chosen.task,
        region=chosen.region,
        box=_image_box(loaded, pil, chosen.box) if chosen.box is not None else None,
        coverage=round(chosen.coverage, 4) if chosen.coverage is not None else None,
    )


def _describe(loaded: LoadedModel, pil: Image.Image, chosen: ChosenTarget) -> str:
    """What is explained, for the console; a detection's box in original-image pixels."""
    if chosen.box is not None:
        box = ", ".join(f"{v:.0f}" for v in _image_box(loaded, pil, chosen.box))
        return chosen.describe().rsplit(", box", 1)[0] + f", box ({box}) in image pixels (DetectionTarget)"
    return chosen.describe() + " (SegmentationTarget: the sum of its logits there)"


def _decorator(loaded: LoadedModel, pic: _Picture) -> Callable[[Image.Image], Image.Image]:
    """Detection: draw the explained box on each overlay; otherwise leave them as they are."""
    chosen = pic.chosen
    if chosen is None or chosen.box is None:
        return lambda im: im
    from camkit.viz import draw_boxes

    box = _image_box(loaded, pic.image, chosen.box)
    caption = f"{chosen.label or chosen.category} {chosen.score:.2f}"
    return lambda im: draw_boxes(im, [box], labels=[caption])
