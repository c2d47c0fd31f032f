"""Inputs of ``camkit run``: a list of :class:`Item` (one per image, in a fixed order) and a torch Dataset.

Layouts (``layout=``, ``--layout``):

* ``folder`` (the default for a folder): every image file of the tree, recursively, sorted by path; hidden
  files and folders skipped (as ``camkit explain``). No class.
* ``imagefolder``: torchvision's ImageFolder tree, ``ROOT/<class>/.../<image>``: the class is the name of the
  first folder below the root.
* ``manifest`` (the default for a ``.csv``, ``.jsonl`` or ``.ndjson`` file): one row per image with ``path``
  (relative to the manifest's folder, or absolute), an optional ``class`` (an index or a class name) and
  optional ``boxes`` (a JSON list of ``[x0, y0, x1, y1]`` in original-image pixels; in a CSV cell as JSON text).
* ``tar`` (the default for ``.tar`` files): WebDataset-style shards. Members are grouped by key (the member
  path up to the first dot of its file name); a group's image is its member with an image suffix, its class
  the text of its ``.cls`` member and its boxes the ``"boxes"`` of its ``.json`` member, both optional.

The order of the items is the order of the inputs, then sorted paths within each folder (tar members in archive
order): it defines each image's row ``index`` in the store, so the same inputs always give the same index.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from camkit.io.images import DEFAULT_MAX_PIXELS, load_image, to_rgb
from camkit.io.preprocess import Preprocess

__all__ = ["IMAGE_SUFFIXES", "LAYOUTS", "ImageDataset", "Item", "Sample", "collect_items", "read_item"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
LAYOUTS = ("auto", "folder", "imagefolder", "manifest", "tar")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


@dataclass(frozen=True)
class Item:
    """One input image.

    Attributes:
        path: the image's name in the table: its file path, or ``<shard.tar>/<member>`` for a tar member.
        cls: its ground-truth class as given (a folder name, a manifest value, a ``.cls`` text), or None.
        boxes: its ground-truth boxes ``(x0, y0, x1, y1)`` in original-image pixels.
        file: the file to read (the tar shard for a member).
        member: the tar member's name, or None for a plain file.
    """

    path: str
    cls: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = field(default=())
    file: str = ""
    member: str | None = None


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder(root: Path) -> list[Path]:
    files = sorted(
        f
        for f in root.rglob("*")
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not _hidden(f, root)
    )
    if not files:
        raise ValueError(
            f"the folder {str(root)!r} holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def _boxes(raw: object, where: str) -> tuple[tuple[float, float, float, float], ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: boxes must be a JSON list of [x0, y0, x1, y1], got {raw!r}") from err
    if not isinstance(raw, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in raw
    ):
        raise ValueError(f"{where}: boxes must be a list of [x0, y0, x1, y1] (numbers), got {raw!r}")
    out = []
    for b in raw:
        x0, y0, x1, y1 = (float(v) for v in b)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(
                f"{where}: box {b} is empty; boxes are [x0, y0, x1, y1] with x1 > x0 and y1 > y0"
            )
        out.append((x0, y0, x1, y1))
    return tuple(out)


def _manifest(path: Path) -> list[Item]:
    base = path.parent
    rows: list[dict[str, Any]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"manifest {str(path)!r} needs a 'path' column (and optional 'class', 'boxes')")
        rows = list(reader)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"manifest {str(path)!r} line {n} is not JSON: {err}") from err
            if not isinstance(row, dict) or "path" not in row:
                raise ValueError(
                    f"manifest {str(path)!r} line {n}: an object with 'path' is needed, got {line!r}"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"manifest {str(path)!r} lists no image")
    items = []
    for n, row in enumerate(rows, 1):
        where = f"manifest {str(path)!r} row {n}"
        rel = str(row["path"] or "").strip()
        if not rel:
            raise ValueError(f"{where}: empty path")
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        cls = row.get("class")
        cls = None if cls is None or str(cls).strip() == "" else str(cls).strip()
        items.append(Item(path=rel, cls=cls, boxes=_boxes(row.get("boxes"), where), file=str(file)))
    return items


def _tar(path: Path) -> list[Item]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path) as tf:
            for info in tf:
                if not info.isfile():
                    continue
                name = info.name
                parent, _, base = name.rpartition("/")
                if base.startswith("."):
                    continue
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                groups.setdefault(f"{parent}/{key}" if parent else key, {})["." + ext.lower()] = info
            items = []
            for key, members in groups.items():
                image = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
                if image is None:
                    continue
                cls = None
                if ".cls" in members:
                    f = tf.extractfile(members[".cls"])
                    cls = f.read().decode("utf-8").strip() if f is not None else None
                boxes: tuple[tuple[float, float, float, float], ...] = ()
                if ".json" in members:
                    f = tf.extractfile(members[".json"])
                    meta = json.loads(f.read().decode("utf-8")) if f is not None else {}
                    if isinstance(meta, dict):
                        boxes = _boxes(meta.get("boxes"), f"{path}:{key}.json")
                        if cls is None and meta.get("class") is not None:
                            cls = str(meta["class"])
                items.append(
                    Item(path=f"{path}/{image.name}", cls=cls, boxes=boxes, file=str(path), member=image.name)
                )
    except tarfile.TarError as err:
        raise ValueError(f"cannot read the tar shard {str(path)!r}: {err}") from err
    if not items:
        raise ValueError(f"the tar shard {str(path)!r} holds no image member")
    return items


def collect_items(inputs: Sequence[str | Path], layout: str = "auto") -> list[Item]:
    """The images of ``inputs`` (folders, manifests, tar shards, image files) in a fixed order.

    Args:
        inputs: paths; with ``layout="auto"`` a folder is read as ``folder``, a ``.csv``/``.jsonl`` file as a
            manifest, a ``.tar`` file as a WebDataset shard, any other file as one image.
        layout: one of :data:`LAYOUTS` (see the module docstring).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an unknown layout, an empty folder or manifest, a malformed manifest row.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not inputs:
        raise ValueError("no input given: pass image folders, files, a manifest (.csv/.jsonl) or .tar shards")
    items: list[Item] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {str(p)!r}")
        kind = layout
        if kind == "auto":
            if p.is_dir():
                kind = "folder"
            elif p.suffix.lower() in MANIFEST_SUFFIXES:
                kind = "manifest"
            elif p.suffix.lower() == ".tar":
                kind = "tar"
            else:
                kind = "file"
        if kind in ("folder", "imagefolder"):
            if not p.is_dir():
                raise ValueError(f"--layout {kind} needs a folder, got the file {str(p)!r}")
            for f in _folder(p):
                cls = f.relative_to(p).parts[0] if kind == "imagefolder" else None
                if kind == "imagefolder" and len(f.relative_to(p).parts) < 2:
                    raise ValueError(
                        f"{str(f)!r} lies directly in the ImageFolder root {str(p)!r}; an ImageFolder tree is "
                        "ROOT/<class>/<image> (use --layout folder for a plain folder)"
                    )
                items.append(Item(path=str(f), cls=cls, file=str(f)))
        elif kind == "manifest":
            items.extend(_manifest(p))
        elif kind == "tar":
            items.extend(_tar(p))
        else:
            if p.is_dir():
                raise ValueError(f"--layout {layout} needs files, got the folder {str(p)!r}")
            items.append(Item(path=str(p), file=str(p)))
    return items


