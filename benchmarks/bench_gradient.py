"""Speed of camkit's gradient CAMs against pytorch-grad-cam, torchcam and a plain inference forward (CPU).

Run from the repository root:

    .venv/bin/python benchmarks/bench_gradient.py                  # full run: 2 threads, 7 repeats
    .venv/bin/python benchmarks/bench_gradient.py --threads 1      # less noise on a small shared machine
    .venv/bin/python benchmarks/bench_gradient.py --quick --models lite0 --batches 1   # smoke run

What runs:

* models: torchvision ResNet-50 with random weights (``weights=None``, eval) explained at ``layer4``, and the
  pretrained EfficientNet-Lite0 of ``camkit.load_model()`` explained at ``bn2``;
* inputs: random normal Tensor[B, 3, 224, 224] (fixed seed), B in {1, 8}; the target is each image's top-1 class;
* contenders, for Grad-CAM, Grad-CAM++ and LayerCAM:
    - ``camkit``: ``camkit.explain(model, x, method=..., layers=...)`` (maps upsampled to 224x224, in [0, 1]);
    - ``grad-cam``: pytorch-grad-cam 1.5.7 (``GradCAM`` / ``GradCAMPlusPlus`` / ``LayerCAM``), built per call in a
      ``with`` block with ``target_layers=[module]`` and called with ``targets=None``; its normal cost includes
      the full backward (parameter gradients too) and numpy maps at 224x224;
    - ``torchcam``: torchcam 0.5.0 (``GradCAM`` / ``GradCAMpp`` / ``LayerCAM``) as a context manager:
      ``scores = model(x)`` with grad mode on, then ``extractor(class_idx=top1, scores=scores)``; the input does
      not need ``requires_grad`` (the parameters do). torchcam stops at normalised maps at feature resolution
      (7x7), it does not upsample;
  plus ``forward``: ``with torch.inference_mode(): model(x)``, the reference, and ``compare5``:
  ``camkit.compare`` of five gradient methods (gradcam, gradcam++, xgradcam, hirescam, layercam) in one pass.

Methodology: ``torch.set_num_threads(--threads)`` (default 2; OpenCV, used by pytorch-grad-cam to resize, gets the
same count). On a small machine shared with other work, 2 threads on 2 cores make every timing suffer whenever
another process takes a core, so medians get noisy; ``--threads 1`` is steadier there (the load average is printed
at the start and the end). For each (model, batch) all contenders are interleaved round-robin: every repetition runs each
contender once, in turn, starting one contender later than the previous repetition so that no contender always
follows the same one. One warm-up repetition is not timed, then ``--repeats`` are. ``gc.collect()`` runs before
each timed call. After each call, outside the timing: the output is checked (shape, finite values), the model
must carry no hook (forward, forward-pre, backward, backward-pre on every module, nor global module hooks), its
``requires_grad`` flags and eval mode must be unchanged and grad mode must be back on; parameter gradients left
by pytorch-grad-cam's ``loss.backward()`` are dropped (``model.zero_grad(set_to_none=True)``), every other
contender must leave ``param.grad`` None. In the warm-up round the maps of the three libraries are also compared
(agreement table) to show that they explain the same thing.

Columns:

* ``forward``, ``camkit``, ``grad-cam``, ``torchcam``, ``gradcam``, ``compare5``: milliseconds per image
  (time of one call / batch size), as ``median / best`` over the repeats;
* ``camkit/forward``: camkit's time over the plain forward's (1.00 = free explanation);
* ``grad-cam/camkit``, ``torchcam/camkit``: how many times faster camkit is than that library;
* ``compare5/gradcam``: five methods via ``camkit.compare`` over one ``camkit.explain`` Grad-CAM;
* ratios are given as ``ratio of medians / ratio of bests``.
* agreement: max |difference| between camkit's map and the library's map, both min-max normalised (grad-cam at
  224x224; torchcam at feature resolution against camkit's ReLU'd raw map normalised there).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytorch_grad_cam
import torch
import torchcam
import torchcam.methods
import torchvision
from torch import Tensor, nn

import camkit
from camkit.core.postprocess import normalize

SIZE = 224
SEED = 0
COMPARE_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam")


@dataclass(frozen=True)
class MethodSpec:
    """One CAM method as each library names it."""

    title: str
    camkit_name: str
    gradcam_cls: Callable[..., Any]
    torchcam_cls: Callable[..., Any]


METHODS = (
    MethodSpec("Grad-CAM", "gradcam", pytorch_grad_cam.GradCAM, torchcam.methods.GradCAM),
    MethodSpec("Grad-CAM++", "gradcam++", pytorch_grad_cam.GradCAMPlusPlus, torchcam.methods.GradCAMpp),
    MethodSpec("LayerCAM", "layercam", pytorch_grad_cam.LayerCAM, torchcam.methods.LayerCAM),
)


@dataclass(frozen=True)
class ModelCase:
    key: str
    title: str
    model: nn.Module
    layer: str


@dataclass
class Contender:
    """A timed callable; ``check`` validates its output (outside the timing)."""

    name: str
    run: Callable[[], object]
    check: Callable[[object], None]
    leaves_param_grads: bool = False
    seconds: list[float] = field(default_factory=list)


# --- the contenders -------------------------------------------------------------------------------------------


def run_forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x)  # type: ignore[no-any-return]


def run_camkit(model: nn.Module, x: Tensor, method: str, layer: str) -> camkit.Explanation:
    return camkit.explain(model, x, method=method, layers=layer)


def run_camkit_compare(model: nn.Module, x: Tensor, layer: str) -> dict[str, camkit.Explanation]:
    return camkit.compare(model, x, methods=COMPARE_METHODS, layers=layer)


def run_gradcam_lib(model: nn.Module, x: Tensor, cls: Callable[..., Any], layer: str) -> np.ndarray:
    with cls(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        return cam(input_tensor=x, targets=None)  # type: ignore[no-any-return]


def run_torchcam(model: nn.Module, x: Tensor, cls: Callable[..., Any], layer: str) -> list[Tensor]:
    with cls(model, target_layer=layer) as extractor:
        scores = model(x)
        return extractor(class_idx=scores.argmax(dim=1).tolist(), scores=scores)  # type: ignore[no-any-return]


# --- output checks -------------------------------------------------------------------------------------------


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def check_logits(batch: int) -> Callable[[object], None]:
    def check(out: object) -> None:
        _expect(isinstance(out, Tensor) and out.shape == (batch, 1000), f"forward output {out!r:.80}")
        assert isinstance(out, Tensor)
        _expect(bool(torch.isfinite(out).all()), "forward output is not finite")

    return check


def check_explanation(batch: int) -> Callable[[object], None]:
    def check(out: object) -> None:
        _expect(isinstance(out, camkit.Explanation), f"camkit returned {type(out).__name__}")
        assert isinstance(out, camkit.Explanation)
        _expect(tuple(out.maps.shape) == (batch, SIZE, SIZE), f"camkit maps {tuple(out.maps.shape)}")
        _expect(bool(torch.isfinite(out.maps).all()), "camkit maps are not finite")

    return check


def check_compare(batch: int) -> Callable[[object], None]:
    one = check_explanation(batch)

    def check(out: object) -> None:
        _expect(isinstance(out, dict) and list(out) == list(COMPARE_METHODS), f"compare returned {out!r:.80}")
        assert isinstance(out, dict)
        for expl in out.values():
            one(expl)

    return check


def check_gradcam_lib(batch: int) -> Callable[[object], None]:
    def check(out: object) -> None:
        _expect(
            isinstance(out, np.ndarray) and out.shape == (batch, SIZE, SIZE), f"grad-cam returned {out!r:.80}"
        )
        assert isinstance(out, np.ndarray)
        _expect(bool(np.isfinite(out).all()), "grad-cam maps are not finite")

    return check


def check_torchcam(batch: int) -> Callable[[object], None]:
    def check(out: object) -> None:
        _expect(isinstance(out, list) and len(out) == 1, f"torchcam returned {out!r:.80}")
        assert isinstance(out, list)
        cam = out[0]
        _expect(
            isinstance(cam, Tensor) and cam.dim() == 3 and cam.shape[0] == batch, f"torchcam map {cam!r:.80}"
        )
        _expect(bool(torch.isfinite(cam).all()), "torchcam maps are not finite")

    return check


# --- model state checks --------------------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    """Every module hook that could slow a forward or backward down, plus the global module hooks."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks)
        total += len(m._backward_hooks) + len(m._backward_pre_hooks)
    from torch.nn.modules import module as module_mod

    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        total += len(getattr(module_mod, name, {}))
    return total


