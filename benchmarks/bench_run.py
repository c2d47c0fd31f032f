"""``camkit run`` throughput: against a plain inference pass, 5 methods vs 1, 1 vs 2 processes, store size, resume.

    PYTHONPATH=src python benchmarks/bench_run.py [--images 64] [--model efficientnet_lite0] [--repeats 2]

* run vs inference: the same DataLoader (camkit's ImageDataset, same batches, same workers) feeds (a) a plain
  ``torch.inference_mode()`` forward + softmax top-5, and (b) ``process_shards`` with ``--methods gradcam``
  (explain, maps to zarr, rows to Parquet, done-markers). Interleaved, ``--repeats`` times; the best of each.
* five gradient methods (gradcam, gradcam++, xgradcam, hirescam, layercam) against gradcam alone, same way.
* 1 vs 2 processes: the whole command (``python -m camkit run`` vs ``torchrun --nproc-per-node 2``), 2 threads
  in one process vs 1 thread in each of two; wall time including start-up, and the run's own images/s.
* store bytes per image at feature and input resolution; the time a finished store takes to "resume" (the same
  command again: inputs listed, model loaded, options checked, nothing computed).

One torch thread per process unless said (``torch.set_num_threads(1)``); images are generated (random JPEGs,
320x240), so no data set is needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camkit.run import ModelSpec, RunOptions, collect_items, run
from camkit.run.driver import run_config
from camkit.run.runner import Explainer, process_shards, shard_batches
from camkit.run.sources import ImageDataset, collate
from camkit.run.store import create_store

FIVE = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")


def make_data(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(
            root / f"{i:05d}.jpg", quality=90
        )
    return root


def plain(loaded: object, items: list, opts: RunOptions, workers: int, preprocess: object) -> float:
    """Seconds of a plain inference pass over the same batches and DataLoader."""
    model = loaded.model  # type: ignore[attr-defined]
    n_shards = -(-len(items) // opts.shard_size)

    class _S:
        shard_size = opts.shard_size

        @staticmethod
        def shard_range(s: int) -> range:
            return range(s * opts.shard_size, min(len(items), (s + 1) * opts.shard_size))

    batches = shard_batches(_S, range(n_shards), opts.batch_size)  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(
        ImageDataset(items, preprocess, opts.max_pixels),  # type: ignore[arg-type]
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    t0 = time.perf_counter()
    with torch.inference_mode():
        for samples in loader:
            x = torch.stack([s.x for s in samples if s.x is not None])
            torch.softmax(model(x), dim=1).topk(5, dim=1)
    return time.perf_counter() - t0


def camkit_pass(
    loaded: object, items: list, opts: RunOptions, workers: int, out: Path, spec: ModelSpec
) -> float:
    if out.exists():
        shutil.rmtree(out)
    ex = Explainer(loaded.model, loaded.preprocess, loaded.labels, opts, items)  # type: ignore[attr-defined]
    store = create_store(out, run_config(spec, opts, items, ex.methods), items, ex.map_shape())
    t0 = time.perf_counter()
    process_shards(store, ex, range(store.n_shards), workers=workers)
    return time.perf_counter() - t0


def command(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-processes", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_run_"))
    data = make_data(tmp / "data", a.images)
    items = collect_items([data])
    spec = ModelSpec(a.model, pretrained=a.model == "efficientnet_lite0", threads=1)
    loaded = spec.load()
    one = RunOptions(methods=("gradcam",), batch_size=a.batch_size, shard_size=4 * a.batch_size)
    five = RunOptions(methods=FIVE, batch_size=a.batch_size, shard_size=4 * a.batch_size)
    ex = Explainer(loaded.model, loaded.preprocess, loaded.labels, one, items)
    t: dict[str, list[float]] = {"plain": [], "gradcam": [], "five": []}
    plain(loaded, items[: a.batch_size], one, 0, ex.preprocess)  # warm-up
    for _ in range(a.repeats):
        t["plain"].append(plain(loaded, items, one, a.workers, ex.preprocess))
        t["gradcam"].append(camkit_pass(loaded, items, one, a.workers, tmp / "s1", spec))
        t["five"].append(camkit_pass(loaded, items, five, a.workers, tmp / "s5", spec))
    n = len(items)
    best = {k: min(v) for k, v in t.items()}
    print(
        f"model {a.model}, {n} images 320x240 JPEG, batch {a.batch_size}, DataLoader workers {a.workers}, 1 thread"
    )
    print(f"| pass | images/s (best of {a.repeats}) | ratio |")
    print("| --- | --- | --- |")
    print(f"| plain inference (forward + top-5) | {n / best['plain']:.1f} | 1.00 |")
    print(
        f"| camkit run --methods gradcam | {n / best['gradcam']:.1f} | {best['plain'] / best['gradcam']:.2f} |"
    )
    print(f"| camkit run, 5 gradient methods | {n / best['five']:.1f} | {best['plain'] / best['five']:.2f} |")
    print(f"five methods / one: {best['five'] / best['gradcam']:.2f}x the time")
    print("all runs (s):", {k: [round(x, 2) for x in v] for k, v in t.items()})
    # store size per image
    for res in ("feature", "input"):
        opts = RunOptions(
            methods=("gradcam",), resolution=res, batch_size=a.batch_size, shard_size=4 * a.batch_size
        )
        r = run([data], tmp / f"size_{res}", model=spec, options=opts, workers=a.workers)
        print(
            f"store bytes/image, {res} resolution {r.store.config['map_shape']}: {r.store.store_bytes() / n:.0f}"
        )
    # resume of a finished store: the same call again
    opts = RunOptions(
        methods=("gradcam",), resolution="input", batch_size=a.batch_size, shard_size=4 * a.batch_size
    )
    t0 = time.perf_counter()
    r = run([data], tmp / "size_input", model=spec, options=opts, workers=a.workers)
    print(
        f"resume of a finished store (in-process, model load included): {time.perf_counter() - t0:.2f} s, computed {r.computed}"
    )
    if not a.skip_processes:
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
        base = [
            "run",
            str(data),
            "--model",
            a.model,
            "--batch-size",
            str(a.batch_size),
            "--workers",
            "0",
            "--shard-size",
            str(4 * a.batch_size),
        ]
        w1, out1 = command(
            [sys.executable, "-m", "camkit", *base, "--out", str(tmp / "p1"), "--threads", "2"], env
        )
        w2, out2 = command(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "camkit",
                *base,
                "--out",
                str(tmp / "p2"),
                "--threads",
                "1",
            ],
            env,
        )
        print(f"1 process x 2 threads: {w1:.1f} s wall ({out1.splitlines()[0]})")
        print(f"2 processes x 1 thread (torchrun): {w2:.1f} s wall ({out2.splitlines()[0]})")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
