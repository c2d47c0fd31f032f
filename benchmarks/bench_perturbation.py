"""Speed of camkit's Score-CAM (default and compiled) and Ablation-CAM against pytorch-grad-cam and torchcam (CPU).

Run from the repository root (results: ``benchmarks/README.md``):

    .venv/bin/python benchmarks/bench_perturbation.py                          # lite0 and resnet18, 8 images
    .venv/bin/python benchmarks/bench_perturbation.py --models resnet18 --images 2 --size 128   # quick look

What runs (one image per call, ``--images`` random normal inputs with fixed seeds, the top-1 class as target):

* models: the pretrained EfficientNet-Lite0 of ``camkit.load_model()`` (``bn2``: 1280 channels) and torchvision
  ResNet-18 with random weights (``layer4``: 512 channels), ``--models resnet50`` too if asked;
* Score-CAM contenders: ``camkit`` (default options: BatchNorm-folded copy, channels-last inputs),
  ``camkit-jit`` (``PerturbationOptions(compile="jit")``: traced, ``torch.jit.freeze`` +
  ``optimize_for_inference``) and/or ``camkit-inductor`` (``compile="inductor"``: ``torch.compile`` with
  freezing), as ``--compiled-backend jit|inductor|both|none`` asks (default both), each prepared on the first
  image and reused for the others, ``grad-cam`` (pytorch-grad-cam ``ScoreCAM``, its default batch of 16)
  and ``torchcam`` (torchcam ``ScoreCAM``, its default batch of 32);
* Ablation-CAM (``--methods score,ablation``): ``camkit`` (replay of the layers after the target) and
  ``grad-cam`` (``AblationCAM``).

Methodology: ``torch.set_num_threads(--threads)`` (default 1). For each image the contenders run interleaved, in
an order that rotates from image to image; ``--rounds`` passes over all images, best time per (contender, image)
kept. The compile (prepare) time is measured once per compiled contender, in the first round, as its first call
minus its median later call, with a fresh inductor cache directory (so the compile is cold, as on a first run;
pass ``--warm-cache`` to use the default on-disk cache). The jit backend's preparation (fold, trace, freeze,
optimisation) is timed directly instead, since a load change between images would inflate the difference. Totals over the images: compiled = compile time + its
per-image times. Break-even = compile time / (default per-image - compiled per-image), in images. Agreement
(Pearson of the maps at input size, first image): each compiled contender vs camkit, camkit ``weighting="channel-softmax",
align_corners=True`` vs grad-cam, camkit ``weighting="channel-softmax"`` vs torchcam.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Case:
    name: str
    model: object
    layer: str


def load_case(key: str) -> Case:
    import torch

    import camkit

    if key in ("resnet18", "resnet50"):
        import torchvision

        torch.manual_seed(0)
        return Case(f"{key} (random)", getattr(torchvision.models, key)(weights=None).eval(), "layer4")
    if key == "lite0":
        return Case("lite0 (pretrained)", camkit.load_model().model, "bn2")
    raise SystemExit(f"unknown model {key!r}: lite0, resnet18, resnet50")


def pearson(a: object, b: object) -> float:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def module(model: object, name: str) -> object:
    return dict(model.named_modules())[name]  # type: ignore[attr-defined]


def quiet(fn: Callable[[], object]) -> object:
    with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bars
        return fn()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lite0,resnet18")
    p.add_argument("--methods", default="score", help="comma-separated: score, ablation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--total-images",
        type=int,
        default=None,
        help="totals for this many images, from the measured per-image medians (default: --images, measured)",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--compiled-backend",
        choices=("jit", "inductor", "both", "none"),
        default="both",
        help="which compiled contenders run: camkit-jit, camkit-inductor, both or none",
    )
    p.add_argument("--no-compiled", action="store_true", help="same as --compiled-backend none")
    p.add_argument("--skip", default="", help="contenders to leave out, e.g. torchcam")
    p.add_argument(
        "--warm-cache", action="store_true", help="keep inductor's on-disk cache (default: fresh dir)"
    )
    args = p.parse_args()
    unknown = sorted(set(args.methods.split(",")) - {"score", "ablation"})
    if unknown:
        p.error(f"unknown --methods {unknown}: use score and/or ablation")
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="camkit-bench-inductor-")

    import torch
    import torch.nn.functional as F

    import camkit
    from camkit.core import accel

    torch.set_num_threads(args.threads)
    prepare_s: dict[str, float] = {}  # measured directly: the jit backend's trace + freeze + optimisation

    real_prepare = accel.BatchForward._prepare_compiled

    def timed_prepare(self: accel.BatchForward, *a: object, **k: object) -> object:
        t = time.perf_counter()
        try:
            return real_prepare(self, *a, **k)  # type: ignore[arg-type]
        finally:
            backend = str(a[1] if len(a) > 1 else k.get("backend"))
            prepare_s[backend] = prepare_s.get(backend, 0.0) + time.perf_counter() - t

    accel.BatchForward._prepare_compiled = timed_prepare  # type: ignore[method-assign]
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    backends = [] if args.no_compiled or args.compiled_backend == "none" else ["jit", "inductor"]
    if args.compiled_backend in ("jit", "inductor"):
        backends = [args.compiled_backend]
    compiled_names = [f"camkit-{b}" for b in backends]

    def camkit_run(case: Case, x: torch.Tensor, cls: int, method: str, **opts: object) -> torch.Tensor:
        return camkit.explain(
            case.model, x, method, case.layer, [cls], perturbation=camkit.PerturbationOptions(**opts)
        ).maps

    def gradcam_run(case: Case, x: torch.Tensor, cls: int, kind: str) -> np.ndarray:
        from pytorch_grad_cam import AblationCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        klass = ScoreCAM if kind == "score" else AblationCAM
        with klass(case.model, [module(case.model, case.layer)]) as cam:
            return quiet(lambda: cam(x, [ClassifierOutputTarget(cls)]))  # type: ignore[return-value]

    def torchcam_run(case: Case, x: torch.Tensor, cls: int) -> torch.Tensor:
        import torchcam.methods as tcm

        extractor = tcm.ScoreCAM(case.model, case.layer, input_shape=tuple(x.shape[1:]))
        try:
            with torch.no_grad():
                out = case.model(x)  # type: ignore[operator]
            maps = extractor(cls, out)[0]
        finally:
            extractor.remove_hooks()
        return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def make_contenders(
        case: Case, xs: list[torch.Tensor], classes: list[int], method: str
    ) -> dict[str, Callable[[int], object]]:
        if method != "score":
            return {
                "camkit": lambda i: camkit_run(case, xs[i], classes[i], "ablationcam"),
                "grad-cam": lambda i: gradcam_run(case, xs[i], classes[i], "ablation"),
            }
        out: dict[str, Callable[[int], object]] = {
            "camkit": lambda i: camkit_run(case, xs[i], classes[i], "scorecam")
        }
        for b in backends:
            out[f"camkit-{b}"] = lambda i, b=b: camkit_run(case, xs[i], classes[i], "scorecam", compile=b)
        out["grad-cam"] = lambda i: gradcam_run(case, xs[i], classes[i], "score")
        out["torchcam"] = lambda i: torchcam_run(case, xs[i], classes[i])
        return out

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        gc.collect()
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    print(
        f"torch {torch.__version__}, {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} thread(s), "
        f"input {args.size}px, {args.images} image(s), {args.rounds} round(s), load {os.getloadavg()}",
        flush=True,
    )
    rows: list[list[str]] = []
    for key in args.models.split(","):
        case = load_case(key.strip())
        xs, classes = [], []
        for i in range(args.images):
            torch.manual_seed(100 + i)
            x = torch.randn(1, 3, args.size, args.size)
            with torch.no_grad():
                classes.append(int(case.model(x).argmax()))  # type: ignore[operator]
            xs.append(x)
        for method in args.methods.split(","):
            contenders = make_contenders(case, xs, classes, method)
            contenders = {n: f for n, f in contenders.items() if n not in skip}
            names = list(contenders)
            times = {n: [[] for _ in range(args.images)] for n in names}  # type: dict[str, list[list[float]]]
            first_maps: dict[str, object] = {}
            accel.clear_cache()
            prepare_s.clear()
            for r in range(args.rounds):
                for i in range(args.images):
                    shift = (i + r) % len(names)
                    for n in names[shift:] + names[:shift]:
                        t, m = timed(lambda f=contenders[n], i=i: f(i))
                        times[n][i].append(t)
                        if i == 0:
                            first_maps[n] = m
                    print(
                        f"  {case.name} {method} round {r + 1} image {i + 1}: "
                        + ", ".join(f"{n} {times[n][i][-1]:.1f}s" for n in names),
                        flush=True,
                    )
            per_image = {n: [min(t) for t in times[n]] for n in names}
            steady = {n: statistics.median(v[1:] if len(v) > 1 else v) for n, v in per_image.items()}
            compile_s: dict[str, float] = {}
            later: dict[str, float] = {}
            for n in (c for c in compiled_names if c in names):
                first = times[n][0][0]  # round 1, image 1: includes the compile
                later[n] = statistics.median([t[0] for t in times[n][1:]] or [per_image[n][0]])
                compile_s[n] = max(0.0, first - later[n])
                if n == "camkit-jit" and "jit" in prepare_s:  # timed directly: not inflated by a load change
                    print(
                        f"  camkit-jit: prepare measured {prepare_s['jit']:.1f}s, estimated {compile_s[n]:.1f}s"
                    )
                    compile_s[n] = prepare_s["jit"]
            if args.total_images is None:
                totals = {n: sum(per_image[n]) for n in names}
                for n in compile_s:
                    totals[n] = compile_s[n] + sum([later[n], *per_image[n][1:]])
            else:  # projected from the medians
                totals = {n: args.total_images * steady[n] for n in names}
                for n in compile_s:
                    totals[n] += compile_s[n]
            libs = [n for n in ("grad-cam", "torchcam") if n in names]
            fastest = min((totals[n] for n in libs), default=float("nan"))
            agree = []
            if method == "score":
                i0 = 0
                for n in compiled_names:
                    if n in first_maps and "camkit" in first_maps:
                        agree.append(f"{n[7:]} {pearson(first_maps['camkit'], first_maps[n]):.5f}")
                if "grad-cam" in first_maps:
                    gc_map = camkit_run(
                        case, xs[i0], classes[i0], "scorecam", weighting="channel-softmax", align_corners=True
                    )
                    agree.append(f"gc {pearson(gc_map[0], first_maps['grad-cam'][0]):.5f}")  # type: ignore[index]
                if "torchcam" in first_maps:
                    tc_map = camkit_run(case, xs[i0], classes[i0], "scorecam", weighting="channel-softmax")
                    agree.append(f"tc {pearson(tc_map[0], first_maps['torchcam'][0]):.5f}")  # type: ignore[index]
            for n in names:
                rows.append(
                    [
                        case.name,
                        "Score-CAM" if method == "score" else "Ablation-CAM",
                        n,
                        f"{steady[n]:.2f}",
                        f"{compile_s[n]:.1f}" if n in compile_s else "",
                        f"{totals[n]:.1f}",
                        f"{fastest / totals[n]:.2f}x" if libs else "",
                        ", ".join(agree) if n == names[0] else "",
                    ]
                )
            for n in compile_s:
                if "camkit" not in names:
                    continue
                saving = steady["camkit"] - steady[n]
                even = f"{compile_s[n] / saving:.1f} images" if saving > 0 else "never (no per-image saving)"
                print(
                    f"  {case.name}: {n} compile {compile_s[n]:.1f}s, saving {saving:.2f}s/image, break-even {even}"
                )
                rows.append([case.name, "", f"break-even ({n} vs default)", "", "", "", "", even])
    header = [
        "model",
        "method",
        "contender",
        "s / image",
        "compile / prepare s",
        f"total s ({args.total_images or args.images} images"
        + (", projected)" if args.total_images else ")"),
        "fastest library / this",
        "agreement (Pearson)",
    ]
    print(
        f"\nload at the end {os.getloadavg()}; s / image: median over the images (compiled: images 2..n) of the "
        f"best of {args.rounds} round(s); totals include the compile\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
