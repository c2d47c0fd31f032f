"""The report of a ``camkit run`` store: records made from the stored table and maps, nothing recomputed.

>>> from camkit.report.store import report_store
>>> report_store("store/", "report.html").bytes_per_image

Per image (one row of the store's table, in index order): the photo, read from its stored path (a tar member is
read from its shard; a photo that is gone gives a grey picture and a note in its card), the stored top-k, the
explained class, one overlay per method (the stored float16 map, stretched bilinearly over the photo), the stored
box per method and the stored metrics (``<method>.<metric>`` columns: sortable and filterable in the page). An
image the run could not read is a row marked ``error`` with the run's reason.

No model is loaded. The maps are read one shard (one zarr chunk) at a time, and the photos are decoded at the
size the report needs (JPEG draft mode), so a store of thousands of images costs the memory of one shard.

An unfinished store (a run still going, or killed) is reported as far as it is done: the rows of the shards with
a done-marker, whose maps are written before their marker, so they are complete even while the run goes on.
:attr:`StoreReport.partial` says so; the page's header line too.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from camkit.errors import CamkitError
from camkit.localize import Box
from camkit.report.html import ReportOptions, ReportStats, write_report
from camkit.report.records import ImageRecord, MapEntry, Prediction
from camkit.run.store import Store, open_store

__all__ = ["StoreReport", "is_store", "report_store", "store_records"]

#: Grey of the picture that stands in for a photo that cannot be read.
_PLACEHOLDER = (128, 128, 128)
#: The longer side of that picture when the photo's size is unknown (an error row).
_PLACEHOLDER_SIDE = 64


def is_store(path: str | Path) -> bool:
    """``path`` is a folder holding a ``camkit run`` store (its ``run.json``), as ``camkit evaluate`` tells."""
    p = Path(path)
    return p.is_dir() and (p / "run.json").is_file()


@dataclass(frozen=True)
class StoreReport:
    """What :func:`report_store` wrote.

    Attributes:
        stats: the file, its size and its number of images (:class:`~camkit.report.ReportStats`).
        total: images of the run (``run.json``).
        done: images whose shard is done (all of them when the run is finished).
        errors: images the run could not read (shown as error rows).
        missing_photos: images whose photo could not be read now (a grey picture and a note in their card).
    """

    stats: ReportStats
    total: int
    done: int
    errors: int
    missing_photos: int

    @property
    def partial(self) -> bool:
        """The run is unfinished: only its done shards are in the report."""
        return self.done < self.total


def _as_store(store: Store | str | Path) -> Store:
    if isinstance(store, Store):
        return store
    if not isinstance(store, (str, Path)):
        raise TypeError(f"store must be a path or a camkit.run.Store, got {type(store).__name__}")
    if not Path(store).is_dir():
        raise CamkitError(f"{str(store)!r} is not a folder; give the folder of a `camkit run` store")
    return open_store(store)


def _choose_methods(store: Store, methods: Sequence[str] | str | None) -> list[str]:
    if methods is None:
        return store.methods
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise CamkitError("no method given: pass some of the store's methods, or None for all of them")
    unknown = [m for m in methods if m not in store.methods]
    if unknown:
        raise CamkitError(
            f"the store holds no maps of {', '.join(map(repr, unknown))}; it has {', '.join(store.methods)}"
        )
    return list(methods)


def _names(paths: Sequence[str]) -> list[str]:
    """Each row's name: its path from the folder all the paths share (the file name for a single image)."""
    if not paths:
        return []
    parents = [os.path.dirname(p) for p in paths]
    try:
        common = os.path.commonpath(parents) if all(parents) else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    out = []
    for p in paths:
        name = os.path.relpath(p, common) if common else p
        out.append(name if name and not name.startswith("..") else p)
    return out


def _locate(path: str, root: Path | None) -> tuple[Path, str | None] | None:
    """The file of a stored path and, for a tar member (``<shard.tar>/<member>``), the member; None if gone."""
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = root / p
    if p.is_file():
        return p, None
    for parent in p.parents:
        if parent.suffix.lower() == ".tar" and parent.is_file():
            return parent, p.relative_to(parent).as_posix()
    return None


