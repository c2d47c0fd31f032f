"""The public entry: :func:`explain` (one method) and :func:`compare` (several methods, one shared pass).

One call runs nine stages, each a function from values to values, in this order:

1. inputs (:func:`_inputs`): images, paths or a tensor -> the normalised batch on the model's device;
2. layers (:func:`_layers`): the layer spec -> ``{name: module}`` (:mod:`camkit.layers`);
3. targets (:func:`_targets`): what to explain -> a :class:`TargetPlan` (:mod:`camkit.targets`,
   :mod:`camkit.tasks`);
4. capture (:func:`_capture`): one forward (and one backward when a method needs dS/dA) with the plan resolved
   on the model's output -> :class:`camkit.capture.Captured` and :class:`Targets` (:mod:`camkit.capture`);
5. token layout (:func:`_token_layout`): token and channels-last outputs -> Tensor[B, K, h, w]
   (:mod:`camkit.tokens`);
6. method weights (:func:`_method_weights`): per layer, the channel weights of the method's kind: classifier rows
   (CAM, :mod:`camkit.methods.cam`), perturbation weights (:mod:`camkit.methods.engine`), none (gradient and
   projection formulas read A and dS/dA themselves);
7. maps (:func:`_maps`): the signed map of each layer, or the attention method's own pass;
8. post-processing (:func:`_postprocess`): ReLU, upsampling, min-max, fusion of layers (:mod:`camkit.postprocess`);
9. the :class:`~camkit.explanation.Explanation` (:func:`_explanation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.capture import Captured, LayerCapture, check_eval
from camkit.explanation import Explanation
from camkit.io import Preprocess, imagenet_labels, load_image, to_rgb
from camkit.layers import LayerSpec, resolve_layers
from camkit.methods import (
    AttentionInput,
    AttentionMethod,
    LayerMethod,
    Method,
    MethodInput,
    PassMethod,
    PerturbationMethod,
    get_method,
)
from camkit.methods.cam import classifier_weights
from camkit.methods.engine import PerturbationContext, PerturbationOptions, Progress
from camkit.outputs import OutputSpec, model_device, output_fn
from camkit.postprocess import fuse, normalize, upsample
from camkit.targets import TargetSpec, resolve_classes, score_fn
from camkit.tasks import ChosenTarget, default_targets, model_task, score_threshold
from camkit.tokens import FeatureMaps, Reshape, to_spatial, unwrap

__all__ = ["ImageInput", "OutputSpec", "TargetPlan", "Targets", "compare", "explain"]

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
    perturbation: PerturbationOptions
    progress: Progress

    @property
    def n_targets(self) -> int:
        classes = self.targets.classes
        return 1 if classes is None or classes.dim() == 1 else classes.shape[1]


@dataclass(frozen=True)
class Maps:
    """Stage 8's result: the normalised map of each layer and their fusion, at input size."""

    layer_maps: dict[str, Tensor]
    fused: Tensor


# ------------------------------------------------------------------------------------------------ stages


def _inputs(model: nn.Module, images: ImageInput, preprocess: Preprocess | None) -> Inputs:
    """1. Check the model is in eval mode; images / paths / a tensor -> the batch on the model's device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (in eval mode), got {type(model).__name__}")
    check_eval(model, stacklevel=6)
    if isinstance(images, Tensor):
        x, pils = _check_tensor(model, images), None
    else:
        items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        if not items:
            raise ValueError("no images given")
        pils = [to_rgb(it) if isinstance(it, Image.Image) else load_image(it) for it in items]
        x = (preprocess or Preprocess.for_model(model))(pils)
    device = model_device(model)
    return Inputs(x if x.device == device else x.to(device), pils)


def _layers(model: nn.Module, spec: LayerSpec, x: Tensor) -> dict[str, nn.Module]:
    """2. The layer spec -> ``{dotted name: module}``."""
    return resolve_layers(model, spec, x)


def _targets(
    model: nn.Module, spec: TargetSpec, labels: Sequence[str] | None, methods: Sequence[Method]
) -> TargetPlan:
    """3. What to explain. torchvision segmentation / detection models with no target or a class get one per image."""
    if callable(spec) and any(isinstance(m, LayerMethod) and m.needs_classifier for m in methods):
        raise ValueError(
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
) -> tuple[Captured, Targets]:
    """4. One forward (and one backward for ``need_grad``); the plan is resolved on the output in between."""
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
    """6. Per layer, channel weights Tensor[B, K] per target, by the method's kind: CAM's classifier rows, a
    perturbation method's weights; none for formulas that read A and dS/dA themselves, nor for attention."""
    if isinstance(method, PerturbationMethod) or (
        isinstance(method, LayerMethod) and method.needs_classifier
    ):
        return {layer: _layer_weights(method, shared, layer) for layer in shared.captured.order}
    return {}


