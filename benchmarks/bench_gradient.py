"""Speed of camkit's gradient CAMs against pytorch-grad-cam, torchcam and a plain inference forward (CPU).

Run from the repository root:

    .venv/bin/python benchmarks/bench_gradient.py                  # full run: 1 thread, batch 8, 7 repeats
    .venv/bin/python benchmarks/bench_gradient.py --methods gradcam --repeats 9   # the goals only
    .venv/bin/python benchmarks/bench_gradient.py --quick --models lite0 --no-memory   # smoke run
    .venv/bin/python benchmarks/bench_gradient.py --memory-only --models lite0          # the memory table alone

What runs:

* models: the pretrained EfficientNet-Lite0 of ``camkit.load_model()`` explained at ``bn2`` (camkit's default
  layer) and torchvision ResNet-50 with random weights (``weights=None``, eval) explained at ``layer4``;
* inputs: random normal Tensor[B, 3, 224, 224] (fixed seed), B = 8 (``--batches``); the target is each image's
  top-1 class;
* contenders, for Grad-CAM, Grad-CAM++ and LayerCAM (``--methods``):
    - ``camkit``: ``camkit.explain(model, x, method=..., layers=...)`` (maps upsampled to 224x224, in [0, 1]); its
      capture runs on the prepared copy (BatchNorm folded, channels-last on CPU, ``camkit/core/prepared.py``),
      made and checked in the warm-up round;
    - ``grad-cam``: pytorch-grad-cam 1.5.7 (``GradCAM`` / ``GradCAMPlusPlus`` / ``LayerCAM``), built per call in a
      ``with`` block with ``target_layers=[module]`` and called with ``targets=None``; its normal cost includes
      the full backward (parameter gradients too) and numpy maps at 224x224;
    - ``torchcam``: torchcam 0.5.0 (``GradCAM`` / ``GradCAMpp`` / ``LayerCAM``) as a context manager:
      ``scores = model(x)`` with grad mode on, then ``extractor(class_idx=top1, scores=scores)``; the input does
      not need ``requires_grad`` (the parameters do). torchcam stops at normalised maps at feature resolution
      (7x7), it does not upsample;
  plus ``forward``: ``with torch.inference_mode(): model(x)`` on the model as given (eager, NCHW), the reference,
  ``camkit Grad-CAM accelerate=False`` (the capture on the model as given) and ``camkit Grad-CAM compile=jit``
  (``PerturbationOptions(compile="jit")``: the prepared copy split before the target layer, the part before it a
  frozen ``torch.jit`` trace, ``camkit/core/split.py``), ``compile=onnx`` on CPU where ONNX Runtime is installed
  (the part before the target layer exported to ONNX and run by ONNX Runtime); ``--inductor`` adds
  ``compile=inductor``. Their table
  shows the preparation time: the warm-up call minus the median of the timed calls (the whole batch). With CUDA, every table is also
  made on the GPU, with two more forwards to compare with: ``forward channels-last`` (a channels-last copy of the
  model, channels-last input) and ``forward inductor`` (``torch.compile`` of a copy, compiled before timing);
  each timed call ends with ``torch.cuda.synchronize()``.
* peak memory (CPU, Linux; ``--no-memory`` skips it): in a freshly forked child per cell, ``/proc/self/clear_refs``
  then one call, ``VmHWM`` minus the resident size before it; the children are forked before the parent runs
  anything on the model: the forward, camkit's Grad-CAM (its first call makes and checks the copy), camkit with
  ``accelerate=False`` and, where ONNX Runtime is installed, camkit with ``compile="onnx"`` (its first call
  exports the prefix and opens the session), each as a first call and as a second call (after one untimed call).

Methodology: ``torch.set_num_threads(--threads)`` (default 1; OpenCV, used by pytorch-grad-cam to resize, gets the
same count); the load average (``os.getloadavg()``) is printed at the start and the end. For each (model, batch) all contenders are interleaved round-robin: every repetition runs each
contender once, in turn, starting one contender later than the previous repetition so that no contender always
follows the same one. One warm-up repetition is not timed, then ``--repeats`` are. ``gc.collect()`` runs before
each timed call. After each call, outside the timing: the output is checked (shape, finite values), the model
must carry no hook (forward, forward-pre, backward, backward-pre on every module, nor global module hooks), its
``requires_grad`` flags and eval mode must be unchanged and grad mode must be back on; parameter gradients left
by pytorch-grad-cam's ``loss.backward()`` are dropped (``model.zero_grad(set_to_none=True)``), every other
contender must leave ``param.grad`` None. In the warm-up round the maps of the three libraries are also compared
(agreement table) to show that they explain the same thing.

Columns:

* ``forward``, ``camkit``, ``grad-cam``, ``torchcam``: milliseconds per image (time of one call / batch size), as
  ``median / best (+spread)`` over the repeats, spread = (worst - best) / best;
* ``camkit/forward``: camkit's time over the plain forward's (1.00 = free explanation);
* ``torchcam/camkit``, ``grad-cam/camkit``: how many times faster camkit is than that library;
* ratios are given as ``ratio of medians / ratio of bests``; the goals table uses the ratios of bests
  (Lite0: camkit/forward <= 0.75, torchcam/camkit >= 2; ResNet-50: <= 0.9 and >= 1.4; batch 8, CPU).
* agreement: max |difference| between camkit's map and the library's map, both min-max normalised (grad-cam at
  224x224; torchcam at feature resolution against camkit's ReLU'd raw map normalised there).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import numpy as np
import pytorch_grad_cam
import torch
import torchcam
import torchcam.methods
import torchvision
from torch import Tensor, nn

import camkit
from camkit import PerturbationOptions
from camkit.core.accel import Compile, onnx_available
from camkit.core.postprocess import normalize

SIZE = 224
SEED = 0


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
    first: float | None = None  # the untimed warm-up call


# --- the contenders -------------------------------------------------------------------------------------------


def run_forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x)  # type: ignore[no-any-return]


def run_camkit(
    model: nn.Module, x: Tensor, method: str, layer: str, accelerate: bool = True, compile: Compile = False
) -> camkit.Explanation:
    options = PerturbationOptions(compile=compile)
    return camkit.explain(model, x, method=method, layers=layer, accelerate=accelerate, perturbation=options)


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
    outputs: dict[str, object], case: ModelCase, methods: Sequence[MethodSpec]
) -> list[tuple[str, float | None, float | None, bool]]:
    """Per method: max |camkit - grad-cam|, max |camkit - torchcam|, whether camkit's maps are all zero."""
    rows = []
    for spec in methods:
        expl = outputs[f"camkit {spec.title}"]
        assert isinstance(expl, camkit.Explanation)
        gc_maps = outputs[f"grad-cam {spec.title}"]
        tc_maps = outputs[f"torchcam {spec.title}"]
        d_gc = d_tc = None
        if isinstance(gc_maps, np.ndarray):
            d_gc = float((expl.maps.cpu() - torch.from_numpy(gc_maps)).abs().max())
        if isinstance(tc_maps, list):
            mine = normalize(torch.relu(expl.raw[case.layer]))
            d_tc = float((mine - tc_maps[0].float()).abs().max().cpu())
        rows.append((spec.title, d_gc, d_tc, bool((expl.maps == 0).all())))
    return rows


