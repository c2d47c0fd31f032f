"""Peak memory (and time) of ShapleyCAM's double backward against Grad-CAM's single backward, and of the other
own-pass methods (FullGrad, guided backprop), on random-weight torchvision CNNs.

    .venv/bin/python benchmarks/bench_shapley_memory.py      # resnet18, resnet50; batch 1, 4; layer4, layer3
    .venv/bin/python benchmarks/bench_shapley_memory.py --models resnet18 --batches 1 --layers layer3

Each case runs in a freshly forked child with one CPU thread. The child builds the model and a 224x224 input,
runs one small warm-up explanation (32x32, so code paths and libraries are loaded), then resets its peak resident
size (``/proc/self/clear_refs``), runs ``camkit.explain`` once and reads ``VmHWM``. ShapleyCAM's double backward
runs through the layers after the target, so its overhead grows with them: ``layer4`` has only pooling and the
classifier after it, ``layer3`` a whole stage. FullGrad and guided backprop ignore the target layer. "Beyond the model" is that
peak minus the resident size just before the call: the graph, activations, gradients and every temporary.
Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import time

import torch
import torchvision

import camkit

METHODS = ("gradcam", "shapleycam", "fullgrad", "guided-backprop")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(model_name: str, method: str, batch: int, layer: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    camkit.explain(model, torch.randn(1, 3, 32, 32), method, layers=layer, targets=0)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    camkit.explain(model, x, method, layers=layer, targets=0)
    seconds = time.perf_counter() - t0
    queue.put((_status("VmHWM") - before, seconds))


def measure(model_name: str, method: str, batch: int, layer: str) -> tuple[int, float]:
    """(peak bytes beyond the model, seconds) of one explanation, in a forked child."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(model_name, method, batch, layer, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    args = parser.parse_args()
    print("| model | batch | layer | method | peak beyond the model (MiB) | vs Grad-CAM | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model_name in args.models:
        for batch in args.batches:
            for i, layer in enumerate(args.layers):
                base = None
                # FullGrad and guided backprop do not use the layer: measured with the first layer only
                for method in METHODS if i == 0 else METHODS[:2]:
                    peak, seconds = measure(model_name, method, batch, layer)
                    base = peak if base is None else base
                    print(
                        f"| {model_name} | {batch} | {layer} | {method} | {peak / 2**20:.0f} | "
                        f"{peak / base:.2f}x | {seconds:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
