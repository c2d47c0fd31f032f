"""Inputs of ``camkit run``: a list of :class:`Item` (one per image, in a fixed order) and a torch Dataset.

Layouts (``layout=``, ``--layout``):

* ``folder`` (the default for a folder): every image file of the tree, recursively, hidden files and folders
  skipped, in the one order of every command (:mod:`camkit.io.inputs`). No class.
* ``imagefolder``: torchvision's ImageFolder tree, ``ROOT/<class>/.../<image>``: the class is the name of the
  first folder below the root.
* ``manifest`` (the default for a ``.csv``, ``.jsonl`` or ``.ndjson`` file): one row per image with ``path``
  (relative to the manifest's folder, or absolute), an optional ``class`` (an index or a class name) and
  optional ``boxes`` (a JSON list of ``[x0, y0, x1, y1]`` in original-image pixels; in a CSV cell as JSON text).
* ``tar`` (the default for ``.tar`` files): WebDataset-style shards. Members are grouped by key (the member
  path up to the first dot of its file name); a group's image is its member with an image suffix, its class
  the text of its ``.cls`` member and its boxes the ``"boxes"`` of its ``.json`` member, both optional.

Boxes (manifests, tar ``.json`` members, annotation files) are read by one reader,
:func:`camkit.io.annotations.read_boxes`, with ``camkit evaluate``'s rules: four finite numbers (no boolean, no
string), ``x1 > x0``, ``y1 > y0``, ``x0, y0 >= 0``; anything else refuses the run before any model work, naming
the row.

Annotation files (camkit JSON, COCO JSON, Pascal VOC XML: :func:`camkit.io.annotations.read_annotations`, as
``camkit evaluate --annotations``) give the class and boxes of the images they name (matched by file name) whose
input gives none (``annotations=``, ``--annotations``). Such a file given as an input is refused with a message
that says so, as is any input file that is neither an image, a manifest nor a tar shard.

Relative paths: a manifest's resolve from the manifest's folder, the other inputs' from the current folder. Each
:class:`Item` carries that folder (``root``), and ``camkit run`` records it in ``run.json`` (``path_roots``), so
readers of the store (``camkit report STORE``) find the photos from any folder.

Limits of tar shards (bounded memory on hostile shards): sizes are read from each member's header before anything
is read. An image member over ``max_member_bytes`` (:data:`MAX_IMAGE_MEMBER_BYTES`, 300 MB: an uncompressed RGB
image at the default pixel limit fits) and a ``.cls``/``.json`` label member over :data:`MAX_LABEL_MEMBER_BYTES`
(64 KiB) make their image an error row without being read; an image member is then decoded from the shard as a
stream (never copied whole into memory), its pixel count checked from its header before decoding, as for files.

The order of the items is the order of the inputs, then within each folder the one order of every command
(:func:`camkit.io.inputs.folder_images`; tar members in archive order): it defines each image's row ``index`` in
the store, so the same inputs always give the same index.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image

from camkit.adapters.preprocess import Preprocess
from camkit.errors import CamkitError
from camkit.io.annotations import Annotation, read_annotations, read_boxes
from camkit.io.images import DEFAULT_MAX_PIXELS, load_image, open_image, to_rgb
from camkit.io.inputs import IMAGE_SUFFIXES, folder_images

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "MAX_IMAGE_MEMBER_BYTES",
    "MAX_LABEL_MEMBER_BYTES",
    "ImageDataset",
    "Item",
    "Sample",
    "collect_items",
    "read_item",
]

LAYOUTS = ("auto", "folder", "imagefolder", "manifest", "tar")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
ANNOTATION_SUFFIXES = (".json", ".xml")
#: An image member of a tar shard larger than this (bytes, from its header) is an error row, never read.
MAX_IMAGE_MEMBER_BYTES = 300_000_000
#: A ``.cls`` or ``.json`` member of a tar shard larger than this (bytes) makes its image an error row, unread.
MAX_LABEL_MEMBER_BYTES = 65_536
_MANIFEST_HELP = (
    "a manifest is a .csv file with a 'path' column (optional 'class' and 'boxes' columns) or a .jsonl file "
    'with one object per line ({"path": ..., "class": ..., "boxes": [[x0, y0, x1, y1], ...]}); paths are '
    "relative to the manifest's folder"
)


@dataclass(frozen=True)
class Item:
    """One input image.

    Attributes:
        path: the image's name in the table: its file path, or ``<shard.tar>/<member>`` for a tar member.
        cls: its ground-truth class as given (a folder name, a manifest value, a ``.cls`` text), or None.
        boxes: its ground-truth boxes ``(x0, y0, x1, y1)`` in original-image pixels.
        file: the file to read (the tar shard for a member).
        member: the tar member's name, or None for a plain file.
        root: the absolute folder a relative ``path`` resolves from (the manifest's folder for a manifest's
            rows, else the current folder when the items were collected).
        error: why the image is not read at all (a tar member over a size limit): it becomes an error row.
    """

    path: str
    cls: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = field(default=())
    file: str = ""
    member: str | None = None
    root: str = ""
    error: str | None = None


def _boxes(raw: object, where: str) -> tuple[tuple[float, float, float, float], ...]:
    """Boxes by the one box reader (:func:`camkit.io.annotations.read_boxes`: evaluate's rules)."""
    return tuple((b[0], b[1], b[2], b[3]) for b in read_boxes(raw, where))


def _manifest(path: Path) -> list[Item]:
    base = path.parent
    root = os.path.abspath(base)
    rows: list[dict[str, Any]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise CamkitError(f"manifest {str(path)!r} needs a 'path' column (and optional 'class', 'boxes')")
        rows = list(reader)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
                raise CamkitError(f"manifest {str(path)!r} line {n} is not JSON: {err}") from err
            if not isinstance(row, dict) or "path" not in row:
                raise CamkitError(
                    f"manifest {str(path)!r} line {n}: an object with 'path' is needed, got {line!r}"
                )
            rows.append(row)
    if not rows:
        raise CamkitError(f"manifest {str(path)!r} lists no image")
    items = []
    for n, row in enumerate(rows, 1):
        where = f"manifest {str(path)!r} row {n}"
        rel = str(row["path"] or "").strip()
        if not rel:
            raise CamkitError(f"{where}: empty path")
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        cls = row.get("class")
        cls = None if cls is None or str(cls).strip() == "" else str(cls).strip()
        items.append(
            Item(path=rel, cls=cls, boxes=_boxes(row.get("boxes"), where), file=str(file), root=root)
        )
    return items


def _label(tf: tarfile.TarFile, info: tarfile.TarInfo, where: str) -> str | None:
    """The text of a small label member, or None when it is over :data:`MAX_LABEL_MEMBER_BYTES` (not read)."""
    if info.size > MAX_LABEL_MEMBER_BYTES:
        return None
    f = tf.extractfile(info)
    data = f.read(MAX_LABEL_MEMBER_BYTES + 1) if f is not None else b""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CamkitError(f"{where} is not UTF-8 text") from None


def _tar_groups(tf: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """The shard's file members grouped by key (the member path up to the first dot of its file name), each
    group by suffix (``.jpg``, ``.cls``, ``.json``...); hidden members and members without a suffix skipped."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for info in tf:
        if not info.isfile():
            continue
        parent, _, base = info.name.rpartition("/")
        key, dot, ext = base.partition(".")
        if base.startswith(".") or not dot:
            continue
        groups.setdefault(f"{parent}/{key}" if parent else key, {})["." + ext.lower()] = info
    return groups


def _oversized(
    image: tarfile.TarInfo, members: Mapping[str, tarfile.TarInfo], max_member_bytes: int | None
) -> str | None:
    """Why a group is an error row without being read (an image member or a label member over its limit)."""
    if max_member_bytes is not None and image.size > max_member_bytes:
        return (
            f"the tar member {image.name!r} is {image.size} bytes, more than the limit of {max_member_bytes} "
            "bytes for an image member; it was not read"
        )
    for ext, m in members.items():
        if ext in (".cls", ".json") and m.size > MAX_LABEL_MEMBER_BYTES:
            return (
                f"the tar member {m.name!r} is {m.size} bytes, more than the limit of {MAX_LABEL_MEMBER_BYTES} "
                "bytes for a .cls or .json label; it was not read"
            )
    return None


def _tar_labels(
    tf: tarfile.TarFile, path: Path, members: Mapping[str, tarfile.TarInfo]
) -> tuple[str | None, tuple[tuple[float, float, float, float], ...]]:
    """The class (a ``.cls`` member's text, else the ``"class"`` of the ``.json`` member) and the boxes (the
    ``.json`` member's ``"boxes"``) of a group."""
    cls = None
    if ".cls" in members:
        text = _label(tf, members[".cls"], f"{path}:{members['.cls'].name}")
        cls = text.strip() if text is not None and text.strip() else None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    if ".json" in members:
        where = f"{path}:{members['.json'].name}"
        text = _label(tf, members[".json"], where) or "{}"
        try:
            meta = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
            raise CamkitError(f"{where} is not valid JSON ({err})") from None
        if isinstance(meta, dict):
            boxes = _boxes(meta.get("boxes"), where)
            if cls is None and meta.get("class") is not None:
                cls = str(meta["class"])
    return cls, boxes


def _tar(path: Path, max_member_bytes: int | None) -> list[Item]:
    root = os.path.abspath(os.curdir)
    items = []
    try:
        with tarfile.open(path) as tf:
            for members in _tar_groups(tf).values():
                image = next((m for ext, m in members.items() if ext in IMAGE_SUFFIXES), None)
                if image is None:
                    continue
                item = Item(path=f"{path}/{image.name}", file=str(path), member=image.name, root=root)
                error = _oversized(image, members, max_member_bytes)
                if error is not None:
                    items.append(replace(item, error=error))
                    continue
                cls, boxes = _tar_labels(tf, path, members)
                items.append(replace(item, cls=cls, boxes=boxes))
    except tarfile.TarError as err:
        raise CamkitError(f"cannot read the tar shard {str(path)!r}: {err}") from err
    if not items:
        raise CamkitError(f"the tar shard {str(path)!r} holds no image member")
    return items


def _single_file(p: Path) -> Item:
    """An input file read as one image: refused at once when it is plainly no image (an annotation file, a
    manifest of another suffix, any file whose header no image format knows)."""
    suffix = p.suffix.lower()
    if suffix in ANNOTATION_SUFFIXES:
        raise CamkitError(
            f"{str(p)!r} is not an image: an annotation file (camkit JSON, COCO JSON, Pascal VOC XML) goes with "
            f"--annotations next to the images (camkit run IMAGES --annotations {str(p)!r}); {_MANIFEST_HELP}"
        )
    if suffix not in IMAGE_SUFFIXES:
        try:
            with open_image(p):
                pass
        except (OSError, SyntaxError, ValueError) as err:
            raise CamkitError(
                f"{str(p)!r} is neither an image, a folder, a .tar shard nor a manifest ({err}); {_MANIFEST_HELP}"
            ) from None
    return Item(path=str(p), file=str(p), root=os.path.abspath(os.curdir))


def _annotate(items: list[Item], anns: Mapping[str, Annotation], source: str) -> list[Item]:
    """Each item named (by file name) in the annotations gets their class and boxes where its input gave
    none; a file name shared by several items that has an annotation is ambiguous: refused."""
    names = [PurePosixPath(it.member).name if it.member else Path(it.path).name for it in items]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = []
    matched = 0
    for it, name in zip(items, names, strict=True):
        ann = anns.get(name)
        if ann is None:
            out.append(it)
            continue
        if counts[name] > 1:
            raise CamkitError(
                f"{counts[name]} images are named {name!r} and the annotations {source} match images by file "
                "name: rename the files or run the folders one at a time"
            )
        matched += 1
        cls = it.cls if it.cls is not None or ann.cls is None else str(ann.cls)
        boxes = it.boxes or tuple((b[0], b[1], b[2], b[3]) for b in ann.boxes)
        out.append(replace(it, cls=cls, boxes=boxes))
    if not matched:
        raise CamkitError(
            f"none of the {len(items)} image(s) is named in the annotations {source} (they are matched by file "
            "name, without folders)"
        )
    return out


def collect_items(
    inputs: Sequence[str | Path],
    layout: str = "auto",
    annotations: str | Path | Mapping[str, Annotation] | None = None,
    max_member_bytes: int | None = MAX_IMAGE_MEMBER_BYTES,
) -> list[Item]:
    """The images of ``inputs`` (folders, manifests, tar shards, image files) in a fixed order.

    Args:
        inputs: paths; with ``layout="auto"`` a folder is read as ``folder``, a ``.csv``/``.jsonl`` file as a
            manifest, a ``.tar`` file as a WebDataset shard, any other file as one image (a ``.json``/``.xml``
            file, or a file no image format knows, is refused with what a manifest is).
        layout: one of :data:`LAYOUTS` (see the module docstring).
        annotations: an annotation file (camkit JSON, COCO JSON, Pascal VOC XML or a folder of them) or a
            dict from :func:`camkit.io.annotations.read_annotations`: the class and boxes of the images they
            name, matched by file name, where the input gives none.
        max_member_bytes: a tar image member larger than this is an error row without being read (None: no
            limit).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an unknown layout, an empty folder or manifest, a malformed manifest row or box, an input
            file that is no image, annotations that name none of the images.
    """
    if layout not in LAYOUTS:
        raise CamkitError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not inputs:
        raise CamkitError(
            "no input given: pass image folders, files, a manifest (.csv/.jsonl) or .tar shards"
        )
    anns: Mapping[str, Annotation] | None = None
    source = ""
    if annotations is not None:
        if isinstance(annotations, (str, Path)):
            source = repr(str(annotations))
            anns = read_annotations(annotations)
        else:
            anns = annotations
    cwd = os.path.abspath(os.curdir)
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
                raise CamkitError(f"--layout {kind} needs a folder, got the file {str(p)!r}")
            for f in folder_images(p):
                cls = f.relative_to(p).parts[0] if kind == "imagefolder" else None
                if kind == "imagefolder" and len(f.relative_to(p).parts) < 2:
                    raise CamkitError(
                        f"{str(f)!r} lies directly in the ImageFolder root {str(p)!r}; an ImageFolder tree is "
                        "ROOT/<class>/<image> (use --layout folder for a plain folder)"
                    )
                items.append(Item(path=str(f), cls=cls, file=str(f), root=cwd))
        elif kind == "manifest":
            if p.is_dir():
                raise CamkitError(f"--layout manifest needs a manifest file, got the folder {str(p)!r}")
            items.extend(_manifest(p))
        elif kind == "tar":
            if p.is_dir():
                raise CamkitError(f"--layout tar needs .tar files, got the folder {str(p)!r}")
            items.extend(_tar(p, max_member_bytes))
        else:
            if p.is_dir():
                raise CamkitError(f"--layout {layout} needs files, got the folder {str(p)!r}")
            items.append(_single_file(p))
    if anns is not None:
        items = _annotate(items, anns, source or "given")
    return items


_TARS: dict[str, tarfile.TarFile] = {}  # open shards of this process (one per DataLoader worker)


def read_item(
    item: Item,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_member_bytes: int | None = MAX_IMAGE_MEMBER_BYTES,
) -> Image.Image:
    """The item's image as 8-bit RGB.

    A tar member is checked before it is read: its size (from its header) against ``max_member_bytes``, then
    its pixel count (from the image header) against ``max_pixels``; it is decoded from the shard as a stream,
    never copied whole into memory.

    Raises:
        ValueError: it cannot be read as an image, is over a limit (``item.error``), or has more than
            ``max_pixels`` pixels.
        FileNotFoundError: its file is gone.
    """
    if item.error is not None:
        raise CamkitError(item.error)
    if item.member is None:
        return load_image(item.file, max_pixels=max_pixels)
    tf = _TARS.get(item.file)
    if tf is None:
        tf = _TARS[item.file] = tarfile.open(item.file)
    try:
        info = tf.getmember(item.member)
        if not info.isfile():
            raise CamkitError("not a file member")
        if max_member_bytes is not None and info.size > max_member_bytes:
            raise CamkitError(
                f"the tar member {item.member!r} is {info.size} bytes, more than the limit of {max_member_bytes} "
                "bytes for an image member; it was not read"
            )
        f = tf.extractfile(info)
        if f is None:
            raise CamkitError("not a file member")
        with open_image(f) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise CamkitError(f"{w}x{h} pixels is more than the limit of {max_pixels} (--max-pixels)")
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, KeyError, tarfile.TarError, Image.DecompressionBombError) as err:
        raise CamkitError(f"cannot read {item.path!r} as an image ({err})") from err


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


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker is killed (SIGKILL) as soon as its parent process dies, even
    by SIGKILL, instead of living on with its memory (Linux: ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing).

    ``parent`` is the pid of the process that made the DataLoader (``functools.partial(die_with_parent,
    os.getpid())``): when it is already gone by the time the worker starts, the worker exits at once.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return
    if os.getppid() != parent:  # the parent died before prctl took effect: nobody waits for this worker
        os._exit(0)