def _read_photo(
    path: str, root: Path | None, side: int, tars: dict[Path, tarfile.TarFile]
) -> tuple[Image.Image | None, str | None]:
    """The photo, decoded at about ``side`` pixels when its format allows (JPEG), or None and why."""
    from camkit.io.images import to_rgb

    where = _locate(path, root)
    if where is None:
        hint = (
            ""
            if Path(path).is_absolute()
            else f" (relative paths are read from {str(root) if root is not None else 'the current folder'}; "
            "--image-root to read them from elsewhere)"
        )
        return None, f"photo not found at {path!r}{hint}"
    file, member = where
    try:
        if member is None:
            im = Image.open(file)
        else:
            tf = tars.get(file)
            if tf is None:
                tf = tars[file] = tarfile.open(file)
            f = tf.extractfile(member)
            if f is None:
                return None, f"photo not found: {member!r} is not a file in {str(file)!r}"
            im = Image.open(io.BytesIO(f.read()))
        with im:
            full = im.size
            im.draft("RGB", (side, side))  # JPEG: decoded at 1/2, 1/4 or 1/8 when still >= side
            im.load()
            pic = to_rgb(im)
        if pic.size != full:  # draft kept the aspect ratio up to rounding: bring it to the exact proportions
            scale = max(pic.size) / max(full)
            pic = pic.resize((max(1, round(full[0] * scale)), max(1, round(full[1] * scale))))
        return pic, None
    except (
        OSError,
        SyntaxError,
        ValueError,
        KeyError,
        tarfile.TarError,
        Image.DecompressionBombError,
    ) as err:
        return None, f"the photo {path!r} cannot be read now ({err})"


def _placeholder(size: tuple[int, int] | None, side: int) -> Image.Image:
    if size is None or size[0] < 1 or size[1] < 1:
        return Image.new("RGB", (_PLACEHOLDER_SIDE, _PLACEHOLDER_SIDE), _PLACEHOLDER)
    scale = min(1.0, side / max(size))
    return Image.new("RGB", (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), _PLACEHOLDER)


