"""Explain a whole dataset into a resumable store: ``camkit run`` (and :func:`run` in Python).

    from camkit.run import run, open_store, ModelSpec, RunOptions
    run(["photos/"], "store/", model=ModelSpec("resnet50"), options=RunOptions(methods=("gradcam", "layercam")))
    store = open_store("store/")
    store.config            # run.json: options, n, shard_size, map_shapes, methods, path_roots
    store.table()           # pyarrow.Table, one row per image (path, size, top-k, class, box, status, metrics)
    store.maps("gradcam")   # zarr.Array float16 [N, H, W] in [0, 1]; store.maps("gradcam")[i] -> numpy
    store.summary()         # counts and metric means per method (summary.json)
    store.thumbnail("gradcam", i)   # the overlay JPEG's path, when written

Reader API for other tools: :func:`open_store` and :class:`Store` (``config``, ``table()``, ``maps(method)``,
``summary()``, ``thumbnail()``, ``complete``); the folder layout is in :mod:`camkit.run.store`. Inputs:
:mod:`camkit.run.sources`; the whole run: :mod:`camkit.run.driver`; a batch and a shard: :mod:`camkit.run.runner`;
several processes: :mod:`camkit.run.distributed` (torchrun / srun); Ray Data: :mod:`camkit.run.raydata`. The store
needs zarr and pyarrow, the ``camkit[run]`` extra (:mod:`camkit.run.extra`); the model is a
:class:`camkit.adapters.ModelSpec`.
"""

from camkit.adapters.spec import ModelSpec
from camkit.run.driver import RunResult, run
from camkit.run.runner import Explainer, RunOptions
from camkit.run.sources import Item, collect_items
from camkit.run.store import Store, open_store

__all__ = [
    "Explainer",
    "Item",
    "ModelSpec",
    "RunOptions",
    "RunResult",
    "Store",
    "collect_items",
    "open_store",
    "run",
]