@dataclass(frozen=True)
class ModelState:
    requires_grad: tuple[bool, ...]
    training: tuple[bool, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ModelState:
        return cls(
            tuple(p.requires_grad for p in model.parameters()), tuple(m.training for m in model.modules())
        )


def check_model_clean(model: nn.Module, state: ModelState, contender: Contender) -> None:
    n = hook_count(model)
    assert n == 0, f"{contender.name} left {n} hook(s) on the model"
    assert ModelState.of(model) == state, f"{contender.name} changed requires_grad or train/eval mode"
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled(), (
        f"{contender.name} left grad mode off"
    )
    if contender.leaves_param_grads:
        model.zero_grad(set_to_none=True)
    else:
        assert all(p.grad is None for p in model.parameters()), f"{contender.name} left parameter gradients"


# --- agreement (warm-up round only) --------------------------------------------------------------------------


def agreement(
    outputs: dict[str, object], case: ModelCase
) -> list[tuple[str, float | None, float | None, bool]]:
    """Per method: max |camkit - grad-cam|, max |camkit - torchcam|, whether camkit's maps are all zero."""
    rows = []
    for spec in METHODS:
        expl = outputs[f"camkit {spec.title}"]
        assert isinstance(expl, camkit.Explanation)
        gc_maps = outputs[f"grad-cam {spec.title}"]
        tc_maps = outputs[f"torchcam {spec.title}"]
        d_gc = d_tc = None
        if isinstance(gc_maps, np.ndarray):
            d_gc = float((expl.maps - torch.from_numpy(gc_maps)).abs().max())
        if isinstance(tc_maps, list):
            mine = normalize(torch.relu(expl.raw[case.layer]))
            d_tc = float((mine - tc_maps[0].float()).abs().max())
        rows.append((spec.title, d_gc, d_tc, bool((expl.maps == 0).all())))
    return rows


# --- timing --------------------------------------------------------------------------------------------------


def build_contenders(case: ModelCase, x: Tensor) -> list[Contender]:
    m, layer, b = case.model, case.layer, x.shape[0]
    out = [Contender("forward", partial(run_forward, m, x), check_logits(b))]
    for spec in METHODS:
        out.append(
            Contender(
                f"camkit {spec.title}",
                partial(run_camkit, m, x, spec.camkit_name, layer),
                check_explanation(b),
            )
        )
        out.append(
            Contender(
                f"grad-cam {spec.title}",
                partial(run_gradcam_lib, m, x, spec.gradcam_cls, layer),
                check_gradcam_lib(b),
                leaves_param_grads=True,
            )
        )
        out.append(
            Contender(
                f"torchcam {spec.title}",
                partial(run_torchcam, m, x, spec.torchcam_cls, layer),
                check_torchcam(b),
            )
        )
    out.append(Contender("compare5", partial(run_camkit_compare, m, x, layer), check_compare(b)))
    return out


def measure(
    case: ModelCase, x: Tensor, repeats: int, warmup: int = 1
) -> tuple[list[Contender], dict[str, object]]:
    contenders = build_contenders(case, x)
    state = ModelState.of(case.model)
    assert hook_count(case.model) == 0, "the model carries hooks before the benchmark"
    first: dict[str, object] = {}
    n = len(contenders)
    for rep in range(warmup + repeats):
        for j in range(n):
            c = contenders[(rep + j) % n]
            gc.collect()
            t0 = time.perf_counter()
            result = c.run()
            dt = time.perf_counter() - t0
            c.check(result)
            check_model_clean(case.model, state, c)
            if rep < warmup:
                first[c.name] = result
            else:
                c.seconds.append(dt)
            del result
        print(
            f"  {case.key} batch {x.shape[0]}: repetition {rep + 1}/{warmup + repeats} done",
            file=sys.stderr,
            flush=True,
        )
    return contenders, first


# --- report --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    median_ms: float
    best_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float], batch: int) -> Stat:
        return cls(statistics.median(seconds) * 1e3 / batch, min(seconds) * 1e3 / batch)

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} / {self.best_ms:.1f}"

    def ratio(self, other: Stat) -> tuple[float, float]:
        return self.median_ms / other.median_ms, self.best_ms / other.best_ms