def _layer_weights(method: Method, shared: Shared, layer: str) -> list[Tensor]:
    a = shared.features.activations[layer]
    classes = shared.targets.classes
    if isinstance(method, LayerMethod) and method.needs_classifier:
        if classes is None:
            raise ValueError(f"{method.name} explains a class: give class targets (an index, a name or TopK)")
        w = classifier_weights(shared.model, a, shared.captured.output, layer)
        return [w[classes if classes.dim() == 1 else classes[:, t]] for t in range(shared.n_targets)]
    if isinstance(method, PerturbationMethod):
        ctx = PerturbationContext(
            model=shared.model,
            x=shared.x,
            layer=shared.layers[layer],
            layer_name=layer,
            calls=shared.captured.calls.get(layer, 1),
            activations=a,
            output=shared.captured.output,
            classes=classes,
            target_fn=shared.targets.fn if classes is None else None,
            output_fn=shared.output_fn,
            options=shared.perturbation,
            progress=shared.progress,
        )
        w = method.weights(ctx)  # [B, T, K]
        return [w[:, t] for t in range(shared.n_targets)]
    raise TypeError(f"{method.name} ({method.family}) has no channel weights")


def _maps(method: Method, shared: Shared, weights: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """7. The signed map of each layer, shallow to deep (Tensor[B, h, w], [B, k, h, w] for k targets per image);
    an attention method: its own map from its own pass."""
    if isinstance(method, (AttentionMethod, PassMethod)):
        tg = shared.targets
        return {
            method.name: method.run(
                AttentionInput(shared.model, shared.x, shared.output_fn, tg.classes, tg.fn, shared.layers)
            )
        }
    raw = {}
    for layer in shared.captured.order:
        a = shared.features.activations[layer].float()
        w = weights.get(layer)
        per_target = []
        for t in range(shared.n_targets):
            if isinstance(method, PerturbationMethod):
                assert w is not None
                per_target.append(torch.einsum("bk,bkhw->bhw", w[t].float(), a))
                continue
            assert isinstance(method, LayerMethod)
            g = _gradient(shared.features, layer, t) if method.needs_grad else None
            per_target.append(method.fn(MethodInput(a, g, None if w is None else w[t])))
        multi = shared.targets.classes is not None and shared.targets.classes.dim() == 2
        raw[layer] = torch.stack(per_target, dim=1) if multi else per_target[0]
    return raw


def _postprocess(
    method: Method, raw: dict[str, Tensor], size: tuple[int, int], relu: bool, fusion: str | None
) -> Maps:
    """8. ReLU, upsampling to the input size and min-max per layer, then the fusion of the layers."""
    layer_maps = {name: normalize(upsample(torch.relu(r) if relu else r, size)) for name, r in raw.items()}
    shallow_tanh = 2.0 if (method.name == "layercam" and fusion is None) else None  # LayerCAM's paper
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
    )


def _compute(
    model: nn.Module,
    images: ImageInput,
    methods: Sequence[Method],
    layers: LayerSpec,
    targets: TargetSpec,
    preprocess: Preprocess | None,
    labels: Sequence[str] | None,
    fusion: str | None,
    relu: bool,
    output: OutputSpec,
    reshape: Reshape | None = None,
    perturbation: PerturbationOptions | None = None,
) -> dict[str, Explanation]:
    model = unwrap(model)  # DataParallel / torch.compile: hooks go on the eager module that holds the weights
    read = output_fn(output)
    inputs = _inputs(model, images, preprocess)
    modules = _layers(model, layers, inputs.x)
    plan = _targets(model, targets, labels, methods)
    need_grad = any(m.needs_grad for m in methods)
    cap, resolved = _capture(model, inputs.x, modules, plan, need_grad, read)
    features = _token_layout(model, modules, cap, inputs.x, reshape)
    options = perturbation or PerturbationOptions()
    shared = Shared(
        model, inputs.x, modules, cap, features, resolved, read, options, Progress(options.progress)
    )
    size = (inputs.x.shape[-2], inputs.x.shape[-1])
    results = {}
    for method in methods:
        weights = _method_weights(method, shared)
        raw = _maps(method, shared, weights)
        for layer, r in raw.items():
            _check_finite(
                r, r.shape[0], f"the {method.name} map of {layer!r}", "its gradients or weights overflowed"
            )
        maps = _postprocess(method, raw, size, relu, fusion)
        for layer, m in {**maps.layer_maps, "(fused)": maps.fused}.items():
            _check_finite(m, m.shape[0], f"the post-processed {method.name} map of {layer!r}", "")
        results[method.name] = _explanation(method, raw, maps, cap, resolved, inputs)
    return results


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
        raise ValueError(
            f"{len(plan.labels)} labels for a model with {output.shape[1]} outputs: give one name per class"
        )
    classes = resolve_classes(plan.spec, output, labels)
    fn = plan.spec if classes is None and callable(plan.spec) else None
    return Targets(classes, fn, labels)


