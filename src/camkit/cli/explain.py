"""``camkit explain``: overlay PNGs of one or more methods on images, a grid when comparing, summary.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    AnnotationsOption,
    DeviceOption,
    ImagesArgument,
    Input,
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
    file_part,
    join_methods,
    load_model,
    max_pixels_limit,
    new_table,
    note_line,
    out_option,
    previous_entries,
    read_annotated,
    read_or_skip,
    resolve_inputs,
    run_progress,
    split,
    split_methods,
    update_entries,
    user_errors,
    versions,
)
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from camkit.adapters import LoadedModel
    from camkit.cli.video import ClipJob
    from camkit.core.explanation import Explanation
    from camkit.core.targets import TargetSpec
    from camkit.core.tasks import ChosenTarget
    from camkit.io.annotations import Annotation
    from camkit.methods.engine import PerturbationOptions

__all__ = ["ExplainArgs", "SummaryRow", "TaskInfo", "explain", "run_explain"]

_COLUMNS = ("image", "class", "prob", "method", "layers", "file")


@dataclass(frozen=True)
class TaskInfo:
    """The summary.json fields of a segmentation / detection target.

    Attributes:
        task: ``"segmentation"`` or ``"detection"``.
        region: ``"mask"``, ``"image"`` or ``"box"`` (:class:`camkit.core.tasks.ChosenTarget`).
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
    max_side: int | None = None  # longer side of the written pictures (None: the photo's size)
    caption: bool = False  # a caption strip and a colour bar on each single overlay
    progress: Callable[[int, int], None] | None = None  # forward passes of this image's perturbation methods
    eigen_smooth: bool = False  # first principal component of each map's per-channel terms
    augment: str | None = None  # test-time augmentation: 'gradcam' or 'flip'
    annotations: dict[str, Annotation] = field(default_factory=dict)  # input name -> its annotation
    targets: dict[str, int | str] | None = None  # input name -> its annotated class (None: no --annotations)


@dataclass(frozen=True)
class _Picture:
    """One input image and, for segmentation / detection models, what is explained in it."""

    name: str  # shown in the table and summary.json
    stem: str  # output files start with it
    image: Image.Image
    chosen: ChosenTarget | None


