"""``camkit run --engine ray``: Ray Data actors on a local Ray with 2 CPUs give the same store as a local run,
also when a worker process is killed mid-run (Ray restarts the actor and retries its shard)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from test_run import MODEL, assert_same_store, make_images

from camkit.run import RunOptions, open_store, run
from camkit.run.raydata import ShardActor

OPTIONS = RunOptions(methods=("gradcam", "gradcam++"), image_size=64, shard_size=8, batch_size=4)


class DyingOnce(ShardActor):
    """Kills its own worker process (as SIGKILL would) on its first shard, once per test (a marker file)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        marker = Path(self.store.path).parent / "died"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    tests = str(Path(__file__).resolve().parent)  # this module and test_run, for the actors
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([src, tests]), "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


def test_ray_with_a_killed_worker_equals_local(tmp_path: Path, local_ray: None) -> None:
    from camkit.run import raydata

    data = make_images(tmp_path / "d", 40, bad=(9,))
    run([data], tmp_path / "local", model=MODEL, options=OPTIONS, workers=0)
    # a worker dies mid-run: Ray restarts the actor and retries the shard
    (tmp_path / "k").mkdir()
    original = raydata.ShardActor
    raydata.ShardActor = DyingOnce  # type: ignore[misc]
    try:
        res = run([data], tmp_path / "k" / "ray", model=MODEL, options=OPTIONS, engine="ray", ray_workers=2)
    finally:
        raydata.ShardActor = original  # type: ignore[misc]
    assert (tmp_path / "k" / "died").exists()  # the worker really died
    assert res.computed == 40 and res.summary["this_run"]["engine"] == "ray"
    assert open_store(tmp_path / "k" / "ray").table().column("index").to_pylist() == list(range(40))
    assert_same_store(tmp_path / "local", tmp_path / "k" / "ray")
