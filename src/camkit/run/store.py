"""The store of ``camkit run``: a folder with the maps (zarr v3), one Parquet row per image, and done-markers.

Layout of ``STORE/``::

    run.json                 the run's settings (what decides the results), each method's map shape, the shard size
    items.parquet            the inputs: index, path, class, boxes (fixed when the store is created)
    maps.zarr/<method>       float16 [N, H, W] per method (H, W: that method's grid, ``map_shapes``), one chunk per
                             shard, NaN for an unreadable image
    shards/<s>.parquet       the rows of shard s (images s*shard_size ... ), written atomically
    shards/<s>.done          written last, atomically: shard s is complete
    thumbs/<method>/<index>.jpg   overlays, when asked for
    table.parquet            all rows, in index order: written once every shard is done
    summary.json             counts, means per method, timing

A shard is complete only when its ``.done`` marker exists; everything of a shard without one is rewritten
whole on resume (zarr writes each chunk file atomically, and a shard is exactly one chunk per method), so a
killed run resumed with the same command ends bit for bit as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from camkit.io.files import atomic_write, write_json
from camkit.run.sources import Item

__all__ = ["CONFIG_FILE", "Store", "create_store", "open_store"]

CONFIG_FILE = "run.json"
STORE_VERSION = 1


def _schema_items() -> pa.Schema:
    return pa.schema(
        [
            ("index", pa.int64()),
            ("path", pa.string()),
            ("true_class", pa.string()),
            ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
        ]
    )


class Store:
    """A ``camkit run`` store opened for reading (and, by the runner, for writing shards).

    Attributes:
        path: the store folder.
        config: the settings of the run (``run.json``): ``options`` (what decides the results: model, weights,
            methods, layers, target, resolution, metrics, ...), ``n`` (images), ``shard_size``, ``map_shapes``
            (method -> [H, W]: at ``--resolution feature`` each method's maps are at its own grid, e.g. Poly-CAM's
            at its shallowest layer), ``methods``, ``path_roots``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg = self.path / CONFIG_FILE
        if not cfg.is_file():
            raise ValueError(
                f"{str(self.path)!r} is not a camkit run store (no {CONFIG_FILE}); run `camkit run` first"
            )
        self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
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
            raise ValueError(f"the store holds no maps of {method!r}; it has {', '.join(self.methods)}")
        shapes = self.config.get("map_shapes")
        h, w = shapes[method] if isinstance(shapes, dict) else self.config["map_shape"]  # older stores: one
        return int(h), int(w)

    def maps(self, method: str) -> Any:
        """The ``zarr.Array`` of a method's maps, float16 ``[N, H, W]`` in [0, 1] with that method's
        :meth:`map_shape` (NaN rows: images not explained: unreadable, or not done yet).
        ``store.maps("gradcam")[i]`` is image i's map as numpy."""
        if method not in self.methods:
            raise ValueError(f"the store holds no maps of {method!r}; it has {', '.join(self.methods)}")
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

    # -------------------------------------------------------------------------------------------- writing

    def _zarr_group(self) -> Any:
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path / "maps.zarr"), mode="r+")
        return self._group

    def _shard_file(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:06d}.parquet"

    def write_shard(self, shard: int, rows: pa.Table, maps: dict[str, np.ndarray]) -> None:
        """Write a whole shard: its maps (one zarr chunk per method), its rows, then its done-marker."""
        rng = self.shard_range(shard)
        group = self._zarr_group()
        for method, arr in maps.items():
            if arr.shape[0] != len(rng):
                raise ValueError(f"shard {shard} holds {len(rng)} images, got {arr.shape[0]} maps")
            group[method][rng.start : rng.stop] = arr.astype(np.float16)
        (self.path / "shards").mkdir(exist_ok=True)
        with atomic_write(self._shard_file(shard)) as f:
            pq.write_table(rows, f)
        with atomic_write(self.path / "shards" / f"{shard:06d}.done", "w") as f:
            f.write(json.dumps({"rows": rows.num_rows}) + "\n")

    def merge(self) -> pa.Table:
        """Concatenate the shards into ``table.parquet`` (checked: every index exactly once, in order)."""
        missing = sorted(set(range(self.n_shards)) - self.done_shards())
        if missing:
            raise ValueError(f"cannot merge: {len(missing)} shard(s) not done (first: {missing[0]})")
        table = pa.concat_tables([pq.read_table(self._shard_file(s)) for s in range(self.n_shards)])
        idx = table.column("index").to_numpy()
        if len(idx) != self.n or not np.array_equal(idx, np.arange(self.n)):
            raise RuntimeError(f"the shards hold {len(idx)} rows for {self.n} images, or out of order")
        with atomic_write(self.path / "table.parquet") as f:
            pq.write_table(table, f)
        return table

    def store_bytes(self) -> int:
        """Bytes of the maps, table and thumbnails on disk (the shards' copies of the rows not counted)."""
        total = 0
        for root, _, files in os.walk(self.path):
            if Path(root).name == "shards":
                continue
            total += sum((Path(root) / f).stat().st_size for f in files)
        return total