def explain(
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
            "--method",
            "--methods",
            "-m",
            show_default="gradcam",
            help="Method name(s), comma-separated or the option repeated; a method's parameters in parentheses: "
            "'finercam(alpha=0.5),gradcam'; see `camkit methods`.",
        ),
    ] = None,
    layers: LayersOption = "auto",
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="Class to explain: index, name ('tabby cat') or topK ('top3'). Default: top-1; segmentation "
            "models: the class covering most of the predicted mask; detection models: the best detection.",
        ),
    ] = None,
    annotations: AnnotationsOption = None,
    out: Annotated[Path, out_option("Output folder for the PNG files and summary.json.")] = Path("out"),
    cmap: Annotated[str, typer.Option(help="Matplotlib colormap.")] = "jet",
    alpha: Annotated[float, typer.Option(help="Weight of the heatmap in the overlay (0..1).")] = 0.5,
    fusion: Annotated[str | None, typer.Option(help="Fusion of several layers: max or mean.")] = None,
    max_side: Annotated[
        int | None,
        typer.Option(help="Longer side of the written pictures in pixels (default: the photo's own size)."),
    ] = None,
    caption: Annotated[
        bool,
        typer.Option(
            "--caption/--no-caption",
            help="Add a caption (class, probability, method, layer) and a colour bar to each single overlay.",
        ),
    ] = False,
    sample: SampleOption = "chelsea",
    device: DeviceOption = "cpu",
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    progress: ProgressOption = None,
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
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Run the Score-CAM family's masked inputs, and the gradient methods' shared capture up to the "
            "target layer, through a compiled copy of the model (CPU: ONNX Runtime where camkit[onnx] is installed, "
            "else a frozen torch.jit trace, prepared in seconds per input shape; GPU: torch.compile, tens of "
            "seconds), checked once, reused for every image.",
        ),
    ] = False,
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
    eigen_smooth: Annotated[
        bool,
        typer.Option(
            "--eigen-smooth",
            help="Layer and perturbation methods: each map becomes the first principal component of its "
            "per-channel terms (pytorch-grad-cam's eigen_smooth).",
        ),
    ] = False,
    augment: Annotated[
        str | None,
        typer.Option(
            help="Test-time augmentation, maps warped back and averaged: 'gradcam' (flip x brightness 0.9, 1, "
            "1.1: 6 passes, pytorch-grad-cam's aug_smooth) or 'flip' (2 passes).",
        ),
    ] = None,
    frames: Annotated[
        int,
        typer.Option(help="Video models: frames sampled evenly from each clip (0: all of them)."),
    ] = 16,
    animation: Annotated[
        str, typer.Option(help="Video models: the animated overlay's format, gif or mp4.")
    ] = "gif",
) -> None:
    """Explain the model's decision on images and write overlay PNGs (and a grid when comparing).

    Exit status: 0 when every image was explained, 1 when some inputs could not be read (each named on
    stderr, the others explained), 2 on a usage error or when no image could be read.
    """
    args = ExplainArgs(
        images=tuple(images or ()),
        model=ModelOptions(model, weights, pretrained, seed, threads, device, prompts=tuple(prompt or ())),
        methods=join_methods(methods, "gradcam"),
        layers=layers,
        target=target,
        annotations=annotations,
        out=out,
        cmap=cmap,
        alpha=alpha,
        fusion=fusion,
        max_side=max_side,
        caption=caption,
        sample=sample,
        max_pixels=max_pixels,
        progress=progress,
        batch_size=batch_size,
        top_channels=top_channels,
        samples=samples,
        weighting=weighting,
        ablation=ablation,
        compile=compile,
        input_size=input_size,
        det_threshold=det_threshold,
        eigen_smooth=eigen_smooth,
        augment=augment,
        frames=frames,
        animation=animation,
    )
    with user_errors():
        failed, total = run_explain(args)
    if failed:
        err_console.print(f"{failed} of {total} inputs could not be read and were skipped", highlight=False)
        raise typer.Exit(code=1)


@dataclass(frozen=True)
class ExplainArgs:
    """The options of one ``camkit explain`` run, as given on the command line (see :func:`explain`)."""

    images: tuple[Path, ...]
    model: ModelOptions
    methods: str = "gradcam"
    layers: str = "auto"
    target: str | None = None
    annotations: Path | None = None
    out: Path = Path("out")
    cmap: str = "jet"
    alpha: float = 0.5
    fusion: str | None = None
    max_side: int | None = None
    caption: bool = False
    sample: str = "chelsea"
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None
    batch_size: int | None = None
    top_channels: int | None = None
    samples: int | None = None
    weighting: str = "prob"
    ablation: str = "zero"
    compile: bool = False
    input_size: int | None = None
    det_threshold: float | None = None
    eigen_smooth: bool = False
    augment: str | None = None
    frames: int = 16
    animation: str = "gif"

    def summary_options(self, methods: list[str]) -> dict[str, object]:
        """The ``options`` object of each summary.json entry of an image run."""
        names = ("layers", "target", "fusion", "cmap", "alpha", "max_side", "caption", "batch_size", "top_channels",
                 "samples", "weighting", "ablation", "eigen_smooth", "augment", "compile", "input_size",
                 "det_threshold", "max_pixels")  # fmt: skip
        given = {"annotations": str(self.annotations)} if self.annotations is not None else {}
        return {"methods": methods, **{n: getattr(self, n) for n in names}, **given}

    def clip_job(self, methods: list[str]) -> ClipJob:
        """The options of a clip run (:mod:`camkit.cli.video`)."""
        from camkit.cli.video import ClipJob

        return ClipJob(self.model, methods, self.layers, self.target, self.out, self.cmap, self.alpha,
                       self.fusion, self.max_side, self.input_size, self.frames, self.animation)  # fmt: skip


