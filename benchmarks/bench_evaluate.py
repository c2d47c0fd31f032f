"""Faithfulness of the gradient methods vs reference maps on real photos, and the cost of `camkit evaluate`.

    .venv/bin/python benchmarks/bench_evaluate.py quality   # table: deletion/insertion/avg drop/increase
    .venv/bin/python benchmarks/bench_evaluate.py timing    # 5 methods x deletion+insertion, 50 steps, 32 images
    .venv/bin/python benchmarks/bench_evaluate.py timing 4  # the same on 4 images
    .venv/bin/python benchmarks/bench_evaluate.py timing --no-tune  # without camkit.core.runtime.tune_allocator()
    .venv/bin/python benchmarks/bench_evaluate.py timing --compile  # evaluate(..., compile=True), prepared first
    .venv/bin/python benchmarks/bench_evaluate.py compare 8 --repeats 3   # the scoring before/after, interleaved

``compare``: the same ``evaluate`` call (5 gradient methods x deletion + insertion, 50 steps) scored two ways,
interleaved in one process, ``--repeats`` rounds, best and spread of each: the method-by-method path
(:class:`camkit.metrics.MetricScorer` per method: each map's curves in their own chunks, the ends and the clean
image scored again per map) and the current one (every map's deletion and insertion in one stream of chunks,
ends shared, the clean forward reused); the largest difference of their numbers; the load average
(``os.getloadavg()``) before and after. On a CUDA machine the model runs there (the same code path).

The process calls ``camkit.core.runtime.tune_allocator()`` first, as the ``camkit`` command does (``--no-tune``: not).

Photos found offline: scikit-image's astronaut, chelsea, coffee, rocket, motorcycle (left view), matplotlib's
grace_hopper.jpg, and scikit-learn's china.jpg / flower.jpg when scikit-learn is installed. The 32 timing images
are these photos, flipped and cropped. Model: the offline EfficientNet-Lite0, top-1 class of each image.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

import camkit
import camkit.evaluate as evaluate_module
from camkit.core.runtime import tune_allocator
from camkit.evaluate import evaluate

METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]


def photos() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = [
        (n, Image.fromarray(getattr(data, n)()).convert("RGB")) for n in ("astronaut", "chelsea", "coffee")
    ]
    out.append(("rocket", Image.fromarray(data.rocket()).convert("RGB")))
    out.append(("motorcycle", Image.fromarray(data.stereo_motorcycle()[0]).convert("RGB")))
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.exists():
        out.append(("grace_hopper", Image.open(hopper).convert("RGB")))
    try:
        from sklearn.datasets import load_sample_images

        for name, arr in zip(("china", "flower"), load_sample_images().images, strict=True):
            out.append((name, Image.fromarray(arr).convert("RGB")))
    except ImportError:
        pass
    return out


def variants(base: list[tuple[str, Image.Image]], n: int) -> list[tuple[str, Image.Image]]:
    out = []
    k = 0
    while len(out) < n:
        name, im = base[k % len(base)]
        v = k // len(base)
        w, h = im.size
        if v == 1:
            im = ImageOps.mirror(im)
        elif v == 2:
            im = im.crop((w // 10, h // 10, w - w // 10, h - h // 10))
        elif v >= 3:
            im = ImageOps.mirror(im.crop((0, 0, w - w // 6, h - h // 6)))
        out.append((f"{name}_v{v}", im))
        k += 1
    return out


def quality() -> None:
    loaded = camkit.load_model()
    pics = photos()
    res = evaluate(
        loaded.model,
        pics,
        methods=[*METHODS, "center", "random", "noise"],
        metrics=["deletion", "insertion", "avg_drop", "increase"],
        preprocess=loaded.preprocess,
        labels=loaded.labels,
        steps=50,
    )
    print(f"{len(pics)} photos: {', '.join(n for n, _ in pics)}")
    for r in res.rows:
        if r["method"] == "gradcam":
            print(f"  {r['image']}: class {r['class']} {r['label']} p={r['prob']:.2f}")
    print(
        "\n| method | deletion ↓ | insertion ↑ | avg drop ↓ | increase ↑ |\n| --- | --- | --- | --- | --- |"
    )
    for m, v in res.summary.items():
        print(
            f"| {m} | {v['deletion']:.3f} | {v['insertion']:.3f} | {v['avg_drop']:.3f} | {v['increase']:.3f} |"
        )
    print(f"\n{res.timing['total']:.1f} s")


def timing(n_images: int = 32, compile: bool = False) -> None:
    loaded = camkit.load_model()
    pics = variants(photos(), n_images)
    if compile:  # the compiled copy prepared outside the timing (seconds, once per batch shape)
        _one(loaded, pics[:1], "cpu", compile=True, steps=1)
    t0 = time.perf_counter()
    res = evaluate(
        loaded.model,
        pics,
        methods=METHODS,
        metrics=["deletion", "insertion"],
        preprocess=loaded.preprocess,
        labels=loaded.labels,
        steps=50,
        compile=compile,
    )
    total = time.perf_counter() - t0
    t = res.timing
    other = total - t["explain"] - t["metric_forwards"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n_images} images x 5 methods, 50 steps, "
        f"allocator tuned: {TUNED}, compile={compile}"
    )
    print(f"total {total:.1f} s; {int(t['metric_images'])} images through the model for the metrics")
    print(
        f"  metric model forwards {t['metric_forwards']:.1f} s ({100 * t['metric_forwards'] / total:.0f}%), "
        f"{1000 * t['metric_forwards'] / t['metric_images']:.1f} ms per image"
    )
    print(
        f"  explain (compare, 1 pass for 5 methods) {t['explain']:.1f} s ({100 * t['explain'] / total:.0f}%)"
    )
    print(f"  the rest (loading, preprocessing, masks, blur, AUC) {other:.1f} s ({100 * other / total:.0f}%)")


def _old_score_methods(plan, x, maps, classes, logits, names, batch_anns, sizes, track):  # type: ignore[no-untyped-def]
    """The method-by-method scoring (every metric of a method through MetricScorer, as before the joint curves)."""
    del logits, names, track
    gt = [a.boxes if a is not None else [] for a in batch_anns]
    out, curves = {}, {}
    for method in plan.order:
        values, iou = plan.scorer(x, maps[method], classes, gt, sizes)
        out[method] = values
        if iou is not None:
            curves[method] = iou
    return out, curves


def _one(
    loaded, pics, device: str, compile: bool = False, steps: int = 50
) -> tuple[float, dict[tuple[str, str], dict[str, float]]]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    res = evaluate(
        loaded.model.to(device),
        pics,
        methods=METHODS,
        metrics=["deletion", "insertion"],
        preprocess=loaded.preprocess,
        labels=loaded.labels,
        steps=steps,
        compile=compile,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, {(r.image, r.method): r.values for r in res.rows}


def compare_paths(n_images: int, repeats: int) -> None:
    """Before/after of the scoring, interleaved (see the module docstring)."""
    loaded = camkit.load_model()
    pics = variants(photos(), n_images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    joint = evaluate_module._score_methods
    names = ["method by method", "joint", "joint, compile=True"]
    times: dict[str, list[float]] = {k: [] for k in names}
    values: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    load0 = os.getloadavg()
    _one(loaded, pics[:1], device, steps=1)  # warm-up: the prepared copies of the model, first calls
    _one(loaded, pics[:1], device, compile=True, steps=1)
    for r in range(repeats):
        order = names[r % 3 :] + names[: r % 3]  # each contender first in turn
        for name in order:
            evaluate_module._score_methods = _old_score_methods if name == "method by method" else joint  # type: ignore[assignment]
            try:
                seconds, values[name] = _one(loaded, pics, device, compile=name.endswith("True"))
            finally:
                evaluate_module._score_methods = joint
            times[name].append(seconds)
            print(f"  round {r + 1} {name}: {seconds:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    a = values["method by method"]
    diff = {n: max(abs(a[k][c] - values[n][k][c]) for k in a for c in a[k]) for n in names[1:]}
    best = {k: min(v) for k, v in times.items()}
    print(
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {n_images} images x 5 methods x "
        f"deletion + insertion, 50 steps; load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print("| scoring | best s | median s | spread (max/min) |\n| --- | --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {min(v):.1f} | {statistics.median(v):.1f} | {max(v) / min(v):.2f} |")
    for n in names[1:]:
        print(
            f"{n}: speed-up (best / best) {best['method by method'] / best[n]:.2f}x, "
            f"largest difference of the numbers {diff[n]:.2e}"
        )


TUNED = False

if __name__ == "__main__":
    torch.set_num_threads(2)
    if "--no-tune" not in sys.argv:
        TUNED = tune_allocator()
    argv = sys.argv[1:]
    repeats = 3
    if "--repeats" in argv:
        k = argv.index("--repeats")
        repeats = int(argv[k + 1])
        del argv[k : k + 2]
    compiled = "--compile" in argv
    what = [a for a in argv if not a.isdigit() and a not in ("--no-tune", "--compile")] or [
        "quality",
        "timing",
    ]
    count = next((int(a) for a in argv if a.isdigit()), 32)  # e.g. `timing 8` for a shorter run
    for w in what:
        if w == "compare":
            compare_paths(count, repeats)
        else:
            quality() if w == "quality" else timing(count, compiled)