def _float(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _scalar(value: Any) -> float | None:
    """A stored metric cell as a number (NaN for a missing one), or None for a value that is not one number
    (``<method>.iou_curve``, a list per image: its data-set value, MaxBoxAcc, is in the page's header line)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return float(value)
    return None


def _layer_label(store: Store, method: str | None = None) -> str:
    """The layers and the map grid of one method, or of all (``gradcam 7×7, polycam 28×28`` when they differ)."""
    opts = store.config.get("options", {})
    layers = str(opts.get("layers", "auto"))
    methods = [method] if method is not None else store.methods
    shapes = {m: "{}×{}".format(*store.map_shape(m)) for m in methods}
    grid = (
        next(iter(shapes.values()))
        if len(set(shapes.values())) == 1
        else ", ".join(f"{m} {s}" for m, s in shapes.items())
    )
    return (
        f"{layers} ({grid})" if opts.get("resolution", "feature") == "feature" else f"{layers} (input {grid})"
    )


class _Shards:
    """The stored maps of the chosen methods, read one shard (one zarr chunk) at a time, whole, once."""

    def __init__(self, store: Store, methods: Sequence[str]) -> None:
        self.store = store
        self.arrays = {m: store.maps(m) for m in methods}
        self.block: dict[str, np.ndarray] = {}
        self.range = range(0)

    def map(self, method: str, index: int) -> np.ndarray:
        """The stored map of row ``index`` as float32."""
        if index not in self.range:
            self.range = self.store.shard_range(index // self.store.shard_size)
            start, stop = self.range.start, self.range.stop
            self.block = {m: np.asarray(a[start:stop]) for m, a in self.arrays.items()}
        stored: np.ndarray = self.block[method][index - self.range.start].astype(np.float32)
        return stored


def _method_metrics(row: dict[str, Any], method: str) -> dict[str, float]:
    """The stored ``<method>.<metric>`` cells of one row that are one number each, metric -> value."""
    values: dict[str, float] = {}
    for col in row:
        if col.startswith(f"{method}.") and col != f"{method}.box":
            value = _scalar(row[col])
            if value is not None:
                values[col[len(method) + 1 :]] = value  # a configured name may hold dots
    return values


def _row_maps(
    row: dict[str, Any], methods: Sequence[str], layer: dict[str, str], shards: _Shards, notes: list[str]
) -> tuple[list[MapEntry], dict[str, dict[str, float]]]:
    """One ok row's map entries (with the stored box) and metrics per method; a map that is not finite is left
    out with a note."""
    entries: list[MapEntry] = []
    metrics: dict[str, dict[str, float]] = {}
    for m in methods:
        stored = shards.map(m, int(row["index"]))
        if not np.isfinite(stored).all():
            notes.append(f"{m}: the stored map is not finite (NaN): no overlay")
            continue
        box = row.get(f"{m}.box")
        entries.append(MapEntry(m, layer[m], stored, [Box(*(int(v) for v in box))] if box else []))
        values = _method_metrics(row, m)
        if values:
            metrics[m] = values
    return entries, metrics


def _predictions(row: dict[str, Any]) -> tuple[list[Prediction], Prediction | None]:
    """The stored top-k and the explained class of one row."""
    classes = row.get("topk_classes") or []
    probs = row.get("topk_probs") or []
    labels = row.get("topk_labels") or [None] * len(classes)
    top = [Prediction(int(c), lb, float(p)) for c, p, lb in zip(classes, probs, labels, strict=True)]
    if row.get("class") is None:
        return top, None
    return top, Prediction(int(row["class"]), row.get("label"), _float(row.get("prob")))


@dataclass(frozen=True)
class _Source:
    """What every record of one :func:`store_records` call reads from."""

    store: Store
    methods: list[str]
    root: Path | None
    photo_side: int
    layer: dict[str, str]


def _record(
    src: _Source,
    row: dict[str, Any],
    name: str,
    shards: _Shards,
    tars: dict[Path, tarfile.TarFile],
    tally: dict[str, int],
) -> ImageRecord:
    """The record of one stored row: an error row, or the photo, maps, metrics and predictions."""
    index, path = int(row["index"]), str(row["path"])
    size = (int(row["width"]), int(row["height"])) if row.get("width") and row.get("height") else None
    if row.get("status") != "ok":
        tally["errors"] += 1
        error = str(row.get("error") or "the run could not read this image")
        return ImageRecord(name, _placeholder(size, src.photo_side), error=error, source=path, size=size)
    notes: list[str] = []
    root = src.root if src.root is not None else src.store.path_root(index)
    pic, why = _read_photo(path, root, src.photo_side, tars)
    if pic is None:
        tally["missing_photos"] += 1
        notes.append(str(why))
        pic = _placeholder(size, src.photo_side)
    entries, metrics = _row_maps(row, src.methods, src.layer, shards, notes)
    top, target = _predictions(row)
    return ImageRecord(name, pic, top, target, entries, metrics, source=path, notes=notes, size=size)


def _rows(st: Store, limit: int | None) -> list[dict[str, Any]]:
    """The store's done rows, the first ``limit`` ones."""
    table = st.table()
    if table.num_rows == 0:
        raise CamkitError(
            f"the store {str(st.path)!r} holds no finished image yet (0 of {st.n_shards} shards done); "
            "wait for the run's first shard, or run the same `camkit run` command to resume it"
        )
    if limit is not None:
        table = table.slice(0, limit)
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _source(
    store: Store | str | Path,
    methods: Sequence[str] | str | None,
    limit: int | None,
    image_root: str | Path | None,
    photo_side: int,
) -> _Source:
    """Check the arguments of :func:`store_records`."""
    st = _as_store(store)
    chosen = _choose_methods(st, methods)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CamkitError(f"limit must be a number of images >= 1 (or None: all), got {limit!r}")
    if isinstance(photo_side, bool) or not isinstance(photo_side, int) or photo_side < 1:
        raise CamkitError(f"photo_side must be a number of pixels >= 1, got {photo_side!r}")
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise CamkitError(f"image_root {str(root)!r} is not a folder")
    return _Source(st, chosen, root, photo_side, {m: _layer_label(st, m) for m in chosen})


def store_records(
    store: Store | str | Path,
    methods: Sequence[str] | str | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
    photo_side: int = 800,
    counts: dict[str, int] | None = None,
) -> Iterator[ImageRecord]:
    """The records of a store's rows, in index order, from the stored values only (no model).

    Args:
        store: the store's folder, or an opened :class:`camkit.run.Store`.
        methods: the methods to show (default: all of the store's).
        limit: at most this many rows, the first ones (None: all).
        image_root: the folder relative stored paths are read from (default: the folder the run recorded for
            each row, :meth:`camkit.run.Store.path_root`: the manifest's folder for a manifest's rows, else the
            folder ``camkit run`` was started in).
        photo_side: photos are decoded at no less than this longer side when their format allows it (the
            report's largest picture); the records hold the original size, so boxes stay in original pixels.
        counts: if given, filled with ``errors`` and ``missing_photos`` as the records are made.

    Raises:
        ValueError: not a store, an unknown method, ``limit`` below 1, or no done shard yet.
    """
    src = _source(store, methods, limit, image_root, photo_side)
    rows = _rows(src.store, limit)
    names = _names([str(r["path"]) for r in rows])
    shards = _Shards(src.store, src.methods)
    tally = counts if counts is not None else {}
    tally.setdefault("errors", 0)
    tally.setdefault("missing_photos", 0)
    tars: dict[Path, tarfile.TarFile] = {}
    try:
        for row, name in zip(rows, names, strict=True):
            yield _record(src, row, name, shards, tars, tally)
    finally:
        for tf in tars.values():
            tf.close()


def _meta(store: Store, methods: Sequence[str], shown: int, done: int) -> str:
    opts = store.config.get("options", {})
    model = opts.get("model", "?")
    weights = "" if opts.get("pretrained", True) or opts.get("weights") else " (random weights)"
    line = f"{shown} images · store {store.path.name} · model {model}{weights} · {', '.join(methods)}"
    line += f" · layers {_layer_label(store)} · target {opts.get('target', 'top1')}"
    if "maxboxacc" in opts.get("metrics", ()):
        line += _maxboxacc(store, methods)
    if done < store.n:
        line += f" · unfinished run: {done} of {store.n} images done"
    return line


def _maxboxacc(store: Store, methods: Sequence[str]) -> str:
    """`` · MaxBoxAcc gradcam 0.667, ...``: the data-set values of the store's summary (empty when unknown)."""
    try:
        values = store.summary().get("maxboxacc") or {}
    except (OSError, ValueError):
        return ""
    parts = []
    for m in methods:
        value = values.get(m, {}).get("value") if isinstance(values.get(m), dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{m} {value:.3f}")
    return f" · MaxBoxAcc {', '.join(parts)}" if parts else ""


def report_store(
    store: Store | str | Path,
    out: str | Path,
    options: ReportOptions | None = None,
    *,
    methods: Sequence[str] | str | None = None,
    limit: int | None = None,
    image_root: str | Path | None = None,
) -> StoreReport:
    """Write the HTML report of a ``camkit run`` store (see the module's docstring) to ``out``.

    Args:
        store: the store's folder, or an opened :class:`camkit.run.Store`.
        out: the HTML file to write.
        options: pictures and pages (:class:`~camkit.report.ReportOptions`); default: 128-pixel thumbnails and
            no larger view (``full_side=0``), which keeps a report of thousands of images small.
        methods: the methods to show (default: all of the store's).
        limit: the first ``limit`` images only.
        image_root: the folder relative stored paths are read from (default: where the run recorded them).

    Raises:
        ValueError: not a store, an unknown method, a bad ``limit``, no done shard yet, ``out`` is a folder.
    """
    st = _as_store(store)
    chosen = _choose_methods(st, methods)
    options = options or ReportOptions(thumb_side=128, full_side=0)
    done = sum(len(st.shard_range(s)) for s in st.done_shards())
    shown = min(done, limit) if limit is not None else done
    if options.meta is None:
        options = replace(options, meta=_meta(st, chosen, shown, done))
    counts: dict[str, int] = {}
    records = store_records(
        st,
        chosen,
        limit,
        image_root,
        photo_side=max(options.full_side, options.thumb_side),
        counts=counts,
    )
    stats = write_report(records, out, options)
    return StoreReport(stats, st.n, done, counts.get("errors", 0), counts.get("missing_photos", 0))
