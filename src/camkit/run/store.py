"""The store of ``camkit run``: a folder with the maps (zarr v3), one Parquet row per image, and done-markers.

Layout of ``STORE/``::

    run.json                 camkit's marker and the run's settings: ``format`` ("camkit-run-store"), ``version``,
                             ``state`` ("creating", then "ready"), the options that decide the results, the
                             resolved target layers, each method's map shape, the shard size, where relative
                             paths resolve
    lock                     the store's lock file (an OS lock, ``flock``), held by the run that writes the store
    items.parquet            the inputs: index, path, class, boxes (fixed when the store is created)
    maps.zarr/<method>       float16 [N, H, W] per method (H, W: that method's grid, ``map_shapes``), one chunk per
                             shard, NaN for an unreadable image
    shards/<s>.parquet       the rows of shard s (images s*shard_size ... ), written atomically
    shards/<s>.done          written last, atomically: shard s is complete; it records the size and SHA-256 of
                             every file the shard wrote (its Parquet file and its zarr chunks)
    thumbs/<method>/<index>.jpg   overlays, when asked for
    table.parquet            all rows, in index order: written once every shard is done and verified
    summary.json             counts, means per method, timing, and the size and SHA-256 of table.parquet

A folder is a camkit store only when its ``run.json`` says so (the ``format`` name and a ``version`` camkit
knows); camkit never judges a folder by the names in it. It writes a new store only into a new or empty folder,
and it deletes only its own files of a store it has recognised (``--overwrite``, or a store whose creation was
killed: ``state`` still ``"creating"``), refusing when the store holds anything else.

A shard is complete only when its ``.done`` marker exists and what it records still matches the files; a
resume checks every done shard (sizes and digests) and computes again a shard that does not verify. Everything
of a shard without a marker is rewritten whole on resume (zarr writes each chunk file atomically, and a shard is
exactly one chunk per method), so a killed run resumed with the same command ends bit for bit as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from camkit.errors import CamkitError
from camkit.io.files import atomic_write, file_lock, write_json
from camkit.run.extra import require_run_extra
from camkit.run.sources import Item

try:  # the camkit[run] extra: a Store (open_store, camkit report STORE) and camkit.run.run check it first
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pass

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "LOCK_FILE",
    "OWN_ENTRIES",
    "STORE_VERSION",
    "Store",
    "create_store",
    "inspect_out",
    "open_store",
    "read_marker",
    "settings_differences",
    "store_lock",
    "survey",
]

CONFIG_FILE = "run.json"
LOCK_FILE = "lock"
#: The ``format`` name in ``run.json`` that makes a folder a camkit run store.
FORMAT = "camkit-run-store"
#: The store layout this camkit writes and reads (1: the stores of earlier camkit versions, without ``format``).
STORE_VERSION = 2
#: The entries of a store's folder that camkit writes (and, for ``--overwrite``, deletes: all but ``lock``).
OWN_ENTRIES = (
    CONFIG_FILE,
    "items.parquet",
    "maps.zarr",
    "shards",
    "thumbs",
    "table.parquet",
    "summary.json",
    LOCK_FILE,
)
_OWN_FILES = (CONFIG_FILE, "items.parquet", "table.parquet", "summary.json")
#: :func:`camkit.io.files.atomic_write`'s temporary file beside NAME: ``.NAME.<8 letters>.part``.
_PART = r"\.[a-z0-9_]{8}\.part"
#: zarr's temporary file beside a chunk or metadata file: ``<stem>.<32 hex digits>.partial``.
_PARTIAL = r"\.[0-9a-f]{32}\.partial"
_SHARD_FILE = r"\d{6,}\.(?:parquet|done)"
_THUMB_FILE = r"\d{8,}\.jpg"


def _temporary_of(name: str, pattern: str) -> bool:
    """``name`` is atomic_write's temporary file of a file whose name matches ``pattern``."""
    return re.fullmatch(r"\." + pattern + _PART, name) is not None


def _schema_items() -> pa.Schema:
    return pa.schema(
        [
            ("index", pa.int64()),
            ("path", pa.string()),
            ("true_class", pa.string()),
            ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
        ]
    )