# --- timing --------------------------------------------------------------------------------------------------


def build_contenders(
    case: ModelCase, x: Tensor, methods: Sequence[MethodSpec], compiled: Sequence[str] = ("jit",)
) -> list[Contender]:
    m, layer, b = case.model, case.layer, x.shape[0]
    out = [Contender("forward", partial(run_forward, m, x), check_logits(b))]
    out.append(
        Contender(
            "camkit Grad-CAM accelerate=False",
            partial(run_camkit, m, x, "gradcam", layer, False),
            check_explanation(b),
        )
    )
    for backend in compiled:
        out.append(
            Contender(
                f"camkit Grad-CAM compile={backend}",
                partial(run_camkit, m, x, "gradcam", layer, True, cast(Compile, backend)),
                check_explanation(b),
            )
        )
    out += gpu_forwards(m, x)
    for spec in methods:
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
    return out


def measure(
    case: ModelCase,
    x: Tensor,
    repeats: int,
    methods: Sequence[MethodSpec],
    compiled: Sequence[str] = ("jit",),
    warmup: int = 1,
) -> tuple[list[Contender], dict[str, object]]:
    contenders = build_contenders(case, x, methods, compiled)
    state = ModelState.of(case.model)
    assert hook_count(case.model) == 0, "the model carries hooks before the benchmark"
    first: dict[str, object] = {}
    n = len(contenders)
    for rep in range(warmup + repeats):
        for j in range(n):
            c = contenders[(rep + j) % n]
            gc.collect()
            sync(x)
            t0 = time.perf_counter()
            result = c.run()
            sync(x)
            dt = time.perf_counter() - t0
            c.check(result)
            check_model_clean(case.model, state, c)
            if rep < warmup:
                first[c.name] = result
                c.first = dt if c.first is None else c.first
            else:
                c.seconds.append(dt)
            del result
        print(
            f"  {case.key} batch {x.shape[0]}: repetition {rep + 1}/{warmup + repeats} done",
            file=sys.stderr,
            flush=True,
        )
    return contenders, first


