"""Ground-truth annotations: a class and boxes per image, read from camkit JSON, COCO JSON or Pascal VOC XML.

Boxes are in original-image pixels, ``[x0, y0, x1, y1]`` with ``x1``/``y1`` exclusive:

* camkit JSON: ``{"cat.jpg": {"class": 281, "boxes": [[x0, y0, x1, y1], ...]}, ...}``; ``class`` is an index
  or a class name (``"tabby cat"``) and is explained instead of the top-1; both keys are optional.
* COCO JSON (``images`` / ``annotations`` / ``categories``; ``bbox`` = ``[x, y, w, h]``): all boxes of an image;
  its class is the category name of the first annotation when the model knows that name, else the top-1.
* Pascal VOC XML (a file or a folder of them): ``<object><name>`` and ``<bndbox>`` (1-based inclusive
  ``xmin..xmax``, so x0 = xmin - 1, x1 = xmax).

Images are matched to annotations by file name (without folders).

Box rules, checked when the file is read (:func:`read_annotations`), before any model work: every box has four
finite coordinates with ``x1 > x0`` and ``y1 > y0`` (no empty or inverted box) and ``x0, y0 >= 0``; anything else
is a ``ValueError`` naming the file and the entry. Once the image sizes are known (:func:`fit_boxes`, called by
:func:`camkit.evaluate.evaluate` before the model runs) a box that reaches past the right or bottom edge is
clipped to the image, and a box that lies entirely outside it (``x0 >= W`` or ``y0 >= H``) is an error.

XML is parsed by the standard library's expat parser, which never loads external entities; a file that declares
entities (a DTD with ``<!ENTITY``) is refused outright, so no entity expansion (billion laughs) can happen.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

from camkit.errors import CamkitError

__all__ = ["Annotation", "check_box", "fit_boxes", "read_annotations", "read_boxes"]


@dataclass
class Annotation:
    """Ground truth of one image.

    Attributes:
        cls: the class to explain (index or name), or None for the model's top-1.
        boxes: ``[x0, y0, x1, y1]`` boxes in original-image pixels, ``x1``/``y1`` exclusive.
        strict_class: False when an unknown class name should fall back to the top-1 (COCO / VOC
            vocabularies differ from the model's); True (camkit JSON) makes it an error.
        source: where it was read (``'file': entry``), for error messages; not compared.
    """

    cls: int | str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    strict_class: bool = True
    source: str = field(default="", compare=False, repr=False)


def read_annotations(path: str | Path) -> dict[str, Annotation]:
    """Read a camkit JSON, COCO JSON, Pascal VOC XML file or a folder of VOC XML files (see the module doc).

    Returns:
        file name -> :class:`Annotation`.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: a folder without ``.xml`` file, invalid JSON or XML, a missing key, or a box that breaks
            the box rules; the message names the file and the entry.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"annotation file not found: {str(p)!r}")
    if p.is_dir():
        xmls = sorted(x for x in p.glob("*.xml") if x.is_file())
        if not xmls:
            raise CamkitError(f"no .xml annotation in folder {str(p)!r}")
        return dict(_voc(x) for x in xmls)
    if p.suffix.lower() == ".xml":
        return dict([_voc(p)])
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
    ) as err:  # RecursionError: nested too deeply
        raise CamkitError(f"annotation file {str(p)!r} is not valid JSON ({err})") from err
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco(data, p)
    if not isinstance(data, dict):
        raise CamkitError(f"{str(p)!r}: expected an object {{file name: {{class, boxes}}}} or a COCO file")
    return _camkit(data, p)


