"""The whole ``camkit run``: inputs, the store, the processes and the engine, the summary (:func:`run`).

* :func:`run` looks at the store before anything is loaded (a finished one with the same settings: nothing is
  loaded or written), creates or resumes it under its lock, splits the pending shards over torchrun ranks
  (:mod:`camkit.run.distributed`) or Ray actors (:mod:`camkit.run.raydata`), computes them
  (:func:`camkit.run.runner.process_shards`), merges the table and writes the summary.
* :func:`run_config` is what ``run.json`` records of a run, known before the model is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from camkit.adapters.spec import ModelSpec
from camkit.errors import CamkitError
from camkit.evaluate import METRICS
from camkit.methods import get_method
from camkit.metrics.registry import parse_metric
from camkit.run import distributed, raydata
from camkit.run.extra import require_run_extra
from camkit.run.runner import Explainer, RunOptions, process_shards
from camkit.run.sources import Item, collect_items
from camkit.run.store import (
    Store,
    create_store,
    open_store,
    settings_differences,
    store_lock,
    summarize,
    survey,
)

__all__ = ["BOX_METRICS", "RunResult", "check_boxes", "inputs_digest", "path_roots", "run", "run_config"]

ENGINES = ("local", "ray")


@dataclass
class RunResult:
    """What :func:`run` did: the store, how many images this call computed, its seconds, the summary."""

    store: Store
    computed: int
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def inputs_digest(items: Sequence[Item]) -> str:
    """A digest of the inputs (paths, classes, boxes, in order)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.path, it.cls, it.boxes]).encode("utf-8"))
    return h.hexdigest()[:16]


def run_config(
    spec: ModelSpec, options: RunOptions, items: Sequence[Item], methods: Sequence[str]
) -> dict[str, Any]:
    """The store's ``run.json`` settings, known before the model is loaded (the resolved ``layers`` and the map
    shape are added once it is)."""
    return {
        "options": {
            **spec.identity(),
            **asdict(options),
            "methods": list(methods),
            "metrics": list(options.metrics),
        },
        "weights_path": spec.weights,
        "methods": list(methods),
        "n": len(items),
        "shard_size": options.shard_size,
        "inputs_digest": inputs_digest(items),
        "path_roots": path_roots(items),
    }


def path_roots(items: Sequence[Item]) -> list[list[Any]]:
    """Where the items' relative paths resolve: ``[[first index, absolute folder], ...]``, one entry where the
    folder changes (a manifest's rows: its folder; other inputs: the current folder). Kept in ``run.json`` and
    read back by :meth:`camkit.run.Store.path_root`."""
    out: list[list[Any]] = []
    for i, it in enumerate(items):
        if not out or out[-1][1] != it.root:
            out.append([i, it.root])
    return out


#: The metrics that compare a map with ground-truth boxes.
BOX_METRICS = tuple(name for name, metric in METRICS.items() if metric.needs_boxes)


def check_boxes(items: Sequence[Item], metrics: Sequence[str]) -> str | None:
    """Box metrics asked for on images without boxes: a ValueError when none has a box (before any work), else
    a note saying how many images the box metrics leave out (None when all have boxes or none is asked for)."""
    asked = [m for m in metrics if parse_metric(m)[0] in BOX_METRICS]
    if not asked:
        return None
    without = sum(1 for it in items if not it.boxes)
    if without == len(items):
        raise CamkitError(
            f"--metrics {','.join(asked)} needs ground-truth boxes, and none of the {len(items)} image(s) has one: "
            "give boxes (a manifest's 'boxes' column, a tar shard's .json member, or --annotations FILE), or "
            "leave the box metrics out"
        )
    if without:
        return (
            f"box metrics ({', '.join(asked)}) over {len(items) - without} image(s): {without} without "
            "ground-truth boxes are left out (NaN)"
        )
    return None


def _agreed(dist: Any, work: Callable[[], Any] | None) -> Any:
    """Rank 0 does ``work``; every rank gets its value, or raises the ValueError it raised (so that no rank
    waits for one that gave up)."""
    if dist.world == 1:
        return work() if work is not None else None
    outcome: tuple[str, Any] = ("ok", None)
    error: Exception | None = None
    if dist.rank == 0 and work is not None:
        try:
            outcome = ("ok", work())
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            error = err
            outcome = ("error", str(err))
    outcome = dist.broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise CamkitError(outcome[1])
    return outcome[1]