_TARS: dict[str, tarfile.TarFile] = {}  # open shards of this process (one per DataLoader worker)


def read_item(item: Item, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The item's image as 8-bit RGB.

    Raises:
        ValueError: it cannot be read as an image, or has more than ``max_pixels`` pixels.
        FileNotFoundError: its file is gone.
    """
    if item.member is None:
        return load_image(item.file, max_pixels=max_pixels)
    tf = _TARS.get(item.file)
    if tf is None:
        tf = _TARS[item.file] = tarfile.open(item.file)
    try:
        f = tf.extractfile(item.member)
        if f is None:
            raise ValueError("not a file member")
        im = Image.open(io.BytesIO(f.read()))
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"{w}x{h} pixels is more than the limit of {max_pixels} (--max-pixels)")
        im.load()
        return to_rgb(im)
    except (OSError, SyntaxError, KeyError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {item.path!r} as an image ({err})") from err


@dataclass
class Sample:
    """What :class:`ImageDataset` gives for one index: the model input, or the reason it could not be read."""

    index: int
    x: torch.Tensor | None
    size: tuple[int, int] = (0, 0)  # (W, H) of the original image
    thumb: Image.Image | None = None
    error: str | None = None


class ImageDataset(torch.utils.data.Dataset[Sample]):
    """Decodes and preprocesses items (in DataLoader workers); an unreadable image gives a :class:`Sample`
    with its ``error`` instead of raising, so one bad file never stops a run."""

    def __init__(
        self,
        items: Sequence[Item],
        preprocess: Preprocess,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        thumb_side: int = 0,
    ) -> None:
        self.items = list(items)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.thumb_side = thumb_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        try:
            im = read_item(item, self.max_pixels)
        except (ValueError, OSError) as err:
            return Sample(index, None, error=str(err))
        thumb = None
        if self.thumb_side:
            thumb = im.copy()
            thumb.thumbnail((self.thumb_side, self.thumb_side), Image.Resampling.BILINEAR)
        return Sample(index, self.preprocess(im)[0], im.size, thumb)


def collate(samples: list[Sample]) -> list[Sample]:
    """A batch is the list of its samples (stacked later: unreadable ones have no tensor)."""
    return samples
