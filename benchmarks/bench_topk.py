"""Cost of explaining the top k classes of an image at once: ``camkit.explain(..., targets=TopK(k))``.

Run from the repository root:

    .venv/bin/python benchmarks/bench_topk.py                 # 224 px, batch 1, 7 repeats, 1 thread
    .venv/bin/python benchmarks/bench_topk.py --quick         # smoke run (2 repeats)

What runs, in one process:

* models: the offline pretrained EfficientNet-Lite0 of ``camkit.load_model()`` and torchvision ResNet-50 with random
  weights (``weights=None``, eval), each at its automatic layer (``bn2``, ``layer4``) and at one shallower layer
  (``blocks.4``, ``layer3``), where the backward pass is a larger share of the cost;
* input: one random normal Tensor[1, 3, 224, 224] (fixed seed), Grad-CAM;
* contenders per (model, layer):
    - ``k=1``: ``targets=None`` (the top-1 class, Tensor[B] scores: one backward);
    - ``k=5``: ``targets=TopK(5)``: the five gradients from one batched backward (``is_grads_batched``);
    - ``k=5 loop``: the same call with the former per-target loop (five backwards with ``retain_graph``),
      selected by replacing :func:`camkit.core.capture.target_gradients` with its ``batched=False`` form.

Methodology: ``torch.set_num_threads(1)``; the contenders of one (model, layer) are interleaved round-robin, the
start rotating every repetition; one untimed warm-up repetition; ``gc.collect()`` before each timed call; the table
gives the best and the median of ``--repeats`` (milliseconds) and the ratios of the bests. Before timing, the k=5
maps are checked against the loop's (max relative difference of the raw maps printed).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

import camkit
import camkit.core.capture


def _loop_gradients() -> Callable[[], None]:
    """Switch camkit to one backward per target; returns the function that switches back."""
    original = camkit.core.capture.target_gradients
    camkit.core.capture.target_gradients = functools.partial(original, batched=False)  # type: ignore[assignment]

    def restore() -> None:
        camkit.core.capture.target_gradients = original

    return restore


def run(model: nn.Module, x: Tensor, layer: str, k: int, loop: bool) -> camkit.Explanation:
    restore = _loop_gradients() if loop else None
    try:
        targets = None if k == 1 else camkit.TopK(k)
        return camkit.explain(model, x, method="gradcam", layers=layer, targets=targets)
    finally:
        if restore is not None:
            restore()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 repeats")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    lite0 = camkit.load_model().model
    resnet = torchvision.models.resnet50(weights=None).eval()
    cases = [
        ("Lite0 (pretrained)", lite0, "bn2"),
        ("Lite0 (pretrained)", lite0, "blocks.4"),
        ("ResNet-50 (random)", resnet, "layer4"),
        ("ResNet-50 (random)", resnet, "layer3"),
    ]
    print(
        f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f}, best of {repeats}"
    )
    print(
        "| model | layer | k=1 ms (best / median) | k=5 ms | k=5 loop ms | k=5 / k=1 | loop / k=1 | max rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    k = args.k
    for title, model, layer in cases:
        batched = run(model, x, layer, k, loop=False).raw[layer]
        looped = run(model, x, layer, k, loop=True).raw[layer]
        rel = float((batched - looped).abs().max() / looped.abs().max().clamp_min(1e-12))
        contenders: list[tuple[str, Callable[[], object]]] = [
            ("k1", functools.partial(run, model, x, layer, 1, False)),
            ("k", functools.partial(run, model, x, layer, k, False)),
            ("loop", functools.partial(run, model, x, layer, k, True)),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for rep in range(repeats + 1):
            shift = rep % len(contenders)
            for name, fn in contenders[shift:] + contenders[:shift]:
                gc.collect()
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep > 0:
                    times[name].append(dt)
        best = {n: min(v) * 1000 for n, v in times.items()}
        med = {n: statistics.median(v) * 1000 for n, v in times.items()}
        print(
            f"| {title} | `{layer}` | {best['k1']:.0f} / {med['k1']:.0f} | {best['k']:.0f} / {med['k']:.0f} | "
            f"{best['loop']:.0f} / {med['loop']:.0f} | {best['k'] / best['k1']:.2f} | "
            f"{best['loop'] / best['k1']:.2f} | {rel:.1e} |",
            flush=True,
        )
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
