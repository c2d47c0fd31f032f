"""``camkit localize``: boxes around what the model looked at, drawn on the overlay and listed in boxes.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from camkit.cli.common import (
    DeviceOption,
    ImagesArgument,
    LayersOption,
    WeightsOption,
    console,
    load_pictures,
    model_option,
    new_table,
    out_option,
    user_errors,
)

if TYPE_CHECKING:
    from PIL import Image

    from camkit.io import LoadedModel
    from camkit.localize import Box, Threshold
    from camkit.targets import TargetSpec

__all__ = ["BoxRecord", "localize"]


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

    def __call__(self, stem: str, pil: Image.Image) -> BoxRecord:
        """Explain one image, find its boxes, write ``<stem>_boxes.png``."""
        from camkit.localize import localize as find_boxes
        from camkit.pipeline import explain
        from camkit.viz import draw_boxes

        expl = explain(
            self.loaded.model,
            pil,
            method=self.method,
            layers=self.layers,
            targets=self.spec,
            preprocess=self.loaded.preprocess,
            labels=self.loaded.labels,
        )
        boxes = find_boxes(expl, threshold=self.parsed, mode=self.mode, min_area=self.min_area)[0]
        file = self.out / f"{stem}_boxes.png"
        draw_boxes(expl.overlay(0), boxes).save(file)
        label = expl.labels[0] if expl.labels else None
        return BoxRecord(
            image=stem,
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
    model: Annotated[str, model_option("Model name.")] = "efficientnet_lite0",
    weights: WeightsOption = None,
    method: Annotated[str, typer.Option("--method", "-m", help="CAM method.")] = "gradcam",
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
    out: Annotated[Path, out_option("Output folder.")] = Path("out"),
    sample: Annotated[str, typer.Option(help="Sample photo when no image is given.")] = "chelsea",
    device: DeviceOption = "cpu",
) -> None:
    """Boxes around what the model looked at: <image>_boxes.png (overlay + boxes) and boxes.json."""
    import camkit
    from camkit.localize import parse_threshold
    from camkit.targets import TopK, parse_target

    with user_errors():
        parsed = parse_threshold(threshold)
        spec = parse_target(target)
        if isinstance(spec, TopK):
            raise ValueError("localize explains one class per image: give an index or a name, not topK")
        loaded = camkit.load_model(model, weights=weights, device=device)
        pics = load_pictures(images, sample)
        out.mkdir(parents=True, exist_ok=True)
        run = _Localizer(loaded, method, layers, spec, threshold, parsed, mode, min_area, out)
        table = new_table(
            f"camkit localize · {loaded.name} · {method}",
            ("image", "class", "box (x0, y0, x1, y1)", "score", "file"),
        )
        records = [run(stem, pil) for stem, pil in pics]
        for record in records:
            record.add_rows(table)
        (out / "boxes.json").write_text(json.dumps([r.to_dict() for r in records], indent=2))
        console.print(table)
        console.print(f"written to {out}/ (boxes.json: x1, y1 exclusive, original-image pixels)")
