"""``camkit localize``: boxes around what the model looked at, drawn on the overlay and listed in boxes.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    DEFAULT_MAX_PIXELS,
    DeviceOption,
    ImagesArgument,
    Input,
    LayersOption,
    MaxPixelsOption,
    ModelOption,
    ModelOptions,
    PretrainedOption,
    ProgressOption,
    SampleOption,
    SeedOption,
    ThreadsOption,
    WeightsOption,
    console,
    err_console,
    fail,
    file_part,
    load_model,
    max_pixels_limit,
    new_table,
    out_option,
    previous_entries,
    read_or_skip,
    resolve_inputs,
    run_progress,
    split,
    update_entries,
    user_errors,
    versions,
)
from camkit.errors import CamkitError

if TYPE_CHECKING:
    from PIL import Image

    from camkit.adapters import LoadedModel
    from camkit.core.targets import TargetSpec
    from camkit.localize import Box, Threshold

__all__ = ["BoxRecord", "LocalizeArgs", "localize", "run_localize"]


@dataclass(frozen=True)
class BoxRecord:
    """The boxes of one image: an entry of boxes.json (boxes in original-image pixels, x1 and y1 exclusive)."""

    image: str
    size: tuple[int, int]
    cls: int | None
    label: str | None
    method: str
    threshold: str
    mode: str
    boxes: list[Box]
    file: Path

    def to_dict(self) -> dict[str, object]:
        """The boxes.json object (key ``class`` for :attr:`cls`)."""
        return {
            "image": self.image,
            "size": list(self.size),
            "class": self.cls,
            "label": self.label,
            "method": self.method,
            "threshold": self.threshold,
            "mode": self.mode,
            "boxes": [b.to_dict() for b in self.boxes],
            "file": str(self.file),
        }

    def add_rows(self, table: Table) -> None:
        """One table row per box ("-" when there is none)."""
        what = f"{self.cls} {self.label or ''}".strip()
        for b in self.boxes:
            table.add_row(self.image, what, str(tuple(b.xyxy)), f"{b.score:.2f}", self.file.name)
        if not self.boxes:
            table.add_row(self.image, what, "-", "-", self.file.name)


@dataclass(frozen=True)
class _Localizer:
    """How every image of one ``camkit localize`` run is explained, boxed and written."""

    loaded: LoadedModel
    method: str
    layers: str
    spec: TargetSpec
    threshold: str  # as given, for boxes.json
    parsed: Threshold
    mode: str
    min_area: float
    out: Path

    def __call__(
        self, item: Input, pil: Image.Image, progress: Callable[[int, int], None] | None = None
    ) -> BoxRecord:
        """Explain one image, find its boxes, write ``<stem>_boxes.png`` (``progress``: forward passes of a
        perturbation method)."""
        from camkit.core.pipeline import explain
        from camkit.io.files import save_image
        from camkit.localize import localize as find_boxes
        from camkit.methods.engine import PerturbationOptions
        from camkit.viz import draw_boxes

        expl = explain(
            self.loaded.model,
            pil,
            method=self.method,
            layers=self.layers,
            targets=self.spec,
            preprocess=self.loaded.preprocess,
            labels=self.loaded.labels,
            perturbation=PerturbationOptions(progress=progress),
        )
        boxes = find_boxes(expl, threshold=self.parsed, mode=self.mode, min_area=self.min_area)[0]
        file = self.out / f"{item.stem}_boxes.png"
        save_image(draw_boxes(expl.overlay(0), boxes), file)
        label = expl.labels[0] if expl.labels else None
        return BoxRecord(
            image=item.name,
            size=pil.size,
            cls=int(expl.classes[0]) if expl.classes is not None else None,
            label=label[0] if isinstance(label, list) else label,  # a list only for topK, refused
            method=expl.method,
            threshold=self.threshold,
            mode=self.mode,
            boxes=boxes,
            file=file,
        )


def localize(
    images: ImagesArgument = None,
    model: ModelOption = "efficientnet_lite0",
    weights: WeightsOption = None,
    pretrained: PretrainedOption = True,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            "-m",
            show_default="gradcam",
            help="CAM method (one); parameters in parentheses: 'finercam(alpha=0.5)'.",
        ),
    ] = None,
    layers: LayersOption = "auto",
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="Class index or name (default top-1).")
    ] = None,
    threshold: Annotated[
        str, typer.Option(help="Fraction of the map's max (0.2), value:0.5 for a fixed value, or otsu.")
    ] = "0.2",
    mode: Annotated[str, typer.Option(help="largest (one box) or all (one per component).")] = "largest",
    min_area: Annotated[
        float, typer.Option(help="With --mode all: smallest component, fraction of the image.")
    ] = 0.01,
    out: Annotated[Path, out_option("Output folder for the PNG files and boxes.json.")] = Path("out"),
    sample: SampleOption = "chelsea",
    device: DeviceOption = "cpu",
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    progress: ProgressOption = None,
) -> None:
    """Boxes around what the model looked at: <image>_boxes.png (overlay + boxes) and boxes.json.

    Exit status: 0 when every image was boxed, 1 when some inputs could not be read (each named on stderr, the
    others boxed), 2 on a usage error or when no image could be read.
    """
    args = LocalizeArgs(
        images=tuple(images or ()),
        model=ModelOptions(model, weights, pretrained, seed, threads, device),
        method=_one_method(method),
        layers=layers,
        target=target,
        threshold=threshold,
        mode=mode,
        min_area=min_area,
        out=out,
        sample=sample,
        max_pixels=max_pixels,
        progress=progress,
    )
    with user_errors():
        failed, total = run_localize(args)
    if failed:
        err_console.print(f"{failed} of {total} inputs could not be read and were skipped", highlight=False)
        raise typer.Exit(code=1)


@dataclass(frozen=True)
class LocalizeArgs:
    """The options of one ``camkit localize`` run, as given on the command line (see :func:`localize`)."""

    images: tuple[Path, ...]
    model: ModelOptions
    method: str = "gradcam"
    layers: str = "auto"
    target: str | None = None
    threshold: str = "0.2"
    mode: str = "largest"
    min_area: float = 0.01
    out: Path = Path("out")
    sample: str = "chelsea"
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None

    def summary_options(self) -> dict[str, object]:
        """The ``options`` object of each boxes.json entry."""
        names = ("method", "layers", "target", "threshold", "mode", "min_area", "max_pixels")
        return {n: getattr(self, n) for n in names}


def run_localize(args: LocalizeArgs) -> tuple[int, int]:
    """Check the options and inputs, load the model, box every input; ``(inputs not read, inputs)``."""
    from camkit.core.targets import TopK, parse_target
    from camkit.io.files import prepare_out_dir
    from camkit.localize import parse_threshold
    from camkit.methods import get_method

    parsed = parse_threshold(args.threshold)
    spec = parse_target(args.target)
    if isinstance(spec, TopK):
        raise CamkitError("localize explains one class per image: give an index or a name, not topK")
    if args.mode not in ("largest", "all"):
        raise CamkitError(f"--mode is 'largest' or 'all', got {args.mode!r}")
    get_method(args.method)  # an unknown name raises here
    tag = args.model.file_tag() + ("" if args.method == "gradcam" else f"_{file_part(args.method)}")
    max_pixels_limit(args.max_pixels)
    inputs = resolve_inputs(list(args.images), args.sample, tag)
    prepare_out_dir(args.out)
    previous_entries(args.out / "boxes.json")  # refuse a foreign boxes.json before any model work
    loaded = load_model(args.model)
    run = _Localizer(
        loaded, args.method, args.layers, spec, args.threshold, parsed, args.mode, args.min_area, args.out
    )
    return _localize_inputs(run, inputs, args), len(inputs)


def _localize_inputs(run: _Localizer, inputs: list[Input], args: LocalizeArgs) -> int:
    """Box every input (one progress bar), write boxes.json, print the table; the inputs not read."""
    from camkit.methods import PerturbationMethod, get_method

    slow = isinstance(get_method(args.method), PerturbationMethod)
    limit = max_pixels_limit(args.max_pixels)
    table = new_table(
        f"camkit localize · {run.loaded.name} · {args.method}",
        ("image", "class", "box (x0, y0, x1, y1)", "score", "file"),
    )
    run_info = {**args.model.to_dict(), **versions(), "options": args.summary_options()}
    entries: list[dict[str, object]] = []
    failed = 0
    n_layers = 1 if args.layers.strip() == "auto" else max(len(split(args.layers)), 1)
    with run_progress(len(inputs), steps=n_layers if slow else 0, enabled=args.progress) as bar:
        for item in inputs:
            pil = read_or_skip(item, limit, alone=len(inputs) == 1)
            if pil is not None:
                record = run(item, pil, bar.forwards())
                record.add_rows(table)
                entries.append({**record.to_dict(), "source": item.source, **run_info})
            else:
                failed += 1
            bar.image_done(item.name)
    if failed == len(inputs):
        raise CamkitError(f"none of the {len(inputs)} images could be read (see above)")
    update_entries(args.out / "boxes.json", entries)
    console.print(table)
    console.print(f"written to {args.out}/ (boxes.json: x1, y1 exclusive, original-image pixels)")
    return failed


def _one_method(given: list[str] | None) -> str:
    """The one ``--method`` of ``camkit localize`` (``gradcam`` when not given); given twice is an error."""
    if given is None:
        return "gradcam"
    if len(given) > 1:
        fail(
            f"--method is given {len(given)} times ({', '.join(given)}); camkit localize boxes one method: give it once"
        )
    return given[0]