def run_explain(args: ExplainArgs) -> tuple[int, int]:
    """Everything that can be checked without the model first (options, output folder, input files), then the
    model, then every input; ``(inputs that could not be read, inputs)``."""
    from camkit.io.files import prepare_out_dir

    methods, slow, perturbation = _checked(args)
    if _clip_run(list(args.images), args.model.name):
        from camkit.cli.video import explain_clips

        if args.annotations is not None:
            raise CamkitError("--annotations is for images; a clip is explained for --target")
        explain_clips(list(args.images), args.clip_job(methods))
        return 0, 0
    inputs = resolve_inputs(list(args.images), args.sample, args.model.file_tag())
    anns = read_annotated(args.annotations, inputs)  # before any model work
    prepare_out_dir(args.out)
    previous_entries(args.out / "summary.json")  # refuse a foreign summary.json before any model work
    loaded = load_model(args.model, input_size=args.input_size)
    spec = _target_spec(loaded, args.target)
    _set_det_threshold(loaded, args.det_threshold)
    job = _Job(loaded=loaded, methods=methods, slow=slow, layers=args.layers, spec=spec, fusion=args.fusion,
               perturbation=perturbation, device=args.model.device, out=args.out, cmap=args.cmap, alpha=args.alpha,
               max_side=args.max_side, caption=args.caption, eigen_smooth=args.eigen_smooth,
               augment=args.augment, annotations=anns,
               targets=annotated_targets(anns, loaded) if args.annotations is not None else None)  # fmt: skip
    run_info = {**args.model.to_dict(), **versions(), "options": args.summary_options(methods)}
    return _explain_inputs(job, inputs, args, run_info), len(inputs)


def _checked(args: ExplainArgs) -> tuple[list[str], list[str], PerturbationOptions]:
    """The options checked before anything is read: the methods (and the perturbation ones among them), the
    perturbation settings."""
    import camkit

    if not 0.0 <= args.alpha <= 1.0:
        raise CamkitError(f"--alpha is the heatmap's weight and must lie in [0, 1], got {args.alpha}")
    if args.max_side is not None and args.max_side < 16:
        raise CamkitError(f"--max-side must be at least 16 pixels, got {args.max_side}")
    methods, slow = _methods(args.methods)
    _check_smoothing(methods, args.eigen_smooth, args.augment)
    perturbation = camkit.PerturbationOptions(  # checks its values
        batch_size=args.batch_size,
        top_channels=args.top_channels,
        samples=args.samples,
        weighting=args.weighting,  # type: ignore[arg-type]
        ablation=args.ablation,  # type: ignore[arg-type]
        compile=args.compile,
    )
    max_pixels_limit(args.max_pixels)
    return methods, slow, perturbation


def _explain_inputs(job: _Job, inputs: list[Input], args: ExplainArgs, run_info: dict[str, object]) -> int:
    """Explain every input (one progress bar), write summary.json, print the table; the number of inputs that
    could not be read."""
    limit = max_pixels_limit(args.max_pixels)
    table = new_table(f"camkit explain · {job.loaded.name}", _COLUMNS)
    entries: list[dict[str, object]] = []
    failed = 0
    n_layers = 1 if job.layers.strip() == "auto" else max(len(split(job.layers)), 1)
    with run_progress(len(inputs), steps=len(job.slow) * n_layers, enabled=args.progress) as bar:
        for item in inputs:
            pil = read_or_skip(item, limit, alone=len(inputs) == 1)
            if pil is None:
                failed += 1
            else:
                job_item = replace(job, progress=bar.forwards(), spec=_image_target(job, item.name))
                extra = _annotation_field(job, item.name)
                for entry in _explain_picture(job_item, item, pil, table):
                    entries.append({**entry, **extra, "source": item.source, **run_info})
            bar.image_done(item.name)
    if failed == len(inputs):
        raise CamkitError(f"none of the {len(inputs)} images could be read (see above)")
    update_entries(job.out / "summary.json", entries)
    console.print(table)
    console.print(f"written to {job.out}/")
    return failed


def _image_target(job: _Job, name: str) -> TargetSpec:
    """The class an image is explained for: its annotated class with ``--annotations``, else ``--target`` (a
    note on stderr when ``--annotations`` gave it none)."""
    if job.targets is None:
        return job.spec
    if name in job.targets:
        return job.targets[name]
    what = "--target" if job.spec is not None else "its top-1"
    note_line(f"{name} has no annotated class: explaining {what}")
    return job.spec


