"""ROAD's noisy linear imputation: camkit's batched solver against ROAD's own (scipy sparse LU, one image at a time).

    python benchmarks/bench_imputation.py                # 8 sample-sized images, 224 px, 1 thread
    python benchmarks/bench_imputation.py --size 160 --images 4 --repeats 3

The removed pixels follow a smooth random map ranked as ROAD ranks a CAM (most relevant first and least relevant
first, 10% to 90%), on smoothed random images. For every percentage the table prints camkit's time for the batch
(:func:`camkit.metrics.noisy_linear_impute`, noise 0, default tolerance), scipy's time for the same images one by
one (the system built as ROAD's ``NoisyLinearImputer`` builds it, solved by ``scipy.sparse.linalg.splu`` for the
three channels at once), their ratio, and the largest difference between the two solutions. Best of ``--repeats``;
scipy is needed (``pip install scipy``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from camkit.metrics import noisy_linear_impute
from camkit.metrics._common import pixel_ranks

_WEIGHTS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6))
_WEIGHTS += ((-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def scipy_fill(img: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """The exact solution of ROAD's system for one image (C, H, W) and its removed pixels (H, W)."""
    from scipy import sparse
    from scipy.sparse import linalg

    c, h, w = img.shape
    unknown = np.flatnonzero(remove.ravel())
    index = -np.ones(h * w, dtype=np.int64)
    index[unknown] = np.arange(len(unknown))
    ys, xs = np.divmod(unknown, w)
    diag = np.zeros(len(unknown))
    rhs = np.zeros((len(unknown), c))
    rows, cols, vals = [np.arange(len(unknown))], [np.arange(len(unknown))], []
    for dy, dx, wt in _WEIGHTS:
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        diag[inside] += wt
        at = np.flatnonzero(inside)
        j = index[yy[inside] * w + xx[inside]]
        rows.append(at[j >= 0])
        cols.append(j[j >= 0])
        vals.append(np.full(int((j >= 0).sum()), -wt))
        known = j < 0
        rhs[at[known]] += wt * img[:, yy[inside][known], xx[inside][known]].T
    a = sparse.csc_matrix(
        (np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(unknown), len(unknown)),
    )
    out = img.reshape(c, -1).copy()
    out[:, unknown] = linalg.splu(a).solve(rhs).T
    return out.reshape(c, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, s = args.images, args.size
    x = F.avg_pool2d(torch.rand(n, 3, s, s, generator=g) * 4 - 2, 7, 1, 3)
    cam = F.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=(s, s), mode="bilinear")
    print(f"{n} images, {s} px, 1 thread, best of {args.repeats}")
    print("| order | removed | camkit (s) | scipy splu (s) | scipy / camkit | max abs difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for order in ("morf", "lerf"):
        ranks = pixel_ranks(cam, descending=order == "morf").view(n, s, s)
        for pct in (0.1, 0.3, 0.5, 0.7, 0.9):
            remove = ranks < round(pct * s * s)
            ours, t_ours = None, float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                ours = noisy_linear_impute(x, remove, noise=0.0)
                t_ours = min(t_ours, time.perf_counter() - t)
            ref, t_ref = None, float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                ref = np.stack([scipy_fill(x[i].double().numpy(), remove[i].numpy()) for i in range(n)])
                t_ref = min(t_ref, time.perf_counter() - t)
            assert ours is not None and ref is not None
            diff = float(np.abs(ours.double().numpy() - ref).max())
            totals[0] += t_ours
            totals[1] += t_ref
            print(f"| {order} | {pct:.0%} | {t_ours:.2f} | {t_ref:.2f} | {t_ref / t_ours:.2f} | {diff:.1e} |")
    print(f"| all | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[1] / totals[0]:.2f} | |")


if __name__ == "__main__":
    main()
