"""``camkit run --engine ray``: the shards of a run as a Ray Data pipeline (the ``camkit[ray]`` extra).

    ray.data.from_items([{"shard": s} for s in pending])
       .map_batches(ShardActor, batch_size=1, concurrency=N, num_gpus=G)   # one model per actor, loaded once

Each actor builds the model once (:class:`camkit.adapters.ModelSpec`), then computes whole shards with the same code
as a local run (:func:`camkit.run.runner.process_shards`) and writes them into the store with their
done-markers; the driver waits for every shard and merges the table. The unit of work is a shard, so a batch
never straddles shards and the results equal a local run's. An actor that dies (a killed worker, a lost node) is
restarted by Ray and its shard retried (``max_restarts`` / ``max_task_retries``); a shard is only ever written
whole under its own name, so a retry neither loses nor duplicates a row.

The driver connects to the cluster in ``RAY_ADDRESS`` when set, else starts a local Ray (or uses the one already
initialised in the process). The store must be on a file system every node sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from camkit.adapters.spec import ModelSpec
from camkit.errors import CamkitError
from camkit.run.runner import Explainer, RunOptions
from camkit.run.runner import process_shards as process_local
from camkit.run.sources import Item
from camkit.run.store import open_store

__all__ = ["ShardActor", "process_shards"]


class ShardActor:
    """A Ray Data actor: loads the model once, then computes and writes the shards it is given.

    Called with a batch ``{"shard": array of shard numbers}``; returns ``{"shard": ..., "images": ...}``.
    """

    def __init__(
        self,
        store: str,
        spec: ModelSpec,
        options: RunOptions,
        items: list[Item],
        workers: int = 0,
    ) -> None:
        import torch

        if spec.device.startswith("cuda") and torch.cuda.is_available():
            spec = replace(spec, device="cuda")  # Ray sets CUDA_VISIBLE_DEVICES per actor
        loaded = spec.load()
        self.store = open_store(store)
        self.explainer = Explainer(loaded.model, loaded.preprocess, loaded.labels, options, items)
        self.explainer.map_shapes()
        self.workers = workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = [int(s) for s in batch["shard"]]
        images = [process_local(self.store, self.explainer, [s], workers=self.workers) for s in shards]
        return {"shard": np.asarray(shards, dtype=np.int64), "images": np.asarray(images, dtype=np.int64)}


def process_shards(
    store: Any,
    spec: ModelSpec,
    options: RunOptions,
    items: Sequence[Item],
    shards: Sequence[int],
    *,
    ray_workers: int = 2,
    num_gpus: float = 0.0,
    workers: int = 0,
    actor: type[ShardActor] | None = None,
    max_retries: int = 3,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Compute ``shards`` on Ray actors; returns the number of images computed.

    Args:
        store: the open :class:`camkit.run.Store`.
        spec, options, items: the run's model, options and inputs.
        shards: the shard numbers to compute.
        ray_workers: actors (each holds one model). num_gpus: GPUs per actor (fractions share a GPU).
        workers: DataLoader worker processes inside each actor.
        actor: the actor class (default :class:`ShardActor`; a subclass, e.g. to inject faults in tests).
        max_retries: restarts of a dead actor and retries of its shard.
        progress: ``progress(n)`` after each shard of n images.

    Raises:
        ImportError: Ray is not installed (``pip install 'camkit[ray]'``).
        RuntimeError: a shard is still missing after the retries.
    """
    try:
        import ray
    except ImportError as err:  # pragma: no cover - the test extra installs Ray
        raise ImportError("--engine ray needs Ray: pip install 'camkit[ray]'") from err
    if not shards:
        return 0
    if ray_workers < 1:
        raise CamkitError(f"--ray-workers must be at least 1, got {ray_workers}")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    actor = actor or ShardActor
    ds = ray.data.from_items([{"shard": int(s)} for s in shards], override_num_blocks=len(shards))
    out = ds.map_batches(
        actor,
        fn_constructor_kwargs={
            "store": str(store.path),
            "spec": spec,
            "options": options,
            "items": list(items),
            "workers": workers,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(ray_workers, len(shards))),
        num_cpus=1,
        num_gpus=num_gpus,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )
    total = 0
    for batch in out.iter_batches(batch_size=1, batch_format="numpy"):
        n = int(np.sum(batch["images"]))
        total += n
        if progress is not None:
            progress(n)
    missing = sorted(set(shards) - store.done_shards())
    if missing:
        raise RuntimeError(
            f"Ray finished but {len(missing)} shard(s) are not in the store (first: {missing[0]})"
        )
    return total