def _annotation_field(job: _Job, name: str) -> dict[str, object]:
    """The ``annotation`` field of a summary.json entry with ``--annotations``: the class the file gives the
    image (an index or a name), or None."""
    if job.targets is None:
        return {}
    ann = job.annotations.get(name)
    return {"annotation": ann.cls if ann is not None else None}


def _clip_run(images: list[Path] | None, model: str) -> bool:
    """Whether this run explains clips: a video model (``r3d_18``...) or a video file among the inputs."""
    from camkit.adapters.video import VIDEO_SUFFIXES

    videos = [p for p in images or [] if p.suffix.lower() in VIDEO_SUFFIXES - {".gif"}]
    if videos:
        return True
    import torchvision.models as tvm

    return model.strip() in tvm.list_models(module=tvm.video)


def _methods(text: str) -> tuple[list[str], list[str]]:
    """The ``--methods`` names (each checked) and the slow ones among them (perturbation methods)."""
    from camkit.methods import PerturbationMethod, get_method

    names = split_methods(text)
    kinds = [(name, get_method(name)) for name in names]  # an unknown name raises here
    return names, [name for name, method in kinds if isinstance(method, PerturbationMethod)]


def _target_spec(loaded: LoadedModel, target: str | None) -> TargetSpec:
    """``--target`` parsed; segmentation / detection models take one class, not topK."""
    from camkit.core.targets import TopK, parse_target

    spec = parse_target(target)
    if loaded.task != "classification" and isinstance(spec, TopK):
        raise CamkitError(
            f"{loaded.name} is a {loaded.task} model: --target takes one class (index or name), not topK"
        )
    return spec


def _set_det_threshold(loaded: LoadedModel, threshold: float | None) -> None:
    """``--det-threshold``: the detection model's score threshold (refused for other models)."""
    if threshold is None:
        return
    from camkit.core.tasks import set_score_threshold

    if loaded.task != "detection":
        raise CamkitError(f"--det-threshold is for detection models; {loaded.name} is a {loaded.task} model")
    set_score_threshold(loaded.model, threshold)


