"""The public entry: :func:`explain` (one method) and :func:`compare` (several methods, one shared pass).

One call runs nine stages, each a function from values to values, in this order:

1. inputs (:func:`_inputs`): images, paths or a tensor -> the normalised batch on the model's device;
2. layers (:func:`_layers`): the layer spec -> ``{name: module}`` (:mod:`camkit.core.layers`);
3. targets (:func:`_targets`): what to explain -> a :class:`TargetPlan` (:mod:`camkit.core.targets`,
   :mod:`camkit.core.tasks`);
4. capture (:func:`_capture`): one forward (and one backward when a method needs dS/dA) with the plan resolved
   on the model's output -> :class:`camkit.core.capture.Captured` and :class:`Targets` (:mod:`camkit.core.capture`);
5. token layout (:func:`_token_layout`): token and channels-last outputs -> Tensor[B, K, h, w]
   (:mod:`camkit.core.tokens`);
6. method weights (:func:`_method_weights`): per layer, the channel weights of the method's kind: classifier rows
   (CAM, :mod:`camkit.methods.cam`), perturbation weights (:mod:`camkit.methods.engine`), none (gradient and
   projection formulas read A and dS/dA themselves);
7. maps (:func:`_maps`): the signed map of each layer, or the attention method's own pass;
8. post-processing (:func:`_postprocess`): ReLU, upsampling, min-max, fusion of layers (:mod:`camkit.core.postprocess`);
9. the :class:`~camkit.core.explanation.Explanation` (:func:`_explanation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.adapters import Preprocess, imagenet_labels
from camkit.adapters.video import postprocess_clip
from camkit.core.accel import Compile, one_lookup
from camkit.core.augment import Augment, AugmentSpec, average
from camkit.core.capture import Captured, LayerCapture, check_eval
from camkit.core.explanation import Explanation
from camkit.core.layers import LayerSpec, resolve_layers
from camkit.core.options import ExplainOptions
from camkit.core.outputs import OutputSpec, model_device, output_fn
from camkit.core.postprocess import fuse, normalize, upsample
from camkit.core.prepared import (
    PreparedCopy,
    batch_first,
    capture_rows,
    contiguous,
    disagreement,
    exact_rows,
    lookup,
    prepared_copy,
)
from camkit.core.split import SplitError, split_for
from camkit.core.targets import TargetSpec, TopK, resolve_classes, score_fn
from camkit.core.tasks import ChosenTarget, default_targets, model_task, score_threshold
from camkit.core.tokens import FeatureMaps, Reshape, to_spatial, unwrap
from camkit.errors import CamkitError
from camkit.io import load_image, to_rgb
from camkit.methods import Method, MethodInput, MethodKind, PassInput, get_method
from camkit.methods.engine import PerturbationContext, PerturbationOptions, Progress
from camkit.methods.projection import smooth_projection

__all__ = ["ExplainOptions", "ImageInput", "OutputSpec", "TargetPlan", "Targets", "compare", "explain"]

ImageInput = Tensor | Image.Image | str | Path | Sequence[Image.Image | str | Path]


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Inputs:
    """Stage 1's result: the model input Tensor[B, C, H, W] and the RGB images it came from (None for a tensor)."""

    x: Tensor
    images: list[Image.Image] | None


@dataclass(frozen=True)
class TargetPlan:
    """What to explain, before the model has run.

    Attributes:
        spec: the user's target spec.
        labels: the user's class names (None: ImageNet's for 1000-class outputs).
        task: ``"classification"``, or ``"segmentation"`` / ``"detection"`` when a torchvision model of that task
            gets a target chosen per image (``category``: None or the class asked for).
        category: the class asked for, for a segmentation / detection model.
        threshold: a detection model's score threshold (for messages).
    """

    spec: TargetSpec
    labels: Sequence[str] | None
    task: str = "classification"
    category: int | str | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Targets:
    """The plan resolved on the model's output.

    Attributes:
        classes: LongTensor[B] or [B, k] of explained classes; None for a callable target.
        fn: the callable target (the user's, or the targets chosen per image); None for classes.
        labels: the class names of the output, when known.
        chosen: what was chosen per image for a segmentation / detection model, else None.
    """

    classes: Tensor | None
    fn: Callable[[Tensor], Tensor] | None
    labels: Sequence[str] | None
    chosen: list[ChosenTarget] | None = None

    def score(self, output: Tensor) -> Tensor:
        """The explained scores of ``output``: Tensor[B], or Tensor[k, B] for classes [B, k]."""
        return score_fn(self.classes, self.fn)(output)


@dataclass(frozen=True)
class Shared:
    """What every method reads: the outcome of stages 1-5 and the call's settings."""

    model: nn.Module
    x: Tensor
    layers: dict[str, nn.Module]
    captured: Captured
    features: FeatureMaps
    targets: Targets
    output_fn: Callable[[object], Tensor]
    options: ExplainOptions
    progress: Progress

    @property
    def n_targets(self) -> int:
        """Targets per image: k for ``TopK(k)`` or a callable returning Tensor[B, k], else 1."""
        scores = self.captured.scores
        return 1 if scores is None or scores.dim() == 1 else scores.shape[0]

    @property
    def multi(self) -> bool:
        """Whether maps get a target axis (several targets per image)."""
        scores = self.captured.scores
        return scores is not None and scores.dim() == 2


