"""Faithfulness of the gradient methods vs reference maps on real photos, and the cost of `camkit evaluate`.

    .venv/bin/python benchmarks/bench_evaluate.py quality   # table: deletion/insertion/avg drop/increase
    .venv/bin/python benchmarks/bench_evaluate.py timing    # 5 methods x deletion+insertion, 50 steps, 32 images
    .venv/bin/python benchmarks/bench_evaluate.py timing 4  # the same on 4 images
    .venv/bin/python benchmarks/bench_evaluate.py timing --no-tune  # without camkit.core.runtime.tune_allocator()

The process calls ``camkit.core.runtime.tune_allocator()`` first, as the ``camkit`` command does (``--no-tune``: not).

Photos found offline: scikit-image's astronaut, chelsea, coffee, rocket, motorcycle (left view), matplotlib's
grace_hopper.jpg, and scikit-learn's china.jpg / flower.jpg when scikit-learn is installed. The 32 timing images
are these photos, flipped and cropped. Model: the offline EfficientNet-Lite0, top-1 class of each image.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

import camkit
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


def timing(n_images: int = 32) -> None:
    loaded = camkit.load_model()
    pics = variants(photos(), n_images)
    t0 = time.perf_counter()
    res = evaluate(
        loaded.model,
        pics,
        methods=METHODS,
        metrics=["deletion", "insertion"],
        preprocess=loaded.preprocess,
        labels=loaded.labels,
        steps=50,
    )
    total = time.perf_counter() - t0
    t = res.timing
    other = total - t["explain"] - t["metric_forwards"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n_images} images x 5 methods, 50 steps, "
        f"allocator tuned: {TUNED}"
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


TUNED = False

if __name__ == "__main__":
    torch.set_num_threads(2)
    if "--no-tune" not in sys.argv:
        TUNED = tune_allocator()
    what = [a for a in sys.argv[1:] if not a.isdigit() and a != "--no-tune"] or ["quality", "timing"]
    count = next((int(a) for a in sys.argv[1:] if a.isdigit()), 32)  # e.g. `timing 8` for a shorter run
    for w in what:
        quality() if w == "quality" else timing(count)