def check_box(raw: object, where: str) -> list[float]:
    """``raw`` as a valid ``[x0, y0, x1, y1]`` (see the box rules), else a ValueError naming ``where``.

    The one box check of camkit: annotation files (``camkit evaluate``) and ``camkit run``'s manifests and tar
    shards use it. A coordinate is a number (an int or a float; a boolean, a string or null is refused), finite,
    with ``x1 > x0``, ``y1 > y0`` and ``x0, y0 >= 0``.
    """
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise CamkitError(f"{where}: box {raw!r} must be [x0, y0, x1, y1] (four numbers)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise CamkitError(f"{where}: box {raw!r} must be [x0, y0, x1, y1] (four numbers)")
    box = [float(v) for v in raw]
    if not all(math.isfinite(v) for v in box):
        raise CamkitError(f"{where}: box {raw!r} has a missing or non-finite coordinate")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise CamkitError(
            f"{where}: box {raw!r} is empty or inverted: [x0, y0, x1, y1] needs x1 > x0 and y1 > y0"
        )
    if x0 < 0 or y0 < 0:
        raise CamkitError(f"{where}: box {raw!r} starts outside the image (x0 and y0 must be >= 0)")
    return box


def read_boxes(raw: object, where: str) -> list[list[float]]:
    """A list of boxes (``[[x0, y0, x1, y1], ...]``, or JSON text of one), each checked by :func:`check_box`;
    ``None`` or ``""`` is no box. JSON's ``NaN``/``Infinity`` are refused as non-finite coordinates.

    Raises:
        ValueError: not a list, invalid JSON text, or a box that breaks the box rules; the message names
            ``where`` and the box.
    """
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise CamkitError(
                f"{where}: boxes must be a JSON list of [x0, y0, x1, y1], got {raw!r}"
            ) from None
    if not isinstance(raw, list):
        raise CamkitError(f"{where}: boxes must be a list of [x0, y0, x1, y1], got {raw!r}")
    return [check_box(b, f"{where}: box {i + 1}") for i, b in enumerate(raw)]


def fit_boxes(ann: Annotation, size: tuple[int, int], image: str) -> Annotation:
    """``ann`` with its boxes clipped to an image of ``size`` (W, H): a box that reaches past the right or
    bottom edge is cut there; a box entirely outside the image is a ValueError naming the annotation file,
    the entry and the image."""
    w, h = size
    boxes = []
    for b in ann.boxes:
        x0, y0, x1, y1 = b
        if x0 >= w or y0 >= h:
            raise CamkitError(
                f"{ann.source or 'annotations'}: box {b} lies outside image {image!r} of {w}x{h} pixels; "
                "fix the box or the file name it is matched to"
            )
        boxes.append([x0, y0, min(x1, float(w)), min(y1, float(h))])
    if boxes == ann.boxes:
        return ann
    return Annotation(cls=ann.cls, boxes=boxes, strict_class=ann.strict_class, source=ann.source)


class _EntityDeclared(Exception):
    pass


def _refuse_entities(*_: object) -> None:
    raise _EntityDeclared


def _voc(path: Path) -> tuple[str, Annotation]:
    """One Pascal VOC XML file: (its image's file name, the annotation); 1-based inclusive -> half-open."""
    data = path.read_bytes()
    try:
        check = expat.ParserCreate()
        check.EntityDeclHandler = _refuse_entities  # no entity declaration: nothing can be expanded
        check.Parse(data, True)
        root = ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError) as err:
        raise CamkitError(f"annotation file {str(path)!r} is not valid XML ({err})") from None
    except _EntityDeclared:
        raise CamkitError(
            f"annotation file {str(path)!r} declares XML entities (<!ENTITY>), which camkit refuses; "
            "remove the DTD"
        ) from None
    name = (root.findtext("filename") or "").strip() or path.with_suffix(".jpg").name
    ann = Annotation(strict_class=False, source=f"{str(path)!r}")
    for i, obj in enumerate(root.iter("object")):
        box = obj.find("bndbox")
        if box is None:
            continue
        where = f"{str(path)!r}: <object> {i + 1} of {name!r}"
        coords: list[object] = []
        for k in ("xmin", "ymin", "xmax", "ymax"):
            text = box.findtext(k)
            if text is None or not text.strip():
                raise CamkitError(f"{where}: <bndbox> has no <{k}>")
            coords.append(text.strip())
        xmin, ymin, xmax, ymax = _voc_numbers(coords, where)
        ann.boxes.append(check_box([xmin - 1, ymin - 1, xmax, ymax], where))
        if ann.cls is None:
            ann.cls = obj.findtext("name")
    return name, ann


def _voc_numbers(coords: list[object], where: str) -> list[float]:
    try:
        values = [float(str(c)) for c in coords]
    except ValueError:
        raise CamkitError(f"{where}: <bndbox> {coords} must hold numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise CamkitError(f"{where}: <bndbox> {coords} has a non-finite coordinate")
    return values


def _key(entry: object, key: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise CamkitError(f"{where} has no {key!r} key")
    return entry[key]


def _coco(data: dict[str, Any], p: Path) -> dict[str, Annotation]:
    """A COCO file: every image listed, with all its boxes; the class is its first annotation's category."""
    src = f"{str(p)!r}"
    for part in ("images", "annotations"):
        if not isinstance(data[part], list):
            raise CamkitError(f"{src}: COCO {part!r} must be a list")
    cats_raw = data.get("categories", [])
    if not isinstance(cats_raw, list):
        raise CamkitError(f"{src}: COCO 'categories' must be a list")
    cats = {_key(c, "id", f"{src}: categories[{i}]"): c.get("name") for i, c in enumerate(cats_raw)}
    by_id: dict[Any, str] = {}
    for i, im in enumerate(data["images"]):
        where = f"{src}: images[{i}]"
        file_name = _key(im, "file_name", where)
        if not isinstance(file_name, str) or not file_name:
            raise CamkitError(f"{where}: 'file_name' must be a non-empty string")
        by_id[_key(im, "id", where)] = Path(file_name).name
    out = {name: Annotation(strict_class=False, source=src) for name in by_id.values()}
    for i, a in enumerate(data["annotations"]):
        where = f"{src}: annotations[{i}]"
        image_id = _key(a, "image_id", where)
        if image_id not in by_id:
            raise CamkitError(f"{where}: image_id {image_id!r} is not in 'images'")
        if "bbox" not in a:
            continue  # a segmentation-only annotation
        bbox = a["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise CamkitError(f"{where}: bbox {bbox!r} must be [x, y, width, height]")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise CamkitError(f"{where}: bbox {bbox!r} must be [x, y, width, height] (four numbers)")
        x, y, w, h = (float(v) for v in bbox)
        ann = out[by_id[image_id]]
        ann.boxes.append(check_box([x, y, x + w, y + h], f"{where} (bbox {bbox}) of {by_id[image_id]!r}"))
        if ann.cls is None:
            ann.cls = cats.get(a.get("category_id"))
    return out


def _camkit(data: dict[str, Any], p: Path) -> dict[str, Annotation]:
    """A camkit JSON object ``{file name: {"class": ..., "boxes": [...]}}``, each box checked."""
    out: dict[str, Annotation] = {}
    src = f"{str(p)!r}"
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise CamkitError(f"{src}: the entry of {name!r} must be an object with 'class' and/or 'boxes'")
        raw = entry.get("boxes", [])
        if not isinstance(raw, list):
            raise CamkitError(f"{src}: 'boxes' of {name!r} must be a list of [x0, y0, x1, y1]")
        boxes = [check_box(b, f"{src}: box {i + 1} of {name!r}") for i, b in enumerate(raw)]
        out[Path(name).name] = Annotation(cls=entry.get("class"), boxes=boxes, source=src)
    return out
