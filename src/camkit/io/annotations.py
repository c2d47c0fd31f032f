"""Ground-truth annotations: a class and boxes per image, read from camkit JSON, COCO JSON or Pascal VOC XML.

Boxes are in original-image pixels, ``[x0, y0, x1, y1]`` with ``x1``/``y1`` exclusive:

* camkit JSON: ``{"cat.jpg": {"class": 281, "boxes": [[x0, y0, x1, y1], ...]}, ...}``; ``class`` is an index
  or a class name (``"tabby cat"``) and is explained instead of the top-1; both keys are optional.
* COCO JSON (``images`` / ``annotations`` / ``categories``; ``bbox`` = ``[x, y, w, h]``): all boxes of an image;
  its class is the category name of the first annotation when the model knows that name, else the top-1.
* Pascal VOC XML (a file or a folder of them): ``<object><name>`` and ``<bndbox>`` (1-based inclusive
  ``xmin..xmax``, so x0 = xmin - 1, x1 = xmax).

Images are matched to annotations by file name (without folders).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Annotation", "read_annotations"]


@dataclass
class Annotation:
    """Ground truth of one image.

    Attributes:
        cls: the class to explain (index or name), or None for the model's top-1.
        boxes: ``[x0, y0, x1, y1]`` boxes in original-image pixels, ``x1``/``y1`` exclusive.
        strict_class: False when an unknown class name should fall back to the top-1 (COCO / VOC
            vocabularies differ from the model's); True (camkit JSON) makes it an error.
    """

    cls: int | str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    strict_class: bool = True


def read_annotations(path: str | Path) -> dict[str, Annotation]:
    """Read a camkit JSON, COCO JSON, Pascal VOC XML file or a folder of VOC XML files (see the module doc).

    Returns:
        file name -> :class:`Annotation`.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a folder without ``.xml`` file, invalid JSON, or an entry that is not as documented.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"annotation file not found: {str(p)!r}")
    if p.is_dir():
        xmls = sorted(p.glob("*.xml"))
        if not xmls:
            raise ValueError(f"no .xml annotation in folder {str(p)!r}")
        return dict(_voc(x) for x in xmls)
    if p.suffix.lower() == ".xml":
        return dict([_voc(p)])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON ({err})") from err
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco(data)
    if not isinstance(data, dict):
        raise ValueError(f"{str(p)!r}: expected an object {{file name: {{class, boxes}}}} or a COCO file")
    return _camkit(data, p)


def _voc(path: Path) -> tuple[str, Annotation]:
    """One Pascal VOC XML file: (its image's file name, the annotation); 1-based inclusive -> half-open."""
    root = ET.parse(path).getroot()
    name = root.findtext("filename") or path.with_suffix(".jpg").name
    ann = Annotation(strict_class=False)
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        xmin, ymin, xmax, ymax = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        ann.boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        if ann.cls is None:
            ann.cls = obj.findtext("name")
    return name, ann


def _coco(data: dict[str, Any]) -> dict[str, Annotation]:
    """A COCO file: every image listed, with all its boxes; the class is its first annotation's category."""
    cats = {c["id"]: c.get("name") for c in data.get("categories", [])}
    by_id = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
    out = {name: Annotation(strict_class=False) for name in by_id.values()}
    for a in data["annotations"]:
        if a.get("image_id") not in by_id or "bbox" not in a:
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        ann = out[by_id[a["image_id"]]]
        ann.boxes.append([x, y, x + w, y + h])
        if ann.cls is None:
            ann.cls = cats.get(a.get("category_id"))
    return out


def _camkit(data: dict[str, Any], p: Path) -> dict[str, Annotation]:
    """A camkit JSON object ``{file name: {"class": ..., "boxes": [...]}}``, each box checked."""
    out: dict[str, Annotation] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{str(p)!r}: the entry of {name!r} must be an object with 'class' and/or 'boxes'"
            )
        boxes = [[float(v) for v in b] for b in entry.get("boxes", [])]
        for b in boxes:
            if len(b) != 4 or b[2] < b[0] or b[3] < b[1]:
                raise ValueError(
                    f"{str(p)!r}: box {b} of {name!r} is not [x0, y0, x1, y1] with x1 >= x0, y1 >= y0"
                )
        out[Path(name).name] = Annotation(cls=entry.get("class"), boxes=boxes)
    return out