# --- GPU forwards ---------------------------------------------------------------------------------------------


def sync(x: Tensor) -> None:
    """Wait for the device's queued work (CUDA), so that a timing covers it."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def gpu_forwards(model: nn.Module, x: Tensor) -> list[Contender]:
    """On CUDA, two more inference forwards of the model to compare with: channels-last (a copy of the model in
    channels-last memory format, channels-last input) and inductor (``torch.compile`` of a copy); none on CPU.
    A forward that cannot be prepared is left out with a note."""
    if x.device.type != "cuda":
        return []
    b = x.shape[0]
    out = []
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    xc = x.contiguous(memory_format=torch.channels_last)
    out.append(Contender("forward channels-last", partial(run_forward, nhwc, xc), check_logits(b)))
    try:
        compiled = torch.compile(copy.deepcopy(model).eval())
        run_forward(compiled, x)  # compiles now, not in a timed call
        out.append(Contender("forward inductor", partial(run_forward, compiled, x), check_logits(b)))
    except Exception as err:  # any compiler failure: the row says so
        print(f"  inductor forward left out: {type(err).__name__}: {err}", file=sys.stderr)
    return out


# --- report --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    median_ms: float
    best_ms: float
    worst_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float], batch: int) -> Stat:
        return cls(
            statistics.median(seconds) * 1e3 / batch, min(seconds) * 1e3 / batch, max(seconds) * 1e3 / batch
        )

    @property
    def spread(self) -> float:
        """(worst - best) / best over the repeats."""
        return (self.worst_ms - self.best_ms) / self.best_ms

    def __str__(self) -> str:
        return f"{self.median_ms:.1f} / {self.best_ms:.1f} (+{self.spread:.0%})"

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


def load_cases(keys: Sequence[str], device: torch.device) -> list[ModelCase]:
    cases = []
    for key in keys:
        if key == "resnet50":
            torch.manual_seed(SEED)
            model = torchvision.models.resnet50(weights=None).eval()
            cases.append(ModelCase(key, "ResNet-50 (random weights)", model.to(device), "layer4"))
        elif key == "lite0":
            loaded = camkit.load_model()
            title = f"EfficientNet-Lite0 ({loaded.name}, pretrained)"
            cases.append(ModelCase(key, title, loaded.model.eval().to(device), "bn2"))
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
    p.add_argument("--threads", type=int, default=1, help="torch (and OpenCV) threads (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions per contender (default 7, 2 with --quick)",
    )
    p.add_argument("--models", default="lite0,resnet50", help="comma-separated: resnet50, lite0")
    p.add_argument("--batches", default="8", help="comma-separated batch sizes (default 8)")
    p.add_argument(
        "--methods",
        default="gradcam,gradcam++,layercam",
        help="comma-separated: gradcam, gradcam++, layercam",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory table (CPU)")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory table (CPU, Linux)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repeats unless --repeats is given")
    p.add_argument(
        "--inductor",
        action="store_true",
        help="also time camkit Grad-CAM with compile='inductor' (tens of seconds of compiling per model)",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def chosen_methods(spec: str) -> list[MethodSpec]:
    by_name = {m.camkit_name: m for m in METHODS}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise SystemExit(f"unknown method(s) {unknown}: use {', '.join(by_name)}")
    if "gradcam" not in names:
        names.insert(0, "gradcam")  # the goals are Grad-CAM's
    return [by_name[n] for n in names]


def compiled_rows(
    key: str, batch: int, contenders: Sequence[Contender], stats: dict[str, Stat]
) -> list[list[str]]:
    """camkit Grad-CAM with ``compile=`` (and the default path, for comparison): ms/image, the preparation time
    (the warm-up call minus the median of the timed calls, whole batch) and the ratios."""
    rows = []
    fwd, tc, gl = stats["forward"], stats["torchcam Grad-CAM"], stats["grad-cam Grad-CAM"]
    default = stats["camkit Grad-CAM"]
    for c in contenders:
        if c.name != "camkit Grad-CAM" and not c.name.startswith("camkit Grad-CAM compile="):
            continue
        st = stats[c.name]
        prepare = "n/a" if c.first is None else f"{c.first - statistics.median(c.seconds):.1f}"
        ratios = [st.ratio(fwd), tc.ratio(st), gl.ratio(st), default.ratio(st)]
        rows.append([key, str(batch), c.name, str(st), prepare, *(fmt_ratio(r) for r in ratios)])
    return rows


# --- goals ---------------------------------------------------------------------------------------------------

#: per model: camkit Grad-CAM / forward at most, torchcam / camkit at least (CPU, batch 8, ratios of bests)
GOALS = {"lite0": (0.75, 2.0), "resnet50": (0.9, 1.4)}


def goal_rows(
    key: str, batch: int, stats: dict[str, Stat], device: str
) -> list[tuple[str, float, str, bool]]:
    """The goals of one (model, batch) as (what, measured, goal, met), ratios of bests."""
    if device != "cpu" or key not in GOALS or batch != 8:
        return []
    top_fwd, low_tc = GOALS[key]
    ck, fwd = stats["camkit Grad-CAM"], stats["forward"]
    r_fwd = ck.ratio(fwd)[1]
    r_tc = stats["torchcam Grad-CAM"].ratio(ck)[1]
    r_gl = stats["grad-cam Grad-CAM"].ratio(ck)[1]
    rows = [
        (f"Grad-CAM camkit/forward, {key} batch {batch}", r_fwd, f"<= {top_fwd}", r_fwd <= top_fwd),
        (f"Grad-CAM torchcam/camkit, {key} batch {batch}", r_tc, f">= {low_tc}", r_tc >= low_tc),
        (f"Grad-CAM grad-cam/camkit, {key} batch {batch}", r_gl, "(shown)", True),
    ]
    for name in [n for n in stats if n.startswith("camkit Grad-CAM compile=")]:
        which = name.removeprefix("camkit Grad-CAM ")
        c_fwd, c_tc = stats[name].ratio(fwd)[1], stats["torchcam Grad-CAM"].ratio(stats[name])[1]
        rows += [
            (
                f"Grad-CAM {which} camkit/forward, {key} batch {batch}",
                c_fwd,
                f"<= {top_fwd}",
                c_fwd <= top_fwd,
            ),
            (f"Grad-CAM {which} torchcam/camkit, {key} batch {batch}", c_tc, f">= {low_tc}", c_tc >= low_tc),
        ]
    return rows


# --- peak memory (CPU) ---------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_child(case: ModelCase, x: Tensor, which: str, queue: Any) -> None:
    """In a forked child: the peak resident memory of one call beyond what was resident before it (``later``: a
    second call, after one untimed call)."""
    run: Callable[[], object]
    if which.startswith("forward"):
        run = partial(run_forward, case.model, x)
    elif "onnx" in which:
        run = partial(run_camkit, case.model, x, "gradcam", case.layer, True, "onnx")
    else:
        run = partial(run_camkit, case.model, x, "gradcam", case.layer, "plain" not in which)
    if "later" in which:
        run()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    run()
    queue.put(_status("VmHWM") - before)


MEMORY_CELLS = ("forward", "forward later", "camkit", "camkit later", "camkit plain", "camkit plain later")
ONNX_CELLS = ("camkit onnx", "camkit onnx later")


def memory_rows(case: ModelCase, x: Tensor) -> list[list[str]]:
    """Peak memory beyond the resident set, each in a freshly forked child (Linux only), forked before the parent
    ran anything on the model (no prepared copy, no warm allocator)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    cells = []
    for which in MEMORY_CELLS + (ONNX_CELLS if onnx_available() else ()):
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(case, x, which, queue))
        proc.start()
        extra = queue.get()
        proc.join()
        cells.append(f"{extra / 2**20:.0f}")
    return [[case.key, str(x.shape[0]), *cells]]