@dataclass(frozen=True)
class Maps:
    """Stage 8's result: the normalised map of each layer and their fusion, at input size."""

    layer_maps: dict[str, Tensor]
    fused: Tensor


# ------------------------------------------------------------------------------------------------ stages


def _inputs(model: nn.Module, images: ImageInput, preprocess: Preprocess | None) -> Inputs:
    """1. Images / paths / a tensor -> the batch on the model's device (the model is checked by :func:`enter_model`)."""
    if isinstance(images, Tensor):
        x, pils = _check_tensor(model, images), None
    else:
        items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        if not items:
            raise CamkitError("no images given")
        pils = [to_rgb(it) if isinstance(it, Image.Image) else load_image(it) for it in items]
        x = (preprocess or Preprocess.for_model(model))(pils)
    device = model_device(model)
    return Inputs(x if x.device == device else x.to(device), pils)


def enter_model(model: nn.Module, stacklevel: int) -> nn.Module:
    """The model as every stage uses it, normalised once on entry: the module that really runs (inside
    ``DataParallel`` / ``torch.compile``, a Keras model's torch view, :func:`camkit.core.tokens.unwrap`), checked
    to be in eval mode (``stacklevel``: of the warning for a model in training mode, from the caller)."""
    if not isinstance(model, nn.Module) and not _is_keras(model):
        raise TypeError(f"model must be a torch.nn.Module (in eval mode), got {type(model).__name__}")
    module = unwrap(model)
    check_eval(module, stacklevel=stacklevel + 1)
    return module


def _is_keras(model: object) -> bool:
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)


def _layers(model: nn.Module, spec: LayerSpec, x: Tensor) -> dict[str, nn.Module]:
    """2. The layer spec -> ``{dotted name: module}``; a feature-pyramid backbone becomes its levels."""
    return _fpn_levels(resolve_layers(model, spec, x))


def prepare(
    model: nn.Module, images: ImageInput, layers: LayerSpec, preprocess: Preprocess | None = None
) -> tuple[Inputs, dict[str, nn.Module]]:
    """Stages 1 and 2 for other entry points (:func:`camkit.factorize`): the checked batch on the model's device
    (and the RGB images it came from) and the target layers ``{name: module}``; ``model`` as normalised by
    :func:`enter_model`."""
    inputs = _inputs(model, images, preprocess)
    return inputs, _layers(model, layers, inputs.x)