def create_store(
    path: str | Path,
    config: dict[str, Any],
    items: Sequence[Item],
    map_shapes: Mapping[str, tuple[int, int]],
    overwrite: bool = False,
) -> Store:
    """Create a store, or open an existing one made with the same ``config["options"]`` and inputs.

    ``map_shapes``: (H, W) of each method's maps (one zarr array per method, each with its own shape).

    Raises:
        ValueError: the folder holds a store made with other options or inputs (unless ``overwrite``: then it is
            deleted first), or holds other files.
    """
    import zarr

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {str(p)!r} is a file; give a folder for the store")
    if p.is_dir() and not (p / CONFIG_FILE).is_file() and _half_created(p):
        shutil.rmtree(p)  # a creation killed before run.json was written: nothing was computed yet
    if p.is_dir() and any(p.iterdir()):
        if not (p / CONFIG_FILE).is_file():
            raise ValueError(
                f"--out {str(p)!r} is a folder that holds other files, not a camkit run store; choose a new or "
                "empty folder"
            )
        if overwrite:
            shutil.rmtree(p)
        else:
            old = Store(p)
            diff = _differences(old.config, config)
            if diff:
                raise ValueError(
                    f"the store {str(p)!r} was made with other settings ({'; '.join(diff)}); run the same "
                    "command to resume it, or pass --overwrite to start it again (its results are deleted)"
                )
            return old
    p.mkdir(parents=True, exist_ok=True)
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
    write_json(p / CONFIG_FILE, {**config, "map_shapes": shapes, "version": STORE_VERSION})
    return Store(p)


def _half_created(p: Path) -> bool:
    """The folder holds only what :func:`create_store` writes before ``run.json`` (and temporary files)."""
    names = [c.name for c in p.iterdir()]
    return bool(names) and all(n in ("items.parquet", "maps.zarr") or n.startswith(".") for n in names)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in ("options", "n", "inputs_digest", "shard_size"):
        a, b = old.get(key), new.get(key)
        if key == "options" and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{k}: {a.get(k)!r} then, {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            what = {"n": "images", "inputs_digest": "inputs", "shard_size": "shard size"}[key]
            out.append(
                f"{what}: {a!r} then, {b!r} now" if key != "inputs_digest" else "the list of inputs changed"
            )
    return out


def open_store(path: str | Path) -> Store:
    """Open a ``camkit run`` store for reading: ``.config``, ``.table()``, ``.maps(method)``, ``.summary()``.

    Raises:
        ValueError: the folder is not a store.
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
            means[m][col.split(".", 1)[1]] = float(vals.mean()) if len(vals) else None
    out: dict[str, Any] = {
        "images": int(config.get("n", n)),
        "rows": n,
        "ok": sum(s == "ok" for s in status),
        "errors": sum(s == "error" for s in status),
        "methods": list(methods),
        "metrics": means,
    }
    box_metrics = [
        m for m in config.get("options", {}).get("metrics", ()) if m in METRICS and METRICS[m].needs_boxes
    ]
    if box_metrics and n:  # images the box metrics leave out: ok rows without ground-truth boxes
        boxes = table.column("gt_boxes").to_pylist()
        out["without_boxes"] = sum(1 for s, b in zip(status, boxes, strict=True) if s == "ok" and not b)
    if mba:
        out["maxboxacc"] = mba
    return out