@dataclass(frozen=True)
class _Engine:
    """Where the shards are computed: ``local`` (this process, or one per rank under torchrun) with ``workers``
    DataLoader processes, or ``ray`` with ``ray_workers`` actors of ``num_gpus`` GPUs each."""

    name: str
    workers: int
    ray_workers: int
    num_gpus: float

    def check(self) -> None:
        if self.name not in ENGINES:
            raise CamkitError(f"unknown engine {self.name!r}: 'local' (also under torchrun) or 'ray'")
        if self.workers < 0:
            raise CamkitError(f"--workers must be 0 or more, got {self.workers}")

    def compute(
        self,
        store: Store,
        explainer: Explainer,
        spec: ModelSpec,
        shards: Sequence[int],
        progress: Callable[[int], None] | None,
    ) -> int:
        """Compute and write ``shards``; the number of images computed."""
        if self.name == "ray":
            return raydata.process_shards(
                store,
                spec,
                explainer.options,
                explainer.items,
                shards,
                ray_workers=self.ray_workers,
                num_gpus=self.num_gpus,
                progress=progress,
            )
        return process_shards(store, explainer, shards, workers=self.workers, progress=progress)


def _this_run(computed: int, seconds: float, world: int, engine: str) -> dict[str, Any]:
    """The summary's ``this_run``: what this call did."""
    return {
        "computed": computed,
        "seconds": round(seconds, 3),
        "images_per_s": round(computed / seconds, 2) if seconds > 0 else None,
        "processes": world,
        "engine": engine,
    }


def _nothing_to_do(out: str | Path, t0: float, engine: str, world: int) -> RunResult:
    """The result of a run on a finished store: its summary, this run's counts (nothing written)."""
    store = open_store(out)
    seconds = time.perf_counter() - t0
    summary = {k: v for k, v in store.summary().items() if k != "table"}
    summary["this_run"] = {**_this_run(0, seconds, world, engine), "images_per_s": None}
    return RunResult(store=store, computed=0, seconds=seconds, summary=summary)


def _prepare(
    held: ExitStack,
    out: str | Path,
    config: dict[str, Any],
    items: Sequence[Item],
    shapes: dict[str, tuple[int, int]],
    overwrite: bool,
    warn: Callable[[str], None] | None,
) -> list[int]:
    """Rank 0: take the store's lock (held by ``held`` until the table is merged), create or resume the store;
    the shards still to compute."""
    held.enter_context(store_lock(out))
    made = create_store(out, config, items, shapes, overwrite=overwrite, warn=warn)
    return sorted(set(range(made.n_shards)) - made.done_shards())


def _same_settings(dist: distributed.Session, store: Store, config: dict[str, Any]) -> None:
    """Every rank must run with rank 0's settings (weights, inputs)."""
    diff = settings_differences(store.config, config)
    if dist.total(1 if diff else 0):
        raise CamkitError(
            f"the processes of this run have other settings than its first one ({'; '.join(diff)})"
            if diff
            else "another process of this run has other settings (model weights or inputs)"
        )


def _finish(
    dist: distributed.Session, store: Store, computed: int, seconds: float, engine: str
) -> dict[str, Any]:
    """Rank 0 merges the table and writes the summary (returned; empty on other ranks); then every rank waits."""
    summary: dict[str, Any] = {}
    if dist.rank == 0:
        summary = summarize(store.merge(), store.methods, store.config)
        summary["this_run"] = _this_run(computed, seconds, dist.world, engine)
        store.write_summary(summary)
    dist.barrier()
    return summary


def _box_note(items: Sequence[Item], metrics: Sequence[str], note: Callable[[str], None] | None) -> None:
    """Tell (``note``, else a Python warning) how many images the box metrics leave out."""
    said = check_boxes(items, metrics)
    if said is not None:
        if note is not None:
            note(said)
        else:
            warnings.warn(said, stacklevel=3)