def _fpn_levels(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """A torchvision feature-pyramid backbone (``BackboneWithFPN``, e.g. Faster R-CNN's ``backbone``) or its
    ``FeaturePyramidNetwork`` returns a dict of levels, not a map: it is replaced by the modules whose outputs are
    the levels (``fpn.layer_blocks.i``, the 3x3 convolutions of each level; extra levels computed from the last
    one, such as Faster R-CNN's ``pool``, pass their gradient to it). Each level is explained and the maps fused as
    for any several layers (``fusion=``)."""
    out: dict[str, nn.Module] = {}
    for name, module in layers.items():
        fpn, prefix = module, name
        if not hasattr(fpn, "layer_blocks"):
            inner = getattr(module, "fpn", None)
            if isinstance(inner, nn.Module) and hasattr(inner, "layer_blocks"):
                fpn, prefix = inner, f"{name}.fpn"
        blocks = getattr(fpn, "layer_blocks", None)
        if fpn is not module or type(module).__name__ == "FeaturePyramidNetwork":
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                for i, block in enumerate(blocks):
                    out[f"{prefix}.layer_blocks.{i}"] = block
                continue
        out[name] = module
    return out


def _targets(
    model: nn.Module, spec: TargetSpec, labels: Sequence[str] | None, methods: Sequence[Method]
) -> TargetPlan:
    """3. What to explain. torchvision segmentation / detection models with no target or a class get one per image."""
    if callable(spec) and any(m.needs_classifier for m in methods):
        raise CamkitError(
            "CAM explains a class (it reads the classifier's weights): give class targets, not a function"
        )
    if spec is None or (isinstance(spec, (int, str)) and not isinstance(spec, bool)):
        task = model_task(model)
        if task != "classification":
            threshold = score_threshold(model) if task == "detection" else None
            return TargetPlan(spec, labels, task, category=spec, threshold=threshold)
    return TargetPlan(spec, labels)


def _capture(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    plan: TargetPlan,
    need_grad: bool,
    read: Callable[[object], Tensor],
    accelerate: bool = True,
    compiled: Compile = False,
) -> tuple[Captured, Targets]:
    """4. One forward (and one backward for ``need_grad``); the plan is resolved on the output in between. With
    ``accelerate`` (classifiers: not torchvision detection or segmentation models, whatever the target), on the
    prepared copy of the model (:mod:`camkit.core.prepared`), checked against the model on the first batch of each
    shape (:func:`_checked_copy`); with ``compiled`` (the ``compile`` setting) and ``need_grad`` too, on that
    copy split before its earliest target layer, the part before it compiled (:mod:`camkit.core.split`, checked
    alike)."""
    with one_lookup(model):  # the model's cache entry found once for this capture, not once per question
        classifier = plan.task == "classification" and model_task(model) == "classification"
        allowed, prep = lookup(model, x, layers) if accelerate and classifier else (False, None)
        if not allowed:
            return _capture_on(model, x, layers, plan, need_grad, read)
        if compiled and need_grad:
            split = _split_capture(model, x, layers, plan, need_grad, read, compiled)
            if split is not None:
                return split
            allowed, prep = lookup(model, x, layers)
            if not allowed:
                return _capture_on(model, x, layers, plan, need_grad, read)
        if prep is not None and prep.checked(x):
            return _capture_prepared(prep, x, plan, need_grad, read)
        got = _checked_copy(model, x, layers, plan, need_grad, read)
        return got if got is not None else _capture_on(model, x, layers, plan, need_grad, read)


def _split_capture(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    plan: TargetPlan,
    need_grad: bool,
    read: Callable[[object], Tensor],
    setting: Compile,
) -> tuple[Captured, Targets] | None:
    """Stage 4 on the compiled split of the prepared copy (:mod:`camkit.core.split`), checked against the model on
    the first batch of each shape; None where there is no split or it was dropped (with one warning)."""
    split = split_for(model, x, layers, setting)
    if split is None:
        return None
    try:
        run = split.forward_for(x)
    except SplitError as err:
        split.settle(model, x, str(err))
        return None

    def on_split() -> tuple[Captured, Targets]:
        cap, targets = _capture_on(run, x, split.layers, plan, need_grad, read)
        return contiguous(cap), targets

    if split.checked(x):
        return on_split()
    return _checked(
        model, x, layers, plan, need_grad, read, on_split, lambda why: split.settle(model, x, why)
    )


def _checked_copy(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    plan: TargetPlan,
    need_grad: bool,
    read: Callable[[object], Tensor],
) -> tuple[Captured, Targets] | None:
    """The first batch of a shape on the prepared copy (made once), checked (:func:`_checked`); the copy's capture,
    or None where it was dropped (the model as given runs it)."""
    prep = prepared_copy(model, x, layers)
    if prep is None:
        return None
    return _checked(
        model,
        x,
        layers,
        plan,
        need_grad,
        read,
        lambda: _capture_prepared(prep, x, plan, need_grad, read),
        lambda why: prep.settle(model, x, why),
    )


def _checked(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    plan: TargetPlan,
    need_grad: bool,
    read: Callable[[object], Tensor],
    faster: Callable[[], tuple[Captured, Targets]],
    settle: Callable[[str | None], None],
) -> tuple[Captured, Targets] | None:
    """The first batch of a shape: ``faster()`` (a copy's capture) runs it, then the model as given runs the same
    capture :data:`camkit.core.accel.CHECK_ROWS` images at a time for the check (all images; the model's whole
    batch only for a callable target), so that no two passes hold memory at once and the model's pass costs the
    memory of a few images. ``settle`` records the verdict (None: they agree, else why not). The copy's capture, or
    None where it disagreed or raised."""
    try:
        got = faster()
    except (RuntimeError, TypeError) as err:  # e.g. ``.view`` of a channels-last feature map
        settle(f"it raised {type(err).__name__}: {err}")
        return None
    classes = got[1].classes
    if classes is None or not batch_first(got[0]):
        ref, exact = _capture_on(model, x, layers, plan, need_grad, read), None
    else:
        part = capture_rows(model, x, layers, classes, need_grad, read)
        ref = part, _resolve(plan, part.output)
        exact = exact_rows(model, x, list(layers), classes, need_grad, read)
    reason = disagreement(ref[0], got[0], ref[1].classes, classes, exact)
    settle(reason)
    return None if reason else got


def _capture_prepared(
    prep: PreparedCopy, x: Tensor, plan: TargetPlan, need_grad: bool, read: Callable[[object], Tensor]
) -> tuple[Captured, Targets]:
    """Stage 4 on the prepared copy; its tensors handed on in the model's memory format."""
    module, layers = prep.module, prep.layers
    assert module is not None
    cap, targets = _capture_on(module, prep.input(x), layers, plan, need_grad, read)
    return contiguous(cap), targets


def _capture_on(
    model: nn.Module,
    x: Tensor,
    layers: dict[str, nn.Module],
    plan: TargetPlan,
    need_grad: bool,
    read: Callable[[object], Tensor],
) -> tuple[Captured, Targets]:
    """One forward of ``model`` (the model or its prepared copy) with the capture's hooks on ``layers``."""
    with LayerCapture(layers, need_grad) as window:
        out = window.forward(model, x, read)
        batch = x.shape[0]
        _check_finite(out, batch, "the model's output", "check the model's weights (NaN?) and its input")
        targets = _resolve(plan, out.detach())
        scores = targets.score(out)
        _check_finite(scores, batch, "the explained score", "check the target function", batch_dim=-1)
        return window.result(out, scores), targets


def _token_layout(
    model: nn.Module, layers: dict[str, nn.Module], cap: Captured, x: Tensor, reshape: Reshape | None
) -> FeatureMaps:
    """5. Every captured activation and gradient as Tensor[B, K, h, w]."""
    return to_spatial(cap.activations, cap.gradients, model, layers, (x.shape[-2], x.shape[-1]), reshape)


def _method_weights(method: Method, shared: Shared) -> dict[str, list[Tensor]]:
    """6. Per layer, channel weights Tensor[B, K] per target for a method of kind ``CHANNEL_WEIGHTS`` (CAM's
    classifier rows, a perturbation method's weights: :meth:`Method.channel_weights`); none for the other kinds."""
    if method.kind is not MethodKind.CHANNEL_WEIGHTS:
        return {}
    if shared.targets.classes is None and shared.multi:
        raise CamkitError(
            f"{method.name} explains one callable target per image; for a target returning Tensor[B, T] "
            "use a gradient method, or explain each target in its own call"
        )
    out = {}
    for layer in shared.captured.order:
        w = method.channel_weights(_weights_context(shared, layer))  # [B, T, K]
        out[layer] = [w[:, t] for t in range(shared.n_targets)]
    return out


def _weights_context(shared: Shared, layer: str) -> PerturbationContext:
    """What :meth:`Method.channel_weights` reads of one layer."""
    classes = shared.targets.classes
    return PerturbationContext(
        model=shared.model,
        x=shared.x,
        layer=shared.layers[layer],
        layer_name=layer,
        calls=shared.captured.calls.get(layer, 1),
        activations=shared.features.activations[layer],
        output=shared.captured.output,
        classes=classes,
        target_fn=shared.targets.fn if classes is None else None,
        output_fn=shared.output_fn,
        options=shared.options.perturbation,
        progress=shared.progress,
        layout=shared.features.layouts.get(layer),
    )


def _maps(method: Method, shared: Shared, weights: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """7. The signed maps by the method's kind: per layer, shallow to deep, from the shared capture (Tensor[B, h, w],
    [B, k, h, w] for k targets per image), or the method's own passes' maps (:meth:`Method.own_maps`)."""
    if not method.kind.shared_capture:
        return method.own_maps(_pass_input(shared))
    raw = {}
    for layer in shared.captured.order:
        w = weights.get(layer)
        per_target = [
            _layer_map(method, shared, layer, None if w is None else w[t], t) for t in range(shared.n_targets)
        ]
        raw[layer] = _unfold(
            shared.features, layer, torch.stack(per_target, dim=1) if shared.multi else per_target[0]
        )
    return raw


def _layer_map(method: Method, shared: Shared, layer: str, w: Tensor | None, t: int) -> Tensor:
    """One layer's signed map for target ``t``: sum_k w_k A_k for channel weights ``w`` Tensor[B, K], else the
    method's formula of A and dS/dA; eigen-smoothed when the call asks."""
    a = shared.features.activations[layer].float()
    smooth = shared.options.eigen_smooth
    if w is not None:
        wt = w.float()
        return smooth_projection(wt[:, :, None, None] * a) if smooth else torch.einsum("bk,bkhw->bhw", wt, a)
    g = _gradient(shared.features, layer, t) if method.needs_grad else None
    inp = MethodInput(a, g)
    return _eigen_smoothed(method, inp, layer) if smooth else method.formula(inp)


def _pass_input(shared: Shared) -> PassInput:
    """What a method's own passes receive, with the shared capture in case it combines both."""
    tg = shared.targets
    return PassInput(
        shared.model,
        shared.x,
        shared.layers,
        shared.output_fn,
        tg.classes,
        tg.fn,
        activations=dict(shared.features.activations),
        gradients=dict(shared.features.gradients),
        reshape=shared.options.reshape,
    )


def _eigen_smoothed(method: Method, inp: MethodInput, layer: str) -> Tensor:
    """Eigen-smoothing of a layer method whose map is a sum over channels of terms that each read only their own
    channel (Grad-CAM: w_k A_k; HiResCAM: g_k A_k; LayerCAM: ReLU(g_k) A_k; CAM: W_ck A_k; ...): the terms are
    the method's formula applied to each channel alone (channels folded into the batch), checked to sum to the
    method's map, then projected on their first principal component (:func:`smooth_projection`)."""
    a = inp.activations
    b, k, h, w = a.shape

    def fold(t: Tensor | None) -> Tensor | None:
        return (
            None if t is None else t.reshape(b * k, 1, *t.shape[2:]) if t.dim() == 4 else t.reshape(b * k, 1)
        )

    terms = method.formula(
        MethodInput(a.reshape(b * k, 1, h, w), fold(inp.gradients), fold(inp.class_weights))
    )
    plain = method.formula(inp)
    terms = terms.reshape(b, k, h, w)
    scale = float(plain.abs().max().clamp_min(1e-30))
    if not torch.allclose(terms.sum(dim=1), plain, rtol=1e-4, atol=1e-5 * scale):
        raise CamkitError(
            f"eigen_smooth needs a map that is a sum over channels of per-channel terms; {method.name}'s map of "
            f"{layer!r} is not (a projection method such as Eigen-CAM is smoothed already): use eigen_smooth=False"
        )
    return smooth_projection(terms)


def _postprocess(
    method: Method, raw: dict[str, Tensor], size: tuple[int, ...], relu: bool, fusion: str | None
) -> Maps:
    """8. ReLU, upsampling to the input size and min-max per layer, then the fusion of the layers (a clip:
    ``size`` is (T, H, W), see :func:`camkit.adapters.video.postprocess_clip`)."""
    shallow_tanh = method.fusion_tanh if fusion is None else None
    if len(size) == 3:
        return Maps(*postprocess_clip(raw, (size[0], size[1], size[2]), relu, fusion, shallow_tanh))
    layer_maps = {name: normalize(upsample(torch.relu(r) if relu else r, size)) for name, r in raw.items()}
    return Maps(layer_maps, fuse(list(layer_maps.values()), mode=fusion or "max", shallow_tanh=shallow_tanh))


def _explanation(
    method: Method, raw: dict[str, Tensor], maps: Maps, cap: Captured, targets: Targets, images: Inputs
) -> Explanation:
    """9. The record the user gets: maps, scores, classes with their probabilities and names, the images."""
    assert cap.scores is not None
    classes, lab = targets.classes, targets.labels
    probs = None
    names: list[str] | list[list[str]] | None = None
    if classes is not None:
        p = torch.softmax(cap.output.float(), dim=1)
        probs = p.gather(1, classes[:, None])[:, 0] if classes.dim() == 1 else p.gather(1, classes)
        if lab is not None:
            names = (
                [lab[int(c)] for c in classes]
                if classes.dim() == 1
                else [[lab[int(c)] for c in row] for row in classes]
            )
    return Explanation(
        maps=maps.fused,
        layer_maps=maps.layer_maps,
        raw=raw,
        classes=classes,
        scores=cap.scores if cap.scores.dim() == 1 else cap.scores.T,
        probs=probs,
        labels=names,
        method=method.name,
        layers=list(maps.layer_maps),
        images=images.images,
        chosen=targets.chosen,
        output=cap.output,
    )


@dataclass(frozen=True)
class Computed:
    """One pass of stages 2-9: the explanations by method name and the target layers it resolved."""

    results: dict[str, Explanation]
    layers: dict[str, nn.Module]


def _compute(model: nn.Module, inputs: Inputs, methods: Sequence[Method], opts: ExplainOptions) -> Computed:
    """Stages 2-9 on a batch: one shared capture, then each method's weights, maps and post-processing."""
    read = output_fn(opts.output)
    _check_clip_methods(inputs.x, methods)
    modules = _layers(model, opts.layers, inputs.x)
    plan = _targets(model, opts.targets, opts.labels, methods)
    need_grad = any(m.needs_grad for m in methods)
    cap, resolved = _capture(
        model, inputs.x, modules, plan, need_grad, read, opts.accelerate, opts.perturbation.compile
    )
    features = _token_layout(model, modules, cap, inputs.x, opts.reshape)
    progress = Progress(opts.perturbation.progress)
    shared = Shared(model, inputs.x, modules, cap, features, resolved, read, opts, progress)
    size = tuple(int(n) for n in inputs.x.shape[2:])  # (H, W); (T, H, W) for a clip
    results = {}
    for method in methods:
        raw = _maps(method, shared, _method_weights(method, shared))
        for layer, r in raw.items():
            _check_finite(
                r, r.shape[0], f"the {method.name} map of {layer!r}", "its gradients or weights overflowed"
            )
        maps = _postprocess(method, raw, size, opts.relu, opts.fusion)
        for layer, m in {**maps.layer_maps, "(fused)": maps.fused}.items():
            _check_finite(m, m.shape[0], f"the post-processed {method.name} map of {layer!r}", "")
        results[method.name] = _explanation(method, raw, maps, cap, resolved, inputs)
    return Computed(results, modules)


def _explain_all(
    model: nn.Module, images: ImageInput, methods: Sequence[Method], opts: ExplainOptions
) -> dict[str, Explanation]:
    """What :func:`explain` and :func:`compare` run once their arguments are records: the model normalised once
    (:func:`enter_model`), the combinations a method's kind does not support refused by name, then one pass, or one
    per augmentation (:func:`_augmented`)."""
    model = enter_model(model, stacklevel=3)
    _check_kinds(methods, opts)
    if opts.augment:
        if isinstance(images, Tensor) and images.dim() == 5:
            raise CamkitError(
                "augment= works on images, not on clips Tensor[B, C, T, H, W]: use augment=None"
            )
        _check_augment(model, methods, opts)
        return _augmented(model, _inputs(model, images, opts.preprocess), methods, opts)
    return _compute(model, _inputs(model, images, opts.preprocess), methods, opts).results


def _check_kinds(methods: Sequence[Method], opts: ExplainOptions) -> None:
    """eigen_smooth needs maps that are sums over channels (kinds reading the shared capture)."""
    own = [m.name for m in methods if not m.kind.shared_capture]
    if opts.eigen_smooth and own:
        raise CamkitError(
            f"eigen_smooth applies to layer and perturbation methods, not to attention methods or methods with "
            f"passes of their own (FullGrad, guided backprop, ...): {', '.join(own)}"
        )


def _check_augment(model: nn.Module, methods: Sequence[Method], opts: ExplainOptions) -> None:
    """Test-time augmentation explains one class per image of a classifier, with methods whose maps it can warp."""
    if isinstance(opts.targets, TopK) or callable(opts.targets):
        raise CamkitError(
            "augment explains one class per image: give None, a class index or name, or a list; TopK and "
            "callable targets (a mask or a box does not follow a flip) are not supported with augment"
        )
    if model_task(model) != "classification":
        raise CamkitError(
            "augment is for classifiers: a segmentation mask or a detection box does not follow a flip"
        )
    refused = [m.name for m in methods if not m.augmentable]
    if refused:
        raise CamkitError(
            f"augment applies to layer, perturbation and own-pass methods, not to attention methods "
            f"({', '.join(refused)}): use augment=None for them"
        )


def _augmented(
    model: nn.Module, inputs: Inputs, methods: Sequence[Method], opts: ExplainOptions
) -> dict[str, Explanation]:
    """Test-time augmentation (:mod:`camkit.core.augment`): one pass per augmentation, the maps warped back onto the
    original input and averaged. The first pass (the input as given) fixes the classes, the layers, the scores
    and the raw maps; the other passes explain the same classes at the layers the first pass resolved."""
    x = inputs.x
    size = (x.shape[-2], x.shape[-1])
    base = _compute(model, inputs, methods, opts)
    first = next(iter(base.results.values()))
    assert first.classes is not None
    fixed = replace(opts, layers=list(base.layers), targets=[int(c) for c in first.classes])
    passes = [
        base.results if aug.identity else _compute(model, Inputs(aug.apply(x), None), methods, fixed).results
        for aug in opts.augment
    ]
    return {
        name: _averaged(e, [p[name] for p in passes], opts.augment, size, inputs.images)
        for name, e in base.results.items()
    }


def _averaged(
    base: Explanation,
    passes: Sequence[Explanation],
    augs: Sequence[Augment],
    size: tuple[int, int],
    images: list[Image.Image] | None,
) -> Explanation:
    """The first pass's explanation with its maps replaced by the mean of every pass's maps, warped back."""
    fused = [aug.invert(e.maps, size) for aug, e in zip(augs, passes, strict=True)]
    per_layer = {
        n: average([aug.invert(e.layer_maps[n], size) for aug, e in zip(augs, passes, strict=True)])
        for n in base.layer_maps
    }
    return replace(base, maps=average(fused), layer_maps=per_layer, images=images)


# ------------------------------------------------------------------------------------------------ helpers


def _resolve(plan: TargetPlan, output: Tensor) -> Targets:
    """The plan on the (detached) model output: class indices, or a target chosen per image, or the callable."""
    labels = plan.labels
    if labels is None and output.dim() == 2 and output.shape[1] == 1000:
        labels = imagenet_labels()
    if plan.task != "classification":
        chosen = default_targets(
            output, plan.task, category=plan.category, labels=labels, threshold=plan.threshold
        )
        return Targets(None, chosen, labels, chosen.chosen)
    if plan.labels is not None and output.dim() == 2 and len(plan.labels) < output.shape[1]:
        raise CamkitError(
            f"{len(plan.labels)} labels for a model with {output.shape[1]} outputs: give one name per class"
        )
    classes = resolve_classes(plan.spec, output, labels)
    fn = plan.spec if classes is None and callable(plan.spec) else None
    return Targets(classes, fn, labels)


def _gradient(features: FeatureMaps, layer: str, target: int) -> Tensor:
    grads = features.gradients[layer]
    return (grads[target] if isinstance(grads, list) else grads).float()


def _unfold(features: FeatureMaps, layer: str, raw: Tensor) -> Tensor:
    """A map of a 3-D layer, computed with the frames stacked along the height, gets its time axis back."""
    layout = features.layouts.get(layer)
    return layout.unfold(raw) if layout is not None else raw


def _check_clip_methods(x: Tensor, methods: Sequence[Method]) -> None:
    """Clips Tensor[B, C, T, H, W] are explained by the layer methods only."""
    if x.dim() != 5:
        return
    other = [m.name for m in methods if not m.clips]
    if other:
        raise CamkitError(
            f"{', '.join(other)} cannot explain a clip Tensor[B, C, T, H, W] (attention, own-pass and the "
            "sharper perturbation methods work on images); use a layer method (gradcam, gradcam++, xgradcam, "
            "hirescam, layercam, eigencam, cam) or scorecam, sscam, iscam, ablationcam"
        )


def _all_finite(t: Tensor) -> bool:
    """Whether every value of ``t`` is finite: its sum first (a NaN or an infinity anywhere makes it non-finite, one
    reduction instead of a mask as large as ``t``), the value-by-value test only when the sum is not finite (finite
    values whose sum overflows)."""
    if not t.is_floating_point() and not t.is_complex():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: Tensor, batch: int, what: str, hint: str, batch_dim: int = 0) -> None:
    """Raise a ValueError naming the images (indices in the batch) for which ``t`` holds NaN or Inf.

    ``batch_dim`` is the axis of ``t`` that runs over the images; a tensor without such an axis is named whole.
    """
    if _all_finite(t):
        return
    finite = torch.isfinite(t)
    if t.dim() > 0 and t.shape[batch_dim] == batch:
        ok = finite.movedim(batch_dim, 0).reshape(batch, -1).all(dim=1)
        bad = [int(i) for i in (~ok).nonzero()[:, 0]]
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        where = f"image(s) {shown} (indices in the batch of {batch})"
    else:
        where = f"the batch of {batch}"
    kinds = " and ".join(
        k for k, present in (("NaN", bool(t.isnan().any())), ("Inf", bool(t.isinf().any()))) if present
    )
    raise CamkitError(
        f"{what} is not finite ({kinds}) for {where}: nothing can be explained there"
        + (f"; {hint}" if hint else "")
    )


def _check_tensor(model: nn.Module, images: Tensor) -> Tensor:
    """A user's image tensor, checked: [B, C, H, W] (or [C, H, W]), float, the model's channels, finite; for a
    model of 3-D convolutions a clip [B, C, T, H, W]."""
    x = images.unsqueeze(0) if images.dim() == 3 else images
    conv3d = [m for m in model.modules() if isinstance(m, nn.Conv3d)] if x.dim() == 5 else []
    if x.dim() == 5 and conv3d:
        if x.shape[1] != conv3d[0].in_channels:
            raise CamkitError(
                f"the clip tensor has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the model's first 3-D "
                f"convolution expects {conv3d[0].in_channels}; a clip is Tensor[B, C, T, H, W] (channels before "
                "time: permute a [B, T, C, H, W] clip with x.permute(0, 2, 1, 3, 4))"
            )
    elif x.dim() != 4:
        clip = " or, for a model of 3-D convolutions, a clip [B, C, T, H, W]" if x.dim() == 5 else ""
        raise CamkitError(
            f"an image tensor must be [B, C, H, W] or [C, H, W]{clip}, got shape {tuple(images.shape)}"
            + (" (this model has no nn.Conv3d)" if x.dim() == 5 else "")
        )
    if not x.is_floating_point():
        raise CamkitError(
            f"the image tensor has dtype {x.dtype}; pass a normalised float tensor, or pass PIL images / "
            "paths and camkit will preprocess them"
        )
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and x.shape[1] != conv.in_channels:
        raise CamkitError(
            f"the image tensor has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the model's first "
            f"convolution expects {conv.in_channels}; for a grayscale image repeat it to 3 channels, for RGBA "
            "drop alpha, or pass the image file and camkit converts it"
        )
    if not _all_finite(x):
        raise CamkitError("the image tensor contains NaN or infinite values")
    return x


def explain(
    model: nn.Module,
    images: ImageInput,
    method: str = "gradcam",
    layers: LayerSpec = "auto",
    targets: TargetSpec = None,
    *,
    preprocess: Preprocess | None = None,
    labels: Sequence[str] | None = None,
    fusion: str | None = None,
    relu: bool = True,
    output: OutputSpec = None,
    reshape: Reshape | None = None,
    perturbation: PerturbationOptions | None = None,
    eigen_smooth: bool = False,
    augment: AugmentSpec = None,
    accelerate: bool = True,
) -> Explanation:
    """Explain a model's decision on a batch of images with one CAM method.

    Args:
        model: a PyTorch model in eval mode, or a Keras 3 model on the torch backend (:mod:`camkit.adapters.keras`). It
            comes back exactly as it was (no hooks, same grad mode, ``requires_grad``, ``.grad`` and mode), also
            when an error is raised.
        images: a normalised Tensor[B, 3, H, W] (or [3, H, W]), or PIL images / file paths (preprocessed with
            ``preprocess``, default: the model's own config or ImageNet mean/std at 224x224). A model of
            ``nn.Conv3d`` also takes a clip Tensor[B, 3, T, H, W] (maps Tensor[B, T, H, W], :mod:`camkit.adapters.video`).
        method: a method name (see ``camkit methods`` / :func:`camkit.methods.method_names`).
        layers: ``"auto"``, a dotted name (``"layer4"``), names separated by commas, a module, or a list.
        targets: None (top-1), a class index or name, a list (one per image), ``TopK(k)``, or a callable
            ``f(output) -> Tensor[B]`` (or ``Tensor[B, k]``: k maps per image, e.g.
            ``MultiLabelTarget([...], separate=True)``, ``EachTarget([...])``). k targets per image share one
            forward and one batched backward. torchvision segmentation / detection models: None or a class is turned
            into a target per image (:func:`camkit.core.tasks.default_targets`, recorded in ``Explanation.chosen``).
        preprocess: how to turn PIL images into the model input.
        labels: class names (default: ImageNet's for 1000-class outputs).
        fusion: how several layers are fused: ``"max"`` (default; for LayerCAM with tanh-scaled shallow
            layers as in its paper) or ``"mean"`` (pytorch-grad-cam's choice).
        relu: apply the final ReLU (default). ``False`` keeps the signed map (e.g. CAM as in its paper).
        output: which part of a non-tensor model output holds the scores: an index, a key, an attribute name,
            or a function (default: tensors as is, ``.logits``, ``["logits"]``, ``["out"]``, the first item, or
            a detection model's list of dicts packed by :func:`camkit.core.tasks.pack_detections`).
        reshape: ``f(Tensor) -> Tensor[B, K, h, w]`` applied to each target layer's activation and gradient instead
            of camkit's inference of token / channels-last layouts (:mod:`camkit.core.tokens`).
        perturbation: settings of Score-CAM, SS-CAM, IS-CAM and Ablation-CAM (batch size, the
            pytorch-grad-cam variants, top-k channels, progress callback): see
            :class:`camkit.methods.perturbation.PerturbationOptions`. Its ``compile`` also compiles the part of
            the gradient methods' shared capture before the target layers (:mod:`camkit.core.split`).
        eigen_smooth: replace each layer's map by the first principal component of its per-channel terms
            (w_k A_k, g_k A_k, ...), as pytorch-grad-cam's ``eigen_smooth``; layer and perturbation methods whose
            map is a sum over channels (a ``ValueError`` for the others).
        augment: test-time augmentation (:mod:`camkit.core.augment`): ``True`` / ``"gradcam"`` (pytorch-grad-cam's
            ``aug_smooth``: flip x multiply by 0.9, 1, 1.1), ``"flip"``, or a list of :class:`camkit.Augment`;
            the maps of the augmented inputs are warped back and averaged (``raw``, scores and classes are the
            original input's). One class per image (not ``TopK`` nor a callable target); classifiers only.
        accelerate: run the shared capture (the forward, and the backward to the target layers) on a prepared
            copy of the model: BatchNorms folded into their convolutions, channels-last on CPU; checked once per
            model and input shape against the model as given, which runs it instead (with one ``AccelWarning``)
            where they differ (:mod:`camkit.core.prepared`). False: the model as given runs it.
    """
    chosen = get_method(method)
    opts = ExplainOptions.build(
        layers,
        targets,
        preprocess=preprocess,
        labels=labels,
        fusion=fusion,
        relu=relu,
        output=output,
        reshape=reshape,
        perturbation=perturbation,
        eigen_smooth=eigen_smooth,
        augment=augment,
        accelerate=accelerate,
    )
    return _explain_all(model, images, [chosen], opts)[chosen.name]


def compare(
    model: nn.Module,
    images: ImageInput,
    methods: Sequence[str] = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"),
    layers: LayerSpec = "auto",
    targets: TargetSpec = None,
    *,
    preprocess: Preprocess | None = None,
    labels: Sequence[str] | None = None,
    fusion: str | None = None,
    relu: bool = True,
    output: OutputSpec = None,
    reshape: Reshape | None = None,
    perturbation: PerturbationOptions | None = None,
    eigen_smooth: bool = False,
    augment: AugmentSpec = None,
    accelerate: bool = True,
) -> dict[str, Explanation]:
    """Several methods at once: one forward and one backward shared by all (same arguments as :func:`explain`).

    Returns:
        method name -> :class:`Explanation`, in the order given.
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    resolved = _distinct(methods)
    if not resolved:
        raise CamkitError("no method given")
    opts = ExplainOptions.build(
        layers,
        targets,
        preprocess=preprocess,
        labels=labels,
        fusion=fusion,
        relu=relu,
        output=output,
        reshape=reshape,
        perturbation=perturbation,
        eigen_smooth=eigen_smooth,
        augment=augment,
        accelerate=accelerate,
    )
    return _explain_all(model, images, resolved, opts)


def _distinct(methods: Sequence[str | Method]) -> list[Method]:
    """The methods of a :func:`compare`, in order; a name given twice (or by an alias) counts once, two different
    methods (e.g. two configurations) under one name are refused, since the results are keyed by name."""
    out: dict[str, Method] = {}
    for given in methods:
        m = get_method(given)
        seen = out.get(m.name)
        if seen is not None and seen is not m and seen != m:
            raise CamkitError(
                f"two different methods are named {m.name!r}: results are keyed by method name; give each "
                "configuration its own name (e.g. dataclasses.replace(method, name=...)), or compare them in "
                "separate calls"
            )
        out.setdefault(m.name, m)
    return list(out.values())
