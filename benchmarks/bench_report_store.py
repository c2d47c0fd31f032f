"""Size (and build time) of ``camkit report STORE`` per image, on a store of a few hundred photos.

    PYTHONPATH=src python benchmarks/bench_report_store.py [--n 300] [--work /tmp/bench_rstore]

The photos are random crops (40-100% of the side, longer side 375-500 px, JPEG quality 90) of scikit-image's
colour sample photos shipped with the package (nothing downloaded). The store is made by ``camkit.run.run`` with
the offline pretrained EfficientNet-Lite0 (Grad-CAM and LayerCAM, 7x7 maps, deletion with 5 steps); then reports
are written with several thumbnail sizes, one and two methods. Prints a Markdown table: bytes per image, and
images per second to build the report (one torch thread).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camkit.report import ReportOptions
from camkit.report.store import report_store
from camkit.run import ModelSpec, RunOptions, run

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "hubble_deep_field")


def photos(folder: Path, n: int, seed: int = 0) -> None:
    import skimage.data

    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLES]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = bases[i % len(bases)]
        f = rng.uniform(0.4, 1.0)
        w, h = max(32, int(base.width * f)), max(32, int(base.height * f * rng.uniform(0.75, 1.25)))
        w, h = min(w, base.width), min(h, base.height)
        x0, y0 = int(rng.integers(0, base.width - w + 1)), int(rng.integers(0, base.height - h + 1))
        crop = base.crop((x0, y0, x0 + w, y0 + h))
        side = int(rng.integers(375, 501))
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_rstore"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, store = args.work / "photos", args.work / "store"
    if not store.is_dir():
        shutil.rmtree(args.work, ignore_errors=True)
        photos(data, args.n)
        t0 = time.perf_counter()
        run(
            [data],
            store,
            model=ModelSpec(threads=1),
            options=RunOptions(methods=("gradcam", "layercam"), metrics=("deletion",), steps=5),
            workers=0,
        )
        print(f"store of {args.n} images made in {time.perf_counter() - t0:.0f} s")
    jpeg_kb = sum(f.stat().st_size for f in data.glob("*.jpg")) / args.n / 1e3
    print(f"photos: {jpeg_kb:.1f} kB per image on average (JPEG)\n")
    print("| methods | thumbnails | view on click | format, quality | kB per image | images/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = [
        (("gradcam",), 96, 0, "webp", 80),
        (("gradcam",), 128, 0, "webp", 80),
        (("gradcam",), 160, 0, "webp", 80),
        (("gradcam",), 128, 0, "webp", 60),
        (("gradcam", "layercam"), 128, 0, "webp", 80),
        (("gradcam",), 128, 0, "jpeg", 80),
        (("gradcam",), 128, 480, "webp", 80),
    ]
    for methods, thumb, full, fmt, quality in cases:
        out = args.work / f"r_{'-'.join(methods)}_{thumb}_{full}_{fmt}_{quality}.html"
        options = ReportOptions(thumb_side=thumb, full_side=full, format=fmt, quality=quality)
        t0 = time.perf_counter()
        result = report_store(store, out, options, methods=methods)
        dt = time.perf_counter() - t0
        stats = result.stats
        print(
            f"| {', '.join(methods)} | {thumb} px | {full or 'none'} | {fmt} {quality} | "
            f"{stats.bytes_per_image / 1e3:.1f} | {stats.images / dt:.0f} |"
        )


if __name__ == "__main__":
    main()