def _gradient(features: FeatureMaps, layer: str, target: int) -> Tensor:
    grads = features.gradients[layer]
    return (grads[target] if isinstance(grads, list) else grads).float()


def _check_finite(t: Tensor, batch: int, what: str, hint: str, batch_dim: int = 0) -> None:
    """Raise a ValueError naming the images (indices in the batch) for which ``t`` holds NaN or Inf.

    ``batch_dim`` is the axis of ``t`` that runs over the images; a tensor without such an axis is named whole.
    """
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
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
    raise ValueError(
        f"{what} is not finite ({kinds}) for {where}: nothing can be explained there"
        + (f"; {hint}" if hint else "")
    )


def _check_tensor(model: nn.Module, images: Tensor) -> Tensor:
    """A user's image tensor, checked: [B, C, H, W] (or [C, H, W]), float, the model's channels, finite."""
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4:
        raise ValueError(
            f"an image tensor must be [B, C, H, W] or [C, H, W], got shape {tuple(images.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"the image tensor has dtype {x.dtype}; pass a normalised float tensor, or pass PIL images / "
            "paths and camkit will preprocess them"
        )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and x.shape[1] != convs[0].in_channels:
        raise ValueError(
            f"the image tensor has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the model's first "
            f"convolution expects {convs[0].in_channels}; for a grayscale image repeat it to 3 channels, for RGBA "
            "drop alpha, or pass the image file and camkit converts it"
        )
    if not torch.isfinite(x).all():
        raise ValueError("the image tensor contains NaN or infinite values")
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
) -> Explanation:
    """Explain a model's decision on a batch of images with one CAM method.

    Args:
        model: a PyTorch model in eval mode. It comes back exactly as it was (no hooks, same grad mode,
            ``requires_grad``, ``.grad`` and mode), also when an error is raised.
        images: a normalised Tensor[B, 3, H, W] (or [3, H, W]), or PIL images / file paths (preprocessed with
            ``preprocess``, default: the model's own config or ImageNet mean/std at 224x224).
        method: a method name (see ``camkit methods`` / :func:`camkit.methods.method_names`).
        layers: ``"auto"``, a dotted name (``"layer4"``), names separated by commas, a module, or a list.
        targets: None (top-1), a class index or name, a list (one per image), ``TopK(k)``, or a callable
            ``f(output) -> Tensor[B]``. torchvision segmentation / detection models: None or a class is turned
            into a target per image (:func:`camkit.tasks.default_targets`, recorded in ``Explanation.chosen``).
        preprocess: how to turn PIL images into the model input.
        labels: class names (default: ImageNet's for 1000-class outputs).
        fusion: how several layers are fused: ``"max"`` (default; for LayerCAM with tanh-scaled shallow
            layers as in its paper) or ``"mean"`` (pytorch-grad-cam's choice).
        relu: apply the final ReLU (default). ``False`` keeps the signed map (e.g. CAM as in its paper).
        output: which part of a non-tensor model output holds the scores: an index, a key, an attribute name,
            or a function (default: tensors as is, ``.logits``, ``["logits"]``, ``["out"]``, the first item, or
            a detection model's list of dicts packed by :func:`camkit.tasks.pack_detections`).
        reshape: ``f(Tensor) -> Tensor[B, K, h, w]`` applied to each target layer's activation and gradient instead
            of camkit's inference of token / channels-last layouts (:mod:`camkit.tokens`).
        perturbation: settings of Score-CAM, SS-CAM, IS-CAM and Ablation-CAM (batch size, the
            pytorch-grad-cam variants, top-k channels, progress callback): see
            :class:`camkit.methods.perturbation.PerturbationOptions`.
    """
    chosen = get_method(method)
    return _compute(
        model,
        images,
        [chosen],
        layers,
        targets,
        preprocess,
        labels,
        fusion,
        relu,
        output,
        reshape,
        perturbation,
    )[chosen.name]


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
) -> dict[str, Explanation]:
    """Several methods at once: one forward and one backward shared by all (same arguments as :func:`explain`).

    Returns:
        method name -> :class:`Explanation`, in the order given.
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    resolved = list({get_method(m).name: get_method(m) for m in methods}.values())
    if not resolved:
        raise ValueError("no method given")
    return _compute(
        model,
        images,
        resolved,
        layers,
        targets,
        preprocess,
        labels,
        fusion,
        relu,
        output,
        reshape,
        perturbation,
    )