# --- main ----------------------------------------------------------------------------------------------------


def run_device(args: argparse.Namespace, device: torch.device) -> None:
    """Every table of one device."""
    methods = chosen_methods(args.methods)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    cases = load_cases([k.strip() for k in args.models.split(",") if k.strip()], device)
    main_rows: list[list[str]] = []
    fwd_rows: list[list[str]] = []
    agree_rows: list[list[str]] = []
    mem_rows: list[list[str]] = []
    comp_rows: list[list[str]] = []
    goals: list[tuple[str, float, str, bool]] = []
    for case in cases:
        for batch in batches:
            x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(SEED)).to(device)
            if device.type == "cpu" and not args.no_memory and sys.platform.startswith("linux"):
                mem_rows += memory_rows(case, x)
            if args.memory_only:
                continue
            compiled = ["jit"]
            if device.type == "cpu" and onnx_available():
                compiled.append("onnx")
            if args.inductor:
                compiled.append("inductor")
            contenders, first = measure(case, x, args.repeats, methods, compiled)
            stats = {c.name: Stat.of(c.seconds, batch) for c in contenders}
            comp_rows += compiled_rows(case.key, batch, contenders, stats)
            fwd = stats["forward"]
            for spec in methods:
                ck = stats[f"camkit {spec.title}"]
                gl, tc = stats[f"grad-cam {spec.title}"], stats[f"torchcam {spec.title}"]
                ratios = [fmt_ratio(ck.ratio(fwd)), fmt_ratio(tc.ratio(ck)), fmt_ratio(gl.ratio(ck))]
                main_rows.append(
                    [case.key, str(batch), spec.title, str(fwd), str(ck), str(gl), str(tc), *ratios]
                )
            ck = stats["camkit Grad-CAM"]
            others = [n for n in stats if n.startswith("forward ") or n.endswith("accelerate=False")]
            fwd_rows += [
                [case.key, str(batch), n, str(stats[n]), fmt_ratio(ck.ratio(stats[n]))] for n in others
            ]
            for title, d_gc, d_tc, zero in agreement(first, case, methods):
                agree_rows.append(
                    [case.key, str(batch), title, fmt_diff(d_gc), fmt_diff(d_tc), "yes" if zero else "no"]
                )
            goals += goal_rows(case.key, batch, stats, device.type)
    print_tables(device, main_rows, fwd_rows, agree_rows, mem_rows, goals)
    if comp_rows:
        print(f"\n## {device.type.upper()}: camkit Grad-CAM with its capture compiled (`compile=`)\n")
        header = ["model", "batch", "contender", "ms/image", "prepare (s)", "/forward", "torchcam/it"]
        header += ["grad-cam/it", "camkit default/it"]
        print(markdown(header, comp_rows))


