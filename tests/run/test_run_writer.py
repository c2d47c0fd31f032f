"""``camkit run``'s writes off the model's path (:class:`camkit.run.runner.ShardWriter`): jobs in order, errors
raised in the caller, a failed shard left without its done-marker; a finished store returns at once, before any
model is loaded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from test_run import MODEL, make_images

from camkit.run import RunOptions, open_store, run
from camkit.run import runner as run_module
from camkit.run.runner import ShardWriter

OPTS = RunOptions(image_size=64, shard_size=4, batch_size=2, thumbnails=16)


def test_writer_runs_jobs_in_order_on_another_thread() -> None:
    seen: list[tuple[int, str]] = []
    writer = ShardWriter(depth=1)
    for k in range(5):
        writer.put(lambda k=k: seen.append((k, threading.current_thread().name)))
    writer.close()
    assert [k for k, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {"camkit-run-writer"}


def test_writer_raises_the_first_error_and_drops_later_jobs() -> None:
    seen: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    writer = ShardWriter(depth=1)
    writer.put(fail)
    writer.put(lambda: seen.append(1))
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert seen == []


def test_a_failed_shard_write_stops_the_run_and_leaves_no_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_images(tmp_path / "d", 8)
    real = run_module.Store.write_shard

    def second_fails(self: run_module.Store, shard: int, *args: object) -> None:
        if shard == 1:
            raise OSError("no space left on device")
        real(self, shard, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(run_module.Store, "write_shard", second_fails)
    out = tmp_path / "s"
    with pytest.raises(OSError, match="no space left"):
        run([data], out, model=MODEL, options=OPTS, workers=0)
    store = open_store(out)
    assert store.done_shards() == {0} and (out / "thumbs").is_dir()
    monkeypatch.setattr(run_module.Store, "write_shard", real)
    res = run([data], out, model=MODEL, options=OPTS, workers=0)  # the resume computes shard 1 only
    assert res.computed == 4 and open_store(out).complete


def test_finished_store_returns_in_under_a_second_without_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_images(tmp_path / "d", 6)
    out = tmp_path / "s"
    run([data], out, model=MODEL, options=OPTS, workers=0)

    def load(self: object) -> None:
        raise AssertionError("the model was loaded for a finished store")

    monkeypatch.setattr(run_module.ModelSpec, "load", load)
    t0 = time.perf_counter()
    res = run([data], out, model=MODEL, options=OPTS, workers=0)
    seconds = time.perf_counter() - t0
    assert res.computed == 0 and res.summary["ok"] == 6
    assert seconds < 1.0, f"a finished store took {seconds:.2f} s"
