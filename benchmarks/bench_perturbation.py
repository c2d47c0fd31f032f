"""Speed of camkit's Score-CAM and Ablation-CAM against pytorch-grad-cam, torchcam and the "floor" (CPU).

Run from the repository root:

    .venv/bin/python benchmarks/bench_perturbation.py                       # resnet18, resnet50, lite0; 2 threads
    .venv/bin/python benchmarks/bench_perturbation.py --models resnet18 --repeats 1 --size 96   # quick look

What runs (batch 1, one image, random normal input with a fixed seed, the top-1 class as target):

* models: torchvision ResNet-18 and ResNet-50 with random weights (explained at ``layer4``: 512 / 2048 channels)
  and the pretrained EfficientNet-Lite0 of ``camkit.load_model()`` (``bn2``: 1280 channels);
* Score-CAM contenders: ``camkit`` (the paper's weighting, default options), ``camkit-gc``
  (``weighting="channel-softmax", align_corners=True``: the same map as pytorch-grad-cam), ``grad-cam``
  (pytorch-grad-cam 1.5.7 ``ScoreCAM``, its default batch of 16) and ``torchcam`` (torchcam 0.5.0 ``ScoreCAM``,
  its default batch of 32);
* Ablation-CAM contenders: ``camkit`` (replay of the layers after the target) and ``grad-cam`` (``AblationCAM``,
  its default batch of 32; torchcam has no Ablation-CAM);
* ``floor``: K x the per-image time of one batched ``torch.inference_mode()`` forward at camkit's batch size
  (K = channels of the target layer): what any Score-CAM that runs one forward per channel must pay.

``camkit`` sends the masked inputs in channels-last layout on CPU (``PerturbationOptions.channels_last``, checked
on the first batch); the floor is the model as given (NCHW). ``--tune-allocator`` applies
``camkit.tune_allocator()`` to the whole process, so to every contender and the floor alike.

Methodology: ``torch.set_num_threads(--threads)`` (default 2). The contenders of one model are interleaved
round-robin, ``--repeats`` timed rounds (best and median kept; no untimed warm-up, every contender's first call
is timed alike); the floor is the best of 5 batched forwards after one untimed, measured in every round.
Agreement (Pearson of the maps at input size, last round): camkit-gc vs grad-cam,
camkit with ``weighting="channel-softmax"`` vs torchcam, camkit's Ablation-CAM vs grad-cam's (target layer after
a ReLU: both zero the channel). The exactness of camkit's batched map against a one-mask-at-a-time loop is a test
(tests/test_perturbation.py), not repeated here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camkit
from camkit.methods import perturbation as pm


@dataclass
class Case:
    name: str
    model: nn.Module
    layer: str


def load_case(key: str) -> Case:
    if key in ("resnet18", "resnet50"):
        import torchvision

        torch.manual_seed(0)
        return Case(key, getattr(torchvision.models, key)(weights=None).eval(), "layer4")
    if key == "lite0":
        return Case("lite0 (pretrained)", camkit.load_model().model, "bn2")
    raise SystemExit(f"unknown model {key!r}: resnet18, resnet50, lite0")


def pearson(a: object, b: object) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def quiet(fn: Callable[[], object]) -> object:
    with contextlib.redirect_stderr(io.StringIO()):  # pytorch-grad-cam's tqdm bars
        return fn()


def camkit_run(case: Case, x: Tensor, cls: int, method: str, **opts: object) -> Tensor:
    return camkit.explain(
        case.model, x, method, case.layer, [cls], perturbation=camkit.PerturbationOptions(**opts)
    ).maps


def gradcam_run(case: Case, x: Tensor, cls: int, kind: str) -> np.ndarray:
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    klass = ScoreCAM if kind == "score" else AblationCAM
    with klass(case.model, [module(case.model, case.layer)]) as cam:
        return quiet(lambda: cam(x, [ClassifierOutputTarget(cls)]))  # type: ignore[return-value]


def torchcam_run(case: Case, x: Tensor, cls: int) -> Tensor:
    import torchcam.methods as tcm

    extractor = tcm.ScoreCAM(case.model, case.layer, input_shape=tuple(x.shape[1:]))
    try:
        with torch.no_grad():
            out = case.model(x)
        maps = extractor(cls, out)[0]
    finally:
        extractor.remove_hooks()
    return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def floor_seconds(case: Case, x: Tensor, channels: int, batch: int) -> float:
    xb = x.expand(batch, *x.shape[1:]).contiguous()
    best = float("inf")
    with torch.inference_mode():
        case.model(xb)
        for _ in range(5):
            t = time.perf_counter()
            case.model(xb)
            best = min(best, time.perf_counter() - t)
    return best / batch * channels


def camkit_batch(case: Case, x: Tensor, act: Tensor) -> int:
    ctx = pm.PerturbationContext(
        model=case.model,
        x=x,
        layer=module(case.model, case.layer),
        layer_name=case.layer,
        calls=1,
        activations=act,
        output=torch.zeros(1, 1),
        classes=None,
        target_fn=None,
        output_fn=lambda o: o,  # type: ignore[arg-type,return-value]
    )
    return pm.batch_size_for(ctx)


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(case: Case, size: int, repeats: int, methods: list[str]) -> list[list[str]]:
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        cls = int(case.model(x).argmax())
    box: list[Tensor] = []
    h = module(case.model, case.layer).register_forward_hook(lambda _m, _i, o: box.append(o.detach()))
    with torch.no_grad():
        case.model(x)
    h.remove()
    k = box[0].shape[1]
    batch = camkit_batch(case, x, box[0])
    rows = []
    if "score" in methods:
        contenders: dict[str, Callable[[], object]] = {
            "camkit": lambda: camkit_run(case, x, cls, "scorecam"),
            "camkit-gc": lambda: camkit_run(
                case, x, cls, "scorecam", weighting="channel-softmax", align_corners=True
            ),
            "grad-cam": lambda: gradcam_run(case, x, cls, "score"),
            "torchcam": lambda: torchcam_run(case, x, cls),
        }
        times: dict[str, list[float]] = {name: [] for name in [*contenders, "floor"]}
        names = list(contenders)
        maps: dict[str, object] = {}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(timed(lambda name=name: maps.__setitem__(name, contenders[name]())))
            times["floor"].append(floor_seconds(case, x, k, batch))
            print(
                f"  {case.name} score round {r + 1}: "
                + ", ".join(f"{n} {t[-1]:.1f}s" for n, t in times.items())
            )
        softmax = camkit_run(case, x, cls, "scorecam", weighting="channel-softmax")
        agree_gc = pearson(maps["camkit-gc"][0], maps["grad-cam"][0])  # type: ignore[index]
        agree_tc = pearson(softmax[0], maps["torchcam"][0])  # type: ignore[index]
        best = {n: min(t) for n, t in times.items()}
        med = {n: statistics.median(t) for n, t in times.items()}
        fastest_lib = min(best["grad-cam"], best["torchcam"])
        rows.append(
            [
                case.name,
                "Score-CAM",
                str(k),
                str(batch),
                f"{med['floor']:.1f}/{best['floor']:.1f}",
                f"{med['camkit']:.1f}/{best['camkit']:.1f}",
                f"{med['camkit-gc']:.1f}/{best['camkit-gc']:.1f}",
                f"{med['grad-cam']:.1f}/{best['grad-cam']:.1f}",
                f"{med['torchcam']:.1f}/{best['torchcam']:.1f}",
                f"{best['camkit'] / best['floor']:.2f}",
                f"{fastest_lib / best['camkit']:.2f}",
                f"gc {agree_gc:.5f}, tc {agree_tc:.5f}",
            ]
        )
    if "ablation" in methods:
        contenders = {
            "camkit": lambda: camkit_run(case, x, cls, "ablationcam"),
            "grad-cam": lambda: gradcam_run(case, x, cls, "ablation"),
        }
        times = {name: [] for name in [*contenders, "floor"]}
        names = list(contenders)
        maps = {}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(timed(lambda name=name: maps.__setitem__(name, contenders[name]())))
            times["floor"].append(floor_seconds(case, x, k, batch))
            print(
                f"  {case.name} ablation round {r + 1}: "
                + ", ".join(f"{n} {t[-1]:.1f}s" for n, t in times.items())
            )
        agree = pearson(maps["camkit"][0], maps["grad-cam"][0])  # type: ignore[index]
        best = {n: min(t) for n, t in times.items()}
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append(
            [
                case.name,
                "Ablation-CAM",
                str(k),
                "auto",
                f"{med['floor']:.1f}/{best['floor']:.1f}",
                f"{med['camkit']:.1f}/{best['camkit']:.1f}",
                "",
                f"{med['grad-cam']:.1f}/{best['grad-cam']:.1f}",
                "",
                f"{best['camkit'] / best['floor']:.2f}",
                f"{best['grad-cam'] / best['camkit']:.2f}",
                f"gc {agree:.5f}",
            ]
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,lite0")
    p.add_argument("--methods", default="score,ablation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--tune-allocator",
        action="store_true",
        help="call camkit.tune_allocator() first (as the camkit command does): every contender and the floor gain",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune_allocator:
        print(f"camkit.tune_allocator(): {camkit.tune_allocator()}")
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), input {args.size}px, load {os.getloadavg()}")
    header = [
        "model",
        "method",
        "K",
        "batch",
        "floor s",
        "camkit s",
        "camkit-gc s",
        "grad-cam s",
        "torchcam s",
        "camkit/floor",
        "fastest lib/camkit",
        "agreement (Pearson)",
    ]
    rows = []
    for key in args.models.split(","):
        case = load_case(key.strip())
        rows += bench(case, args.size, args.repeats, args.methods.split(","))
    print(
        f"\nload at the end {os.getloadavg()}; cells: median/best seconds per image over {args.repeats} round(s)\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