def print_tables(
    device: torch.device,
    main_rows: list[list[str]],
    fwd_rows: list[list[str]],
    agree_rows: list[list[str]],
    mem_rows: list[list[str]],
    goals: list[tuple[str, float, str, bool]],
) -> None:
    if main_rows:  # not with --memory-only
        print(f"## {device.type.upper()}: Grad-CAM family, ms/image and ratios\n")
        header = ["model", "batch", "method", "forward", "camkit", "grad-cam", "torchcam"]
        header += ["camkit/forward", "torchcam/camkit", "grad-cam/camkit"]
        print(markdown(header, main_rows))
        print(
            f"\n## {device.type.upper()}: camkit Grad-CAM against other forwards and against itself without the copy\n"
        )
        print(markdown(["model", "batch", "contender", "ms/image", "camkit Grad-CAM / contender"], fwd_rows))
        print(
            f"\n## {device.type.upper()}: agreement in the warm-up round (max |camkit - library|, maps in [0, 1])\n"
        )
        print(
            markdown(["model", "batch", "method", "grad-cam", "torchcam", "camkit maps all zero"], agree_rows)
        )
    if mem_rows:
        print("\n## CPU: peak memory beyond the resident set, MiB (fresh forked child each, VmHWM)\n")
        header = ["model", "batch", "forward", "forward, 2nd call", "camkit Grad-CAM", "camkit, 2nd call"]
        header += ["camkit accelerate=False", "accelerate=False, 2nd call"]
        if len(mem_rows[0]) > len(header):
            header += ["camkit compile=onnx", "compile=onnx, 2nd call"]
        print(markdown(header, mem_rows))
    if goals:
        print("\n## Goals (ratios of bests)\n")
        rows = [[name, f"{value:.2f}", goal, "yes" if ok else "NO"] for name, value, goal, ok in goals]
        print(markdown(["goal", "measured", "goal", "met"], rows))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    print("# camkit gradient CAM benchmark\n")
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, camkit {camkit.__version__}, "
        f"grad-cam {_version('grad-cam')}, torchcam {torchcam.__version__}; python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPU(s); torch threads {torch.get_num_threads()}; "
        f"{args.repeats} timed repetitions after 1 warm-up, round-robin; input {SIZE}x{SIZE}, seed {SEED}; "
        f"load average at start {_load()}.\n"
    )
    print("Cells: ms/image as `median / best (+spread)`, spread = (worst - best) / best; ratios as")
    print("`ratio of medians / ratio of bests`.\n")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"CUDA: {torch.cuda.get_device_name(0)}.\n")
    for device in devices:
        run_device(args, device)
        print()
    print(
        "Every contender left the model without hooks, parameter gradients or mode changes (asserted after each call). "
        f"Load average at the end: {_load()} (a load above the thread count means other processes shared the CPU: "
        "trust `best` over `median`)."
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
