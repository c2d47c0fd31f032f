"""Effect of ``PerturbationOptions(top_channels=k)`` on Score-CAM: speed and agreement with the exact map.

    .venv/bin/python benchmarks/bench_top_channels.py [--threads 2] [--ks 32,64,128,256]

Pretrained EfficientNet-Lite0 (layer ``bn2``, 1280 channels), the three sample photos, top-1 class. For each k:
seconds per image and the Pearson correlation (and max |difference|) of the map at 224x224 against the exact
Score-CAM (all channels). Also for Ablation-CAM, where the same option skips channels.
"""

from __future__ import annotations

import argparse
import time

import torch

import camkit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ks", default="32,64,128,256")
    p.add_argument("--methods", default="scorecam,ablationcam")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = camkit.load_model()
    photos = [camkit.sample_image(s) for s in ("chelsea", "coffee", "astronaut")]
    print("| method | channels | s / image | Pearson vs exact (min over photos) | max abs diff |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        runs = {}
        for k in [None, *[int(v) for v in args.ks.split(",")]]:
            opts = camkit.PerturbationOptions(top_channels=k)
            t = time.perf_counter()
            e = camkit.explain(loaded.model, photos, method, preprocess=loaded.preprocess, perturbation=opts)
            runs[k] = (e.maps, (time.perf_counter() - t) / len(photos))
        exact = runs[None][0]
        for k, (maps, sec) in runs.items():
            corr = min(
                float(torch.corrcoef(torch.stack([maps[i].flatten(), exact[i].flatten()]))[0, 1])
                for i in range(len(photos))
            )
            diff = float((maps - exact).abs().max())
            print(f"| {method} | {k or 'all (1280)'} | {sec:.2f} | {corr:.4f} | {diff:.3f} |", flush=True)


if __name__ == "__main__":
    main()
