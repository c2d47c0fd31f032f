"""Peak memory of ``camkit.overlay`` on big photos: the 8-bit renderer against the float64 one it replaced.

    .venv/bin/python benchmarks/bench_memory.py            # 640x480, 4000x3000, 12000x9000; old and new
    .venv/bin/python benchmarks/bench_memory.py --new-only # skip the old renderer (it needs ~11 GB at 12000x9000)

Each case runs in a freshly forked child. The child builds the photo (a colour gradient with noise, decoded: a
PIL RGB image), then resets its peak resident size (``/proc/self/clear_refs``), draws one overlay of a smooth
224x224 map and reads ``VmHWM``. "Beyond the photo" is that peak minus the resident size just before the call,
so it counts the output picture and every temporary. The old renderer is kept below as it was (torch bilinear
upsample to full size, matplotlib's float64 RGBA colormap, ``Image.blend``). A case whose old renderer would
need more than 70% of the available memory is skipped.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys
import time

import numpy as np
import torch
from PIL import Image

import camkit
from camkit.core.postprocess import upsample

SIZES = [(640, 480), (4000, 3000), (12000, 9000)]
OLD_BYTES_PER_PIXEL = 100  # a generous estimate, to skip cases that would not fit


def old_overlay(
    image: Image.Image, heatmap: torch.Tensor, cmap: str = "jet", alpha: float = 0.5
) -> Image.Image:
    """camkit's overlay before the 8-bit renderer (for comparison only)."""
    import matplotlib

    m = heatmap.detach().float().cpu()
    base = image.convert("RGB")
    m = upsample(m, (base.size[1], base.size[0]))
    rgba = matplotlib.colormaps[cmap](m.clamp(0, 1).numpy())
    heat = Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8))
    return Image.blend(base, heat, alpha)


def photo(width: int, height: int) -> Image.Image:
    """A decoded RGB photo: a colour gradient plus noise, built a band of rows at a time."""
    out = Image.new("RGB", (width, height))
    rng = np.random.default_rng(0)
    xs = np.linspace(0, 255, width, dtype=np.float32)
    band = max(1, (1 << 20) // width)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        ys = np.linspace(y0, y1 - 1, y1 - y0, dtype=np.float32)[:, None] * 255 / max(1, height - 1)
        rgb = np.stack([xs[None, :] + 0 * ys, ys + 0 * xs[None, :], 255 - (xs[None, :] + ys) / 2], axis=-1)
        rgb += rng.normal(0, 12, rgb.shape).astype(np.float32)
        out.paste(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), (0, y0))
    return out


def cam_map() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    return torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.2)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(which: str, width: int, height: int, max_side: int | None, queue: mp.Queue) -> None:
    pic = photo(width, height)
    heat = cam_map()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if which == "old":
        out = old_overlay(pic, heat)
    else:
        out = camkit.overlay(pic, heat, max_side=max_side)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    queue.put((peak - before, seconds, out.size))


def measure(
    which: str, width: int, height: int, max_side: int | None = None
) -> tuple[int, float, tuple[int, int]]:
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(which, width, height, max_side, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str]) -> None:
    new_only = "--new-only" in argv
    torch.set_num_threads(1)
    # warm up: imports, the colour table, torch's kernels, so that no child pays them in its measurement
    warm = photo(64, 48)
    old_overlay(warm, cam_map())
    camkit.overlay(warm, cam_map())
    print(
        f"{'photo':>11} {'renderer':>16} {'output':>11} {'peak beyond photo MB':>21} {'bytes/pixel':>11} {'s':>6}"
    )
    for width, height in SIZES:
        cases: list[tuple[str, int | None]] = [("new", None), ("new", 2048)]
        if not new_only:
            if OLD_BYTES_PER_PIXEL * width * height < 0.7 * _available():
                cases.insert(0, ("old", None))
            else:
                print(f"{width}x{height}: old renderer skipped (not enough free memory)")
        for which, max_side in cases:
            extra, seconds, size = measure(which, width, height, max_side)
            name = (
                "old (float64)"
                if which == "old"
                else "new (uint8)" + (f" max {max_side}" if max_side else "")
            )
            print(
                f"{width}x{height:<5} {name:>16} {size[0]}x{size[1]:<5} {extra / 1e6:>21.0f} "
                f"{extra / (width * height):>11.2f} {seconds:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