def _explain_picture(job: _Job, item: Input, pil: Image.Image, table: Table) -> list[dict[str, object]]:
    """Explain one image with every method, write its overlays (and grids), add them to the table; the
    summary.json entries of the files written. A segmentation / detection model's target is chosen by the
    explaining forward itself (``Explanation.chosen``): no other forward is run."""
    results = _run_methods(job, pil)
    first = next(iter(results.values()))
    chosen = first.chosen[0] if first.chosen else None
    pic = _Picture(item.name, item.stem, pil, chosen)
    if chosen is not None:
        console.print(
            f"{item.name}: {job.loaded.task}, explaining {_describe(job.loaded, pil, chosen)}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    n_targets = first.maps.shape[1] if first.maps.dim() == 4 else 1
    entries: list[dict[str, object]] = []
    for t in range(n_targets):
        written, grid = _write_target(job, pic, results, t)
        for row in written:
            table.add_row(*row.cells())
        entries += [row.to_dict() for row in written]
        if grid is not None:
            table.add_row(pic.name, "", "", "grid", "", grid.name)
            entries.append(_grid_entry(pic, results, written, grid))
    return entries


def _grid_entry(
    pic: _Picture, results: dict[str, Explanation], written: list[SummaryRow], grid: Path
) -> dict[str, object]:
    """The summary.json entry of a grid."""
    return {
        "image": pic.name,
        "class": written[-1].cls,
        "label": written[-1].label,
        "prob": None,
        "method": "grid",
        "methods": list(results),
        "layers": sorted({layer for row in written for layer in row.layers}),
        "file": str(grid),
    }


def _run_methods(job: _Job, image: Image.Image) -> dict[str, Explanation]:
    """All methods on one image (:func:`camkit.compare`), the perturbation methods' forwards reported."""
    from camkit.core import pipeline

    return pipeline.compare(
        job.loaded.model,
        image,
        methods=job.methods,
        layers=job.layers,
        targets=job.spec,
        preprocess=job.loaded.preprocess,
        labels=job.loaded.labels,
        fusion=job.fusion,
        perturbation=replace(job.perturbation, progress=job.progress),
        eigen_smooth=job.eigen_smooth,
        augment=job.augment,
    )


def _check_smoothing(methods: list[str], eigen_smooth: bool, augment: str | None) -> None:
    """``--eigen-smooth`` and ``--augment``, checked before the model is loaded."""
    from camkit.core.augment import resolve_augment
    from camkit.methods import AttentionMethod, get_method

    if augment is not None and augment.strip().lower() not in ("gradcam", "flip", "none"):
        raise CamkitError(f"--augment must be 'gradcam', 'flip' or 'none', got {augment!r}")
    resolve_augment(augment)
    attention = [m for m in methods if isinstance(get_method(m), AttentionMethod)]
    if attention and (eigen_smooth or (augment is not None and augment.strip().lower() != "none")):
        raise CamkitError(
            f"--eigen-smooth and --augment apply to layer and perturbation methods, not to {', '.join(attention)}"
        )


def _write_target(
    job: _Job, pic: _Picture, results: dict[str, Explanation], t: int
) -> tuple[list[SummaryRow], Path | None]:
    """The overlays of target ``t`` (``_topK`` in the names for topK) and, when comparing, their grid."""
    from camkit.core.targets import TopK
    from camkit.io.files import save_image
    from camkit.viz import annotate, caption_text, grid

    suffix = f"_top{t + 1}" if isinstance(job.spec, TopK) else ""
    decorate = _decorator(job.loaded, pic)
    rows: list[SummaryRow] = []
    cells: dict[str, dict[str, Image.Image]] = {}
    for name, expl in results.items():
        file = job.out / f"{pic.stem}_{file_part(name)}{suffix}.png"
        fused = decorate(expl.overlay(0, target=t, cmap=job.cmap, alpha=job.alpha, max_side=job.max_side))
        row = _summary_row(job, pic, name, expl, t, file)
        if job.caption:
            text = caption_text(row.label, row.cls, row.prob, name, expl.layers)
            save_image(annotate(fused, caption=text, colorbar=job.cmap), file)
        else:
            save_image(fused, file)
        cells[name] = {
            layer: decorate(
                expl.overlay(0, target=t, cmap=job.cmap, alpha=job.alpha, layer=layer, max_side=job.max_side)
            )
            for layer in (expl.layers if len(expl.layers) > 1 else [])
        }
        # a map of the method's own passes is filed under the method's name: one shared column for all of them
        single = "own map" if expl.layers[0] == name else expl.layers[0]
        cells[name]["fused" if len(expl.layers) > 1 else single] = fused
        rows.append(row)
    if len(results) > 1 or len(next(iter(results.values())).layers) > 1:
        file = job.out / f"{pic.stem}_grid{suffix}.png"
        picture = grid(cells, image=pic.image, title=f"{pic.name}: {rows[-1].label or rows[-1].cls}")
        save_image(picture, file)
        return rows, file
    return rows, None


def _summary_row(job: _Job, pic: _Picture, method: str, expl: Explanation, t: int, file: Path) -> SummaryRow:
    """The class, label and probability of target ``t``; a task target's own when there is one."""
    if pic.chosen is not None:  # a task target: no classifier probabilities
        chosen = pic.chosen
        info = _task_info(job.loaded, pic.image, chosen)
        return SummaryRow(
            pic.name, chosen.category, chosen.label, chosen.score, method, expl.layers, file, info
        )
    cls = _of_target(expl.classes, t)
    prob = _of_target(expl.probs, t)
    label = expl.labels[0] if expl.labels else None
    if isinstance(label, list):
        label = label[t]
    return SummaryRow(
        pic.name,
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
    width = pic.image.size[0]

    def draw(im: Image.Image) -> Image.Image:  # the overlay may be smaller than the photo (--max-side)
        scale = im.size[0] / width
        return draw_boxes(im, [[v * scale for v in box]], labels=[caption])

    return draw