def run(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    model: ModelSpec | None = None,
    options: RunOptions | None = None,
    layout: str = "auto",
    annotations: str | Path | None = None,
    overwrite: bool = False,
    workers: int = 2,
    engine: str = "local",
    ray_workers: int = 2,
    num_gpus: float = 0.0,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    note: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Explain every image of ``inputs`` into the store ``out`` (created, or resumed where it stopped).

    The store is looked at before anything is loaded: a folder that is neither new, empty nor a camkit store is
    refused, as is a store made with other settings; a finished store with the same settings is left as it is
    (no model is loaded, nothing is written, so it may be on a read-only file system). A run that creates,
    resumes or overwrites a store holds the store's lock until it is done (another run on it is refused at
    once); a resume verifies every done shard and computes again those that do not verify.

    Args:
        inputs: folders, files, a manifest or tar shards (:func:`camkit.run.sources.collect_items`).
        out: the store folder.
        model: how to build the model (default: the offline pretrained EfficientNet-Lite0).
        options: what to compute (:class:`RunOptions`).
        layout: how to read ``inputs`` (``auto``, ``folder``, ``imagefolder``, ``manifest``, ``tar``).
        annotations: an annotation file (camkit JSON, COCO JSON, Pascal VOC XML, as ``camkit evaluate
            --annotations``): class and boxes of the images it names (by file name) whose input gives none.
        overwrite: start the store again, deleting camkit's own files of it (a folder that holds other files is
            refused), instead of refusing other settings.
        workers: DataLoader worker processes per process (0: decode in the main process).
        engine: ``"local"`` (one process, or one per rank under torchrun: see :mod:`camkit.run.distributed`) or
            ``"ray"`` (Ray Data actors, :mod:`camkit.run.raydata`).
        ray_workers: Ray actors. num_gpus: GPUs per Ray actor.
        progress: ``progress(to_do, total) -> advance(n)``: called once with the images this process will
            compute and the total; ``advance`` after each batch.
        note: called with a remark before any work (box metrics that leave out images without boxes); default:
            a Python warning.
        warn: called with a line for each done shard that does not verify (default: :func:`warnings.warn`).

    Raises:
        ValueError: zarr or pyarrow missing (the ``camkit[run]`` extra), bad options or inputs, box metrics asked for on images none of which has boxes, an ``out``
            that cannot hold the store, a store made with other settings (and not ``overwrite``), or one in use
            by another run.
    """
    require_run_extra("camkit run")
    spec = model or ModelSpec()
    opts = options or RunOptions()
    opts.check()
    how = _Engine(engine, workers, ray_workers, num_gpus)
    how.check()
    items = collect_items(inputs, layout, annotations)
    _box_note(items, opts.metrics, note)
    config = run_config(spec, opts, items, [get_method(m).name for m in opts.methods])
    t0 = time.perf_counter()
    with distributed.session(spec.device) as dist:
        if dist.world > 1 and engine == "ray":
            raise CamkitError("--engine ray is not run under torchrun: start it as one process")
        # the store first: refused, or finished with these settings (nothing loaded, nothing written)
        if _agreed(dist, lambda: survey(out, config, overwrite)):
            return _nothing_to_do(out, t0, engine, dist.world)
        spec = replace(spec, device=dist.device)
        loaded = spec.load()
        explainer = Explainer(loaded.model, loaded.preprocess, loaded.labels, opts, items)
        shapes = explainer.map_shapes()
        config = {**config, "layers": explainer.layer_names()}
        if _agreed(dist, lambda: survey(out, config, overwrite)):  # --layers given another way, same layers
            return _nothing_to_do(out, t0, engine, dist.world)
        with ExitStack() as held:
            prepare = functools.partial(_prepare, held, out, config, items, shapes, overwrite, warn)
            pending: list[int] = _agreed(dist, prepare if dist.rank == 0 else None)
            store = open_store(out)
            _same_settings(dist, store, config)
            mine = pending[dist.rank :: dist.world]
            to_do = sum(len(store.shard_range(s)) for s in mine)
            advance = progress(to_do, store.n) if progress is not None else None
            computed = dist.total(how.compute(store, explainer, spec, mine, advance))
            seconds = time.perf_counter() - t0
            summary = _finish(dist, store, computed, seconds, engine)
    return RunResult(store=store, computed=computed, seconds=seconds, summary=summary)