def fmt_ratio(r: tuple[float, float]) -> str:
    return f"{r[0]:.2f} / {r[1]:.2f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_diff(d: float | None) -> str:
    return "n/a" if d is None else f"{d:.2g}"


def load_cases(keys: Sequence[str]) -> list[ModelCase]:
    cases = []
    for key in keys:
        if key == "resnet50":
            torch.manual_seed(SEED)
            model = torchvision.models.resnet50(weights=None).eval()
            cases.append(ModelCase(key, "ResNet-50 (random weights)", model, "layer4"))
        elif key == "lite0":
            loaded = camkit.load_model()
            cases.append(
                ModelCase(key, f"EfficientNet-Lite0 ({loaded.name}, pretrained)", loaded.model.eval(), "bn2")
            )
        else:
            raise SystemExit(f"unknown model {key!r}: use resnet50 and/or lite0")
    return cases


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:  # pragma: no cover - grad-cam depends on OpenCV
        pass


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2, help="torch (and OpenCV) threads (default 2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions per contender (default 7, 2 with --quick)",
    )
    p.add_argument("--models", default="resnet50,lite0", help="comma-separated: resnet50, lite0")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats unless --repeats is given")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    models = [k.strip() for k in args.models.split(",") if k.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    cases = load_cases(models)

    print("# camkit gradient CAM benchmark\n")
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, camkit {camkit.__version__}, "
        f"grad-cam {_version('grad-cam')}, torchcam {torchcam.__version__}; python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPU(s); torch threads {torch.get_num_threads()}; "
        f"{args.repeats} timed repetitions after 1 warm-up, round-robin; input {SIZE}x{SIZE}, seed {SEED}; "
        f"load average at start {_load()}.\n"
    )
    print("Cells: ms/image as `median / best`; ratios as `ratio of medians / ratio of bests`.\n")

    main_rows: list[list[str]] = []
    compare_rows: list[list[str]] = []
    agree_rows: list[list[str]] = []
    targets: list[tuple[str, float, str, bool]] = []
    for case in cases:
        for batch in batches:
            x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED))
            contenders, first = measure(case, x, args.repeats)
            stats = {c.name: Stat.of(c.seconds, batch) for c in contenders}
            fwd = stats["forward"]
            for spec in METHODS:
                ck = stats[f"camkit {spec.title}"]
                gl = stats[f"grad-cam {spec.title}"]
                tc = stats[f"torchcam {spec.title}"]
                main_rows.append(
                    [
                        case.key,
                        str(batch),
                        spec.title,
                        str(fwd),
                        str(ck),
                        str(gl),
                        str(tc),
                        fmt_ratio(ck.ratio(fwd)),
                        fmt_ratio(gl.ratio(ck)),
                        fmt_ratio(tc.ratio(ck)),
                    ]
                )
            one, five = stats["camkit Grad-CAM"], stats["compare5"]
            compare_rows.append([case.key, str(batch), str(one), str(five), fmt_ratio(five.ratio(one))])
            for title, d_gc, d_tc, zero in agreement(first, case):
                agree_rows.append(
                    [case.key, str(batch), title, fmt_diff(d_gc), fmt_diff(d_tc), "yes" if zero else "no"]
                )
            if case.key == "resnet50" and batch == 8:
                gcam = stats["camkit Grad-CAM"]
                r_fwd = gcam.ratio(fwd)[0]
                r_lib = stats["grad-cam Grad-CAM"].ratio(gcam)[0]
                targets.append(("Grad-CAM camkit/forward, resnet50 batch 8", r_fwd, "<= 1.15", r_fwd <= 1.15))
                targets.append(("Grad-CAM grad-cam/camkit, resnet50 batch 8", r_lib, ">= 2.5", r_lib >= 2.5))
            r5 = five.ratio(one)[0]
            targets.append((f"compare5/gradcam, {case.key} batch {batch}", r5, "<= 1.3", r5 <= 1.3))

    print("## Grad-CAM family: ms/image and ratios\n")
    print(
        markdown(
            [
                "model",
                "batch",
                "method",
                "forward",
                "camkit",
                "grad-cam",
                "torchcam",
                "camkit/forward",
                "grad-cam/camkit",
                "torchcam/camkit",
            ],
            main_rows,
        )
    )
    print("\n## Five methods in one camkit.compare vs one camkit Grad-CAM\n")
    print(markdown(["model", "batch", "gradcam", "compare5", "compare5/gradcam"], compare_rows))
    print("\n## Agreement in the warm-up round (max |camkit - library|, maps in [0, 1])\n")
    print(markdown(["model", "batch", "method", "grad-cam", "torchcam", "camkit maps all zero"], agree_rows))
    print("\n## Targets (ratios of medians)\n")
    print(
        markdown(
            ["target", "measured", "goal", "met"],
            [[name, f"{value:.2f}", goal, "yes" if ok else "NO"] for name, value, goal, ok in targets],
        )
    )
    print(
        "\nEvery contender left the model without hooks, parameter gradients or mode changes (asserted after each call). "
        f"Load average at the end: {_load()} (a load above the thread count means other processes shared the CPU: "
        "trust `best` over `median`, or rerun with --threads 1)."
    )


def _load() -> str:
    try:
        return "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not available on every platform
        return "n/a"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