def _digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex digest}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"bytes": size, "sha256": h.hexdigest()}


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of the camkit store in the folder ``path``; None when the folder holds no ``run.json``.

    Raises:
        ValueError: a ``run.json`` that camkit did not write (no ``format`` marker, or not JSON), one of a store
            made by an older camkit (its layout has no marker and no verifiable done-markers), or one of a newer
            camkit.
    """
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not cfg.exists() and not cfg.is_symlink():
        return None
    data: Any = None
    if cfg.is_file() and not cfg.is_symlink():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            data = None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        version = data.get("version")
        if not isinstance(version, int) or version > STORE_VERSION:
            raise CamkitError(
                f"{str(p)!r} is a camkit run store of format version {version!r}, newer than this camkit reads "
                f"({STORE_VERSION}); upgrade camkit (pip install -U camkit)"
            )
        if version < STORE_VERSION:  # pragma: no cover - version 1 stores have no format marker
            raise CamkitError(f"{str(p)!r} is a camkit run store of the old format version {version}")
        return data
    if isinstance(data, dict) and "format" not in data and {"options", "map_shape", "n"} <= set(data):
        raise CamkitError(
            f"{str(p)!r} is a store made by an older camkit (its run.json has no format marker, its shards no "
            "verifiable done-markers): this camkit neither reads nor resumes it; run `camkit run` again with a "
            "new --out (and delete the old folder yourself once you no longer need it)"
        )
    raise CamkitError(
        f"{str(p)!r} holds a {CONFIG_FILE} that camkit did not write, so it is not a camkit run store; give "
        "`camkit run` a new or empty folder as --out"
    )


class Store:
    """A ``camkit run`` store opened for reading (and, by the runner, for writing shards).

    Attributes:
        path: the store folder.
        config: the settings of the run (``run.json``): ``format``, ``version``, ``state``, ``options`` (what
            decides the results: model, weights digest, methods, layers as given, target, resolution, metrics,
            ...), ``layers`` (the target layers they resolved to), ``n`` (images), ``shard_size``, ``map_shapes``
            (method -> [H, W]: at ``--resolution feature`` each method's maps are at its own grid, e.g. Poly-CAM's
            at its shallowest layer), ``methods``, ``inputs_digest``, ``path_roots``.
    """

    def __init__(self, path: str | Path) -> None:
        require_run_extra("a camkit run store")
        self.path = Path(path)
        config = read_marker(self.path)
        if config is None:
            raise CamkitError(
                f"{str(self.path)!r} is not a camkit run store (no {CONFIG_FILE}); run `camkit run` first"
            )
        if config.get("state") != "ready":
            raise CamkitError(
                f"the camkit run store {str(self.path)!r} is being created, or its creation was interrupted; "
                "wait for the run that creates it, or run the same `camkit run` command again"
            )
        self.config: dict[str, Any] = config
        self._group: Any = None
        self._reader: Any = None

    # -------------------------------------------------------------------------------------------- reading

    @property
    def n(self) -> int:
        """Number of images (rows)."""
        return int(self.config["n"])

    @property
    def shard_size(self) -> int:
        return int(self.config["shard_size"])

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n / self.shard_size)

    @property
    def methods(self) -> list[str]:
        """The methods whose maps the store holds."""
        return list(self.config["methods"])

    def shard_range(self, shard: int) -> range:
        """The row indices of a shard."""
        return range(shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size))

    def done_shards(self) -> set[int]:
        """The shards with a done-marker."""
        d = self.path / "shards"
        if not d.is_dir():
            return set()
        return {int(f.stem) for f in d.glob("*.done") if f.stem.isdigit()}

    @property
    def complete(self) -> bool:
        """Every shard is done."""
        return len(self.done_shards()) == self.n_shards

    def items(self) -> pa.Table:
        """The inputs (index, path, true_class, gt_boxes)."""
        return pq.read_table(self.path / "items.parquet")

    def table(self) -> pa.Table:
        """One row per image, in index order (the done shards only, while a run is unfinished).

        Columns: ``index``, ``path``, ``width``, ``height``, ``status`` (``ok`` or ``error``), ``error`` (why the
        image could not be read), ``true_class``, ``gt_boxes``, ``topk_classes``, ``topk_probs``,
        ``topk_labels``, ``class`` (explained), ``label``, ``prob``; per method ``<method>.box`` (``[x0, y0, x1,
        y1]`` in original pixels at the run's threshold, null when the map is empty) and the metrics asked for,
        ``<method>.deletion``, ``<method>.insertion``, ``<method>.pointing``, ``<method>.box_iou``,
        ``<method>.box_acc`` (NaN where an image has no ground-truth box).
        """
        merged = self.path / "table.parquet"
        if merged.is_file():
            return pq.read_table(merged)
        parts = [pq.read_table(self._shard_file(s)) for s in sorted(self.done_shards())]
        if not parts:
            return pa.table({"index": pa.array([], pa.int64()), "status": pa.array([], pa.string())})
        return pa.concat_tables(parts)

    def map_shape(self, method: str) -> tuple[int, int]:
        """(H, W) of a method's stored maps (each method has its own: see ``map_shapes`` in ``run.json``)."""
        if method not in self.methods:
            raise CamkitError(f"the store holds no maps of {method!r}; it has {', '.join(self.methods)}")
        shapes = self.config.get("map_shapes")
        h, w = shapes[method] if isinstance(shapes, dict) else self.config["map_shape"]  # older stores: one
        return int(h), int(w)

    def maps(self, method: str) -> Any:
        """The ``zarr.Array`` of a method's maps, float16 ``[N, H, W]`` in [0, 1] with that method's
        :meth:`map_shape` (NaN rows: images not explained: unreadable, or not done yet).
        ``store.maps("gradcam")[i]`` is image i's map as numpy."""
        if method not in self.methods:
            raise CamkitError(f"the store holds no maps of {method!r}; it has {', '.join(self.methods)}")
        import zarr

        if self._reader is None:  # read-only: a store on a read-only file system or shared with readers
            self._reader = zarr.open_group(str(self.path / "maps.zarr"), mode="r")
        return self._reader[method]

    def path_root(self, index: int) -> Path | None:
        """The folder image ``index``'s relative ``path`` resolves from, as recorded when the run was made (a
        manifest's folder for its rows, else the folder ``camkit run`` was started in); None for a store that
        recorded none (made by an older camkit: the current folder)."""
        roots = self.config.get("path_roots")
        if not isinstance(roots, list):
            return None
        found: str | None = None
        for start, root in roots:
            if int(start) > index:
                break
            found = str(root)
        return Path(found) if found else None

    def thumbnail(self, method: str, index: int) -> Path | None:
        """The overlay JPEG of an image for a method, when the run wrote thumbnails."""
        p = self.path / "thumbs" / method / f"{index:08d}.jpg"
        return p if p.is_file() else None

    def summary(self) -> dict[str, Any]:
        """``summary.json`` (written when the run finished), else one computed from the done shards."""
        p = self.path / "summary.json"
        if p.is_file():
            data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
            return data
        return summarize(self.table(), self.methods, self.config)

    # -------------------------------------------------------------------------------------- verification

    def _marker_file(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:06d}.done"

    def _chunk_path(self, method: str) -> Callable[[int], str]:
        """shard -> the path (relative to the store) of its zarr chunk of ``method``'s maps."""
        array = self._zarr_group()[method] if self._reader is None else self._reader[method]
        meta, ndim = array.metadata, array.ndim
        return lambda s: f"maps.zarr/{method}/{meta.encode_chunk_key((s,) + (0,) * (ndim - 1))}"

    def verify_shard(self, shard: int, digests: bool = True) -> str | None:
        """None when the shard's done-marker matches its files, else why not.

        The marker records every file the shard wrote (its Parquet file and its zarr chunk per method, or that
        a chunk was left absent: all its maps were NaN) with its size and SHA-256; ``digests=False`` checks the
        sizes only (a quick look that catches deleted and truncated files, not rewritten bytes).
        """
        try:
            marker = json.loads(self._marker_file(shard).read_text(encoding="utf-8"))
            files = marker["files"]
            rows = int(marker["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return "its done-marker is unreadable"
        if rows != len(self.shard_range(shard)) or not isinstance(files, dict):
            return "its done-marker does not match the store"
        expected = {f"shards/{shard:06d}.parquet"}
        expected |= {f"maps.zarr/{m}/" for m in self.methods}
        for name, record in files.items():
            if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute():
                return "its done-marker names a file outside the store"
            if record is not None and not isinstance(record, dict):
                return "its done-marker is unreadable"
            target = self.path / name
            if record is None:
                if target.exists():
                    return f"{name} exists where the shard left no chunk"
                continue
            try:
                size = target.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != record.get("bytes"):
                return f"{name} has {size} bytes, {record.get('bytes')} were written"
            if digests and _digest(target)["sha256"] != record.get("sha256"):
                return f"{name} changed since it was written (SHA-256)"
        named = {n if not n.startswith("maps.zarr/") else "maps.zarr/" + n.split("/")[1] + "/" for n in files}
        if not expected <= named:
            return "its done-marker lacks some of the shard's files"
        return None

    def check_done(self, warn: Callable[[str], None] | None = None) -> list[int]:
        """Verify every done shard (sizes and SHA-256); drop the marker of each that does not verify, so that
        the run computes it again, saying so through ``warn``. Returns the shards dropped. Call it holding the
        store's lock (:func:`store_lock`)."""
        say = warn or _warn
        bad = []
        for s in sorted(self.done_shards()):
            if s >= self.n_shards:
                why: str | None = "the store has no such shard"
            else:
                why = self.verify_shard(s)
            if why is not None:
                bad.append((s, why))
        if bad:
            for stale in ("summary.json", "table.parquet"):  # merged from shards that no longer verify
                (self.path / stale).unlink(missing_ok=True)
        for s, why in bad:
            r = self.shard_range(s)
            say(
                f"shard {s} of the store {str(self.path)!r} (images {r.start}-{r.stop - 1}) does not verify "
                f"({why}): computing it again"
            )
            self._marker_file(s).unlink(missing_ok=True)
        return [s for s, _ in bad]

    def is_finished(self) -> bool:
        """Every shard done and its files present with the sizes its marker records, the table merged and the
        summary written (checked without writing anything)."""
        if not self.complete or any(self.verify_shard(s, digests=False) for s in range(self.n_shards)):
            return False
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
            size = (self.path / "table.parquet").stat().st_size
        except (OSError, ValueError):
            return False
        return isinstance(summary, dict) and summary.get("table", {}).get("bytes") == size

    # -------------------------------------------------------------------------------------------- writing

    def _zarr_group(self) -> Any:
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path / "maps.zarr"), mode="r+")
        return self._group

    def _shard_file(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:06d}.parquet"

    def write_shard(self, shard: int, rows: pa.Table, maps: dict[str, np.ndarray]) -> None:
        """Write a whole shard: its maps (one zarr chunk per method), its rows, then its done-marker (which
        records the size and SHA-256 of each file written)."""
        rng = self.shard_range(shard)
        group = self._zarr_group()
        files: dict[str, dict[str, Any] | None] = {}
        for method, arr in maps.items():
            if arr.shape[0] != len(rng):
                raise CamkitError(f"shard {shard} holds {len(rng)} images, got {arr.shape[0]} maps")
            group[method][rng.start : rng.stop] = arr.astype(np.float16)
            chunk = self._chunk_path(method)(shard)
            # zarr writes no chunk (and removes an old one) when every value is the fill value, NaN
            files[chunk] = _digest(self.path / chunk) if (self.path / chunk).is_file() else None
        (self.path / "shards").mkdir(exist_ok=True)
        buf = io.BytesIO()
        pq.write_table(rows, buf)
        data = buf.getvalue()
        with atomic_write(self._shard_file(shard)) as f:
            f.write(data)
        files[f"shards/{shard:06d}.parquet"] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        with atomic_write(self._marker_file(shard), "w") as f:
            f.write(json.dumps({"rows": rows.num_rows, "files": files}) + "\n")

    def merge(self) -> pa.Table:
        """Concatenate the shards into ``table.parquet`` (checked: each shard's Parquet file as its marker
        recorded it, every index exactly once, in order)."""
        missing = sorted(set(range(self.n_shards)) - self.done_shards())
        if missing:
            raise CamkitError(f"cannot merge: {len(missing)} shard(s) not done (first: {missing[0]})")
        parts = []
        for s in range(self.n_shards):
            why = self.verify_shard(s, digests=False)
            data = self._shard_file(s).read_bytes() if why is None else b""
            marker = json.loads(self._marker_file(s).read_text(encoding="utf-8")) if why is None else {}
            record = marker.get("files", {}).get(f"shards/{s:06d}.parquet") or {}
            if why is None and hashlib.sha256(data).hexdigest() != record.get("sha256"):
                why = "its Parquet file changed since it was written (SHA-256)"
            if why is not None:
                self._marker_file(s).unlink(missing_ok=True)
                raise RuntimeError(
                    f"shard {s} of the store {str(self.path)!r} changed while the run ran ({why}); run the same "
                    "command again to compute it again"
                )
            parts.append(pq.read_table(pa.BufferReader(data)))
        table = pa.concat_tables(parts)
        idx = table.column("index").to_numpy()
        if len(idx) != self.n or not np.array_equal(idx, np.arange(self.n)):
            raise RuntimeError(f"the shards hold {len(idx)} rows for {self.n} images, or out of order")
        with atomic_write(self.path / "table.parquet") as f:
            pq.write_table(table, f)
        return table

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` (last: the store is finished), with the size and SHA-256 of the table."""
        write_json(self.path / "summary.json", {**summary, "table": _digest(self.path / "table.parquet")})

    def store_bytes(self) -> int:
        """Bytes of the maps, table and thumbnails on disk (the shards' copies of the rows not counted)."""
        total = 0
        for root, _, files in os.walk(self.path):
            if Path(root).name == "shards":
                continue
            total += sum((Path(root) / f).stat().st_size for f in files)
        return total


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------------ the folder


class _Rule(NamedTuple):
    """What camkit writes in one kind of folder of a store: file names (a regular expression), folders by name
    (-> their rule), and the rule of a folder named after one of the store's methods or after a number."""

    files: str
    folders: dict[str, str]
    method: str | None = None
    number: str | None = None


_META = r"zarr\.json|zarr" + _PARTIAL
_TOP_FILES = [re.escape(n) for n in (*_OWN_FILES, LOCK_FILE)] + [
    r"\." + re.escape(n) + _PART for n in _OWN_FILES
]
#: camkit's folders of a store by rule: the store's own folder (``top``), then shards, thumbnails, zarr arrays.
_RULES: dict[str, _Rule] = {
    "top": _Rule("|".join(_TOP_FILES), {"shards": "shards", "thumbs": "thumbs", "maps.zarr": "zarr"}),
    "shards": _Rule(_SHARD_FILE + r"|\." + _SHARD_FILE + _PART, {}),
    "thumbs": _Rule("(?!)", {}, method="thumb"),
    "thumb": _Rule(_THUMB_FILE + r"|\." + _THUMB_FILE + _PART, {}),
    "zarr": _Rule(_META, {}, method="array"),
    "array": _Rule(_META, {"c": "chunks"}),
    "chunks": _Rule(r"\d+(?:" + _PARTIAL + ")?", {}, number="chunks"),
}


def _own_entry(rule: _Rule, e: os.DirEntry[str], methods: Sequence[str]) -> str | None:
    """What the entry ``e`` of a folder under ``rule`` is to camkit: ``"file"`` (its own file), the rule of its
    own folder, or None (the user's: a symbolic link, or a name camkit does not write there)."""
    if e.is_symlink():
        return None
    if e.is_file():
        return "file" if re.fullmatch(rule.files, e.name) is not None else None
    if not e.is_dir():
        return None
    if e.name in rule.folders:
        return rule.folders[e.name]
    if rule.method is not None and e.name in methods:
        return rule.method
    if rule.number is not None and e.name.isdigit():
        return rule.number
    return None


def _own_tree(
    p: Path, methods: Sequence[str], folder: Path | None = None, rule: str = "top"
) -> tuple[list[Path], list[Path], list[str]]:
    """What the folder of a store holds: (camkit's files, camkit's folders, anything else).

    camkit's own are the entries of :data:`OWN_ENTRIES` (files as files, folders as folders, never a symbolic
    link) with, inside its folders, the names camkit and zarr write there (shard files, thumbnails of the
    store's methods, zarr metadata and chunk files of its methods) and the temporary files of its atomic
    writes (``_RULES``). Anything else, at any depth, is the user's. ``folder`` and ``rule``: where the walk
    is (the store's folder itself: not among camkit's folders).
    """
    files: list[Path] = []
    dirs: list[Path] = [] if folder is None else [folder]
    foreign: list[str] = []
    for e in sorted(os.scandir(folder or p), key=lambda e: e.name):
        kind = _own_entry(_RULES[rule], e, methods)
        if kind is None:
            foreign.append(str(Path(e.path).relative_to(p)))
        elif kind == "file":
            files.append(Path(e.path))
        else:
            sub = _own_tree(p, methods, Path(e.path), kind)
            files += sub[0]
            dirs += sub[1]
            foreign += sub[2]
    return files, dirs, foreign


def _listing(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def inspect_out(path: str | Path) -> dict[str, Any] | None:
    """Look at ``--out`` before any work, writing nothing: the ``run.json`` of the camkit store there, or None
    for a folder that does not exist yet or is empty (an empty ``lock`` file and camkit's temporary files of
    ``run.json`` count as empty: what a creation killed at its first step leaves).

    Raises:
        ValueError: ``path`` is a file, a folder that holds anything else (hidden entries such as ``.git``
            included), a folder that cannot be created, or holds a ``run.json`` camkit did not write.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CamkitError(f"--out {str(p)!r} is a file; give a folder for the store")
    if not p.exists():
        if p.is_symlink():
            raise CamkitError(f"--out {str(p)!r} is a symbolic link to nothing; give a folder for the store")
        parent = next(q for q in p.absolute().parents if q.exists())
        if not parent.is_dir():
            raise CamkitError(f"--out {str(p)!r} has a file on its path ({str(parent)!r}); choose a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise CamkitError(
                f"cannot create the store {str(p)!r}: the folder {str(parent)!r} is not writable"
            )
        return None
    config = read_marker(p)
    if config is not None:
        return config
    others = []
    for e in sorted(os.scandir(p), key=lambda e: e.name):
        idle = e.is_file() and not e.is_symlink()
        idle = idle and (
            (e.name == LOCK_FILE and e.stat().st_size == 0) or _temporary_of(e.name, re.escape(CONFIG_FILE))
        )
        if not idle:
            others.append(e.name)
    if others:
        raise CamkitError(
            f"--out {str(p)!r} is a folder that holds other files ({_listing(others)}), not a camkit run store; "
            "camkit writes a new store only into a new or empty folder: choose one"
        )
    return None


def survey(path: str | Path, config: dict[str, Any], overwrite: bool = False) -> bool:
    """Decide, before any model work and writing nothing, what a run with ``config`` will do with ``path``:
    True when the store there is finished with the same settings (nothing to do), False when a store is to be
    created, resumed or (``overwrite``) started again.

    ``config`` may lack ``layers`` (the resolved target layers, known once the model is loaded): the layers are
    then the same when given as the store's (``--layers`` as given then, or the names it resolved to);
    otherwise the question waits for the model (False).

    Raises:
        ValueError: ``path`` cannot hold the store (see :func:`inspect_out`), the store was made with other
            settings (and not ``overwrite``), ``overwrite`` or a half-created store with files camkit did not
            write in it, or an unfinished store in a folder that cannot be written.
    """
    p = Path(path)
    found = inspect_out(p)
    if found is None:
        return False
    if overwrite or found.get("state") != "ready":
        foreign = _own_tree(p, list(found.get("methods") or []))[2]
        if foreign:
            raise CamkitError(_foreign_message(p, foreign, overwrite))
        return False
    diff = settings_differences(found, config)
    if diff:
        raise CamkitError(_differ_message(p, diff))
    if "layers" in config or _same_layers(found, config):
        if Store(p).is_finished():
            return True
    if not os.access(p, os.W_OK | os.X_OK):
        raise CamkitError(
            f"the store {str(p)!r} is unfinished and its folder is not writable; make it writable to resume it"
        )
    return False


def _foreign_message(p: Path, foreign: Sequence[str], overwrite: bool) -> str:
    what = "--overwrite deletes only camkit's own files, but" if overwrite else "the half-created"
    return (
        f"{what} store {str(p)!r} holds files camkit did not write ({_listing(foreign)}); move them out of "
        "the store folder, then run again"
    )


def _differ_message(p: Path, diff: Sequence[str]) -> str:
    return (
        f"the store {str(p)!r} was made with other settings ({'; '.join(diff)}); run the same command to "
        "resume it, or pass --overwrite to start it again (its results are deleted)"
    )


@contextmanager
def store_lock(path: str | Path) -> Iterator[None]:
    """Create the store's folder if needed and hold its lock (``STORE/lock``) inside the block: the run that
    creates, resumes, computes and merges a store holds it throughout; another one is refused at once.

    Raises:
        ValueError: the store is in use by another camkit process, or the folder cannot be created or locked
            (a read-only file system).
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CamkitError(f"cannot create the store folder {str(p)!r}: {err.strerror or err}") from err
    lock = p / LOCK_FILE
    if lock.is_symlink() or (lock.exists() and (not lock.is_file() or lock.stat().st_size > 0)):
        raise CamkitError(
            f"{str(lock)!r} is not camkit's lock file (camkit's is an empty file); move it away"
        )
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock, timeout=0, what=f"the store {p}"))
        except OSError as err:
            raise CamkitError(
                f"cannot lock the store {str(p)!r} ({err.strerror or err}); a store that is created or resumed "
                "must be on a writable file system"
            ) from err
        yield


def _drop_temporaries(p: Path, methods: Sequence[str]) -> None:
    """Delete the temporary files of camkit's atomic writes and zarr's (``_RULES``) that a killed run left in
    the store ``p``; the caller holds the store's lock, so no writer of the store is running. Only names that
    camkit or zarr write are touched; the user's files, and camkit's finished files, stay."""
    files, _dirs, _foreign = _own_tree(p, methods)
    for f in files:
        if re.search(_PART + "$|" + _PARTIAL + "$", f.name) is not None:
            f.unlink(missing_ok=True)


def create_store(
    path: str | Path,
    config: dict[str, Any],
    items: Sequence[Item],
    map_shapes: Mapping[str, tuple[int, int]],
    overwrite: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Store:
    """Create a store, or open an existing one made with the same settings and inputs (and verify its done
    shards, dropping the markers of those that do not verify). Call it holding :func:`store_lock`.

    Resuming deletes the temporary files that a killed run left (:func:`_drop_temporaries`). A half-created
    store (``state`` still ``"creating"``: its creator was killed, since the lock is free) and,
    with ``overwrite``, a finished one are started again: camkit deletes its own files of the store (never
    ``lock``), and refuses when the folder holds anything else.

    ``map_shapes``: (H, W) of each method's maps (one zarr array per method, each with its own shape).

    Raises:
        ValueError: the folder is not a camkit store and not empty, holds a store made with other settings or
            inputs (unless ``overwrite``), or files camkit did not write where it would delete its own.
    """
    import zarr

    p = Path(path)
    found = inspect_out(p)
    if found is not None and found.get("state") == "ready" and not overwrite:
        diff = settings_differences(found, config)
        if diff:
            raise CamkitError(_differ_message(p, diff))
        _drop_temporaries(p, list(found.get("methods") or []))
        store = Store(p)
        store.check_done(warn)
        return store
    files, dirs, foreign = _own_tree(p, list(found.get("methods") or []) if found else [])
    if foreign:
        raise CamkitError(_foreign_message(p, foreign, overwrite and found is not None))
    base = {"format": FORMAT, "version": STORE_VERSION}
    write_json(p / CONFIG_FILE, {**base, "state": "creating", **config})  # first: the folder is camkit's
    for own in files:
        if own.parent != p or own.name not in (CONFIG_FILE, LOCK_FILE):
            own.unlink()
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        d.rmdir()
    table = pa.table(
        {
            "index": pa.array(range(len(items)), pa.int64()),
            "path": [it.path for it in items],
            "true_class": [it.cls for it in items],
            "gt_boxes": [[list(b) for b in it.boxes] for it in items],
        },
        schema=_schema_items(),
    )
    with atomic_write(p / "items.parquet") as f:
        pq.write_table(table, f)
    group = zarr.open_group(str(p / "maps.zarr"), mode="w", zarr_format=3)
    n = len(items)
    for method in config["methods"]:
        h, w = map_shapes[method]
        group.create_array(
            method,
            shape=(n, h, w),
            chunks=(min(config["shard_size"], max(n, 1)), h, w),
            dtype="float16",
            fill_value=np.float16("nan"),
        )
    shapes = {m: [int(v) for v in map_shapes[m]] for m in config["methods"]}
    write_json(p / CONFIG_FILE, {**base, "state": "ready", **config, "map_shapes": shapes})
    return Store(p)


def _same_layers(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """The ``--layers`` of ``new`` (as given) are those of the store without resolving them: the same text, or
    the names the store's resolved to."""
    given = str(new.get("options", {}).get("layers"))
    if given == old.get("options", {}).get("layers"):
        return True
    return [s.strip() for s in given.split(",") if s.strip()] == old.get("layers")


def settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a store's settings and a run's, one phrase each ("methods: [...] then, [...] now").

    Target layers are compared as resolved (``layers``: ``--layers auto`` and the name it chose are the same
    setting), when ``new`` has them; the map shape follows from the rest and is not compared.
    """
    out = []
    a, b = old.get("options"), new.get("options")
    if isinstance(a, dict) and isinstance(b, dict):
        out += [
            f"{k}: {a.get(k)!r} then, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b))
            if k != "layers" and a.get(k) != b.get(k)
        ]
    elif a != b:
        out.append("the options")
    if "layers" in new and old.get("layers") != new["layers"]:
        out.append(f"target layers: {old.get('layers')!r} then, {new['layers']!r} now")
    for key, what in (("n", "images"), ("shard_size", "shard size")):
        if old.get(key) != new.get(key):
            out.append(f"{what}: {old.get(key)!r} then, {new.get(key)!r} now")
    if old.get("inputs_digest") != new.get("inputs_digest"):
        out.append("the list of inputs changed")
    return out


def open_store(path: str | Path) -> Store:
    """Open a ``camkit run`` store for reading: ``.config``, ``.table()``, ``.maps(method)``, ``.summary()``.

    Raises:
        ValueError: zarr or pyarrow is not installed (``pip install "camkit[run]"``), the folder is not a store
            (no ``run.json`` with camkit's format marker), a store made by an older camkit, or one whose creation
            did not finish.
    """
    return Store(path)


def summarize(table: pa.Table, methods: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    """Counts and, per method, the mean of each metric column over the images that have a value (NaN left out,
    as :func:`camkit.evaluate.evaluate` does), and ``maxboxacc``: MaxBoxAccV2 over the IoU curves of the images
    with ground-truth boxes (None when none has boxes); with curves, a ``maxboxacc`` key like evaluate's too
    (method -> ``value`` and the accuracy at each IoU threshold, ``iou_0.3``, ``iou_0.5``, ``iou_0.7``)."""
    from camkit.evaluate import IOU_THRESHOLDS, METRICS
    from camkit.metrics import max_box_acc_v2

    n = table.num_rows
    status = table.column("status").to_pylist() if n else []
    means: dict[str, dict[str, float | None]] = {}
    mba: dict[str, dict[str, float]] = {}
    for m in methods:
        means[m] = {}
        for col in table.column_names:
            if not col.startswith(f"{m}.") or col == f"{m}.box":
                continue
            if col == f"{m}.iou_curve":
                curves = [c for c in table.column(col).to_pylist() if c is not None]
                means[m]["maxboxacc"] = None
                if curves:
                    res = max_box_acc_v2(torch.tensor(curves, dtype=torch.float32), IOU_THRESHOLDS)
                    means[m]["maxboxacc"] = res.value
                    mba[m] = {"value": res.value} | {f"iou_{k}": v for k, v in res.per_iou.items()}
                continue
            vals = np.asarray(table.column(col).to_numpy(zero_copy_only=False), dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            means[m][col[len(m) + 1 :]] = float(vals.mean()) if len(vals) else None  # the name may hold dots
    out: dict[str, Any] = {
        "images": int(config.get("n", n)),
        "rows": n,
        "ok": sum(s == "ok" for s in status),
        "errors": sum(s == "error" for s in status),
        "methods": list(methods),
        "metrics": means,
    }
    box_metrics = [
        m
        for m in config.get("options", {}).get("metrics", ())
        if m.partition("(")[0] in METRICS and METRICS[m.partition("(")[0]].needs_boxes
    ]
    if box_metrics and n:  # images the box metrics leave out: ok rows without ground-truth boxes
        boxes = table.column("gt_boxes").to_pylist()
        out["without_boxes"] = sum(1 for s, b in zip(status, boxes, strict=True) if s == "ok" and not b)
    if mba:
        out["maxboxacc"] = mba
    return out
