"""``camkit run`` throughput: against a plain inference pass, 5 methods vs 1, 1 vs 2 processes, store size, resume.

    PYTHONPATH=src python benchmarks/bench_run.py [--images 64] [--model efficientnet_lite0] [--repeats 2]

* run vs inference: the same DataLoader (camkit's ImageDataset, same batches, same workers) feeds (a) a plain
  eager ``torch.inference_mode()`` forward + softmax top-5 of the model as given, and (b) ``process_shards``
  with ``--methods gradcam`` (explain, maps to zarr, rows to Parquet, done-markers; the writes on camkit's
  writer thread). Interleaved (the order alternates round by round), ``--repeats`` rounds; images/s of the best
  round, the median and the spread (slowest / fastest round) of each, the ratio best to best and per round, and
  ``os.getloadavg()`` before and after (the machine may be shared). On a CUDA machine the model runs on the GPU
  (the same code path; ``--device cpu`` to stay on the CPU).
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
import statistics
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
    device = next(model.parameters()).device
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
            x = torch.stack([s.x for s in samples if s.x is not None]).to(device)
            torch.softmax(model(x), dim=1).topk(5, dim=1).indices.cpu()
    return time.perf_counter() - t0


def camkit_pass(
    loaded: object, items: list, opts: RunOptions, workers: int, out: Path, spec: ModelSpec
) -> float:
    if out.exists():
        shutil.rmtree(out)
    ex = Explainer(loaded.model, loaded.preprocess, loaded.labels, opts, items)  # type: ignore[attr-defined]
    out.mkdir(parents=True)
    store = create_store(out, run_config(spec, opts, items, ex.methods), items, ex.map_shapes())
    t0 = time.perf_counter()
    process_shards(store, ex, range(store.n_shards), workers=workers)
    return time.perf_counter() - t0


def command(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0, proc.stdout


def _row(name: str, n: int, v: list[float], base: float) -> str:
    return (
        f"| {name} | {n / min(v):.1f} | {n / statistics.median(v):.1f} | {max(v) / min(v):.2f} | "
        f"{base / min(v):.2f} |"
    )


def throughput(a: argparse.Namespace, loaded: object, items: list, spec: ModelSpec, tmp: Path) -> None:
    """Plain inference vs ``camkit run`` (1 and 5 methods), interleaved rounds; the table and the ratios."""
    one = RunOptions(methods=("gradcam",), batch_size=a.batch_size, shard_size=4 * a.batch_size)
    five = RunOptions(methods=FIVE, batch_size=a.batch_size, shard_size=4 * a.batch_size)
    ex = Explainer(loaded.model, loaded.preprocess, loaded.labels, one, items)  # type: ignore[attr-defined]
    passes = {
        "plain": lambda: plain(loaded, items, one, a.workers, ex.preprocess),
        "gradcam": lambda: camkit_pass(loaded, items, one, a.workers, tmp / "s1", spec),
        "five": lambda: camkit_pass(loaded, items, five, a.workers, tmp / "s5", spec),
    }
    t: dict[str, list[float]] = {k: [] for k in passes}
    plain(loaded, items[: a.batch_size], one, 0, ex.preprocess)  # warm-up
    camkit_pass(loaded, items[: a.batch_size], one, 0, tmp / "w", spec)
    load0 = os.getloadavg()
    for r in range(a.repeats):
        order = list(passes) if r % 2 == 0 else list(reversed(passes))
        for k in order:
            t[k].append(passes[k]())
    load1 = os.getloadavg()
    n = len(items)
    print(
        f"model {a.model} on {spec.device}, {n} images 320x240 JPEG, batch {a.batch_size}, DataLoader workers "
        f"{a.workers}, {torch.get_num_threads()} thread(s); load average (1, 5, 15 min) before "
        f"{tuple(round(x, 1) for x in load0)}, after {tuple(round(x, 1) for x in load1)}"
    )
    print(f"| pass | images/s, best of {a.repeats} | median | spread (slowest/fastest) | / plain (best) |")
    print("| --- | --- | --- | --- | --- |")
    base = min(t["plain"])
    print(_row("plain inference (eager forward + top-5)", n, t["plain"], base))
    print(_row("camkit run --methods gradcam", n, t["gradcam"], base))
    print(_row("camkit run, 5 gradient methods", n, t["five"], base))
    per_round = [p / g for p, g in zip(t["plain"], t["gradcam"], strict=True)]
    print(
        f"run / plain images/s: {base / min(t['gradcam']):.2f} best to best; per round "
        f"{', '.join(f'{x:.2f}' for x in per_round)}; five methods / one: "
        f"{min(t['five']) / min(t['gradcam']):.2f}x the time"
    )
    print("all rounds (s):", {k: [round(x, 2) for x in v] for k, v in t.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-processes", action="store_true")
    ap.add_argument("--only-throughput", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_run_"))
    data = make_data(tmp / "data", a.images)
    items = collect_items([data])
    spec = ModelSpec(a.model, pretrained=a.model == "efficientnet_lite0", threads=1, device=a.device)
    loaded = spec.load()
    throughput(a, loaded, items, spec, tmp)
    n = len(items)
    if a.only_throughput:
        shutil.rmtree(tmp)
        return
    # store size per image
    for res in ("feature", "input"):
        opts = RunOptions(
            methods=("gradcam",), resolution=res, batch_size=a.batch_size, shard_size=4 * a.batch_size
        )
        r = run([data], tmp / f"size_{res}", model=spec, options=opts, workers=a.workers)
        print(
            f"store bytes/image, {res} resolution {r.store.map_shape('gradcam')}: {r.store.store_bytes() / n:.0f}"
        )
    # resume of a finished store: the same call again
    opts = RunOptions(
        methods=("gradcam",), resolution="input", batch_size=a.batch_size, shard_size=4 * a.batch_size
    )
    t0 = time.perf_counter()
    r = run([data], tmp / "size_input", model=spec, options=opts, workers=a.workers)
    print(
        f"rerun of a finished store (in-process; nothing loaded): {time.perf_counter() - t0:.2f} s, computed {r.computed}"
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
