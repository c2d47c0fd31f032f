"""The public entry: :func:`explain` (one method) and :func:`compare` (several methods, one shared pass)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from camkit.capture import capture
from camkit.explanation import Explanation
from camkit.io import Preprocess, imagenet_labels, load_image, to_rgb
from camkit.layers import LayerSpec, resolve_layers
from camkit.methods import AttentionMethod, LayerMethod, Method, MethodInput, PerturbationMethod, get_method
from camkit.methods.engine import PerturbationContext, PerturbationOptions, Progress
from camkit.postprocess import fuse, normalize, upsample
from camkit.targets import TargetSpec, make_score_fn, resolve_classes
from camkit.tasks import PerImageTargets, default_targets, model_task, score_threshold
from camkit.tokens import Reshape, to_spatial, unwrap

__all__ = ["ImageInput", "compare", "explain"]

ImageInput = Tensor | Image.Image | str | Path | Sequence[Image.Image | str | Path]
OutputSpec = int | str | Callable[[object], Tensor] | None


def _output_fn(spec: OutputSpec) -> Callable[[object], Tensor]:
    def pick(out: object) -> Tensor:
        if spec is not None and callable(spec):
            return spec(out)
        if isinstance(out, Tensor) and spec is None:
            return out
        if spec is not None:
            if isinstance(out, Mapping):
                return out[spec]  # type: ignore[index]
            if isinstance(spec, str):
                return getattr(out, spec)  # type: ignore[no-any-return]
            return out[spec]  # type: ignore[index,call-overload,no-any-return]
        if isinstance(out, Mapping):
            for key in ("logits", "out"):
                if key in out:
                    return out[key]  # type: ignore[no-any-return]
        if hasattr(out, "logits") and isinstance(out.logits, Tensor):
            return out.logits
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return out[0]
        from camkit.tasks import is_detection_output, pack_detections

        if is_detection_output(out):
            return pack_detections(out)  # type: ignore[arg-type]
        raise TypeError(
            f"the model returned {type(out).__name__}; pass output=<index, key or function> to say which "
            "element holds the scores to explain"
        )

    return pick


def _check_eval(model: nn.Module) -> None:
    """Refuse a model in training mode: the root, or any module whose output depends on the mode."""
    mode_dependent = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
    training = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m.training and (m is model or isinstance(m, mode_dependent) or "DropPath" in type(m).__name__)
    ]
    if training:
        raise ValueError(
            f"the model is in training mode ({len(training)} module(s), e.g. {training[:3]}): BatchNorm and "
            "Dropout would make each map depend on the rest of the batch and update running statistics. "
            "Call model.eval() first."
        )


def _expected_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _prepare(
    model: nn.Module, images: ImageInput, preprocess: Preprocess | None
) -> tuple[Tensor, list[Image.Image] | None]:
    pils: list[Image.Image] | None = None
    if isinstance(images, Tensor):
        x = images
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ValueError(
                f"an image tensor must be [B, C, H, W] or [C, H, W], got shape {tuple(images.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"the image tensor has dtype {x.dtype}; pass a normalised float tensor, or pass PIL images / "
                "paths and camkit will preprocess them"
            )
        channels = _expected_channels(model)
        if channels is not None and x.shape[1] != channels:
            raise ValueError(
                f"the image tensor has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), the model's first "
                f"convolution expects {channels}; for a grayscale image repeat it to 3 channels, for RGBA drop "
                "alpha, or pass the image file and camkit converts it"
            )
        if not torch.isfinite(x).all():
            raise ValueError("the image tensor contains NaN or infinite values")
    else:
        items = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        if not items:
            raise ValueError("no images given")
        pils = [to_rgb(it) if isinstance(it, Image.Image) else load_image(it) for it in items]
        pre = preprocess or Preprocess.for_model(model)
        x = pre(pils)
    from camkit.metrics._common import model_device  # here: camkit.metrics imports camkit.localize -> explain

    device = model_device(model)
    if x.device != device:
        x = x.to(device)
    return x, pils


def _default_labels(output: Tensor, labels: Sequence[str] | None) -> Sequence[str] | None:
    if labels is not None:
        return labels
    if output.dim() == 2 and output.shape[1] == 1000:
        return imagenet_labels()
    return None


def _classifier_weights(model: nn.Module, activation: Tensor, output: Tensor, layer: str) -> Tensor:
    """Weight matrix W[C, K] of the Linear layer that reads the global average of ``activation``.

    Checked numerically: the output must equal mean_hw(A) @ W.T + b, else the head is not GAP+Linear.
    """
    k = activation.shape[1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == k]
    why = ""
    if linears:
        fc = linears[-1]
        with torch.no_grad():
            pooled = activation.float().mean(dim=(2, 3))
            expected = pooled @ fc.weight.float().T
            if fc.bias is not None:
                expected = expected + fc.bias.float()
        if expected.shape == output.shape and torch.allclose(
            expected, output.float(), rtol=1e-3, atol=1e-3 * float(output.abs().max().clamp_min(1.0))
        ):
            return fc.weight.detach()
        why = " (the model output is not mean(A) @ W.T + b for its last matching Linear layer)"
    raise ValueError(
        f"CAM needs the target layer {layer!r} to be followed by global average pooling and a single Linear "
        f"layer{why}. Target the layer that global pooling reads (layers='auto'), or use 'gradcam', which "
        "equals CAM / (h*w) for such heads and works on any head."
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
    _check_eval(model)
    x, pils = _prepare(model, images, preprocess)
    layer_modules = resolve_layers(model, layers, x)
    need_grad = any(m.needs_grad for m in methods)
    if callable(targets) and any(isinstance(m, LayerMethod) and m.needs_classifier for m in methods):
        raise ValueError(
            "CAM explains a class (it reads the classifier's weights): give class targets, not a function"
        )
    store: dict[str, Tensor | None] = {}
    label_box: dict[str, Sequence[str] | None] = {}
    # torchvision segmentation / detection models: no target, a class index or a class name -> chosen per image
    by_task = targets is None or (isinstance(targets, (int, str)) and not isinstance(targets, bool))
    task = model_task(model) if by_task else "classification"
    auto: dict[str, PerImageTargets] = {}

    def pick(out: Tensor, lab: Sequence[str] | None) -> TargetSpec:
        """A torchvision segmentation / detection model and no target or a class: choose one per image."""
        if task == "classification":
            return targets
        auto["t"] = default_targets(
            out,
            task,
            category=targets,  # type: ignore[arg-type]
            labels=lab,
            threshold=score_threshold(model) if task == "detection" else None,
        )
        return auto["t"]

    def score_fn(out: Tensor) -> Tensor:
        label_box["labels"] = _default_labels(out, labels)
        return make_score_fn(pick(out, label_box["labels"]), label_box["labels"], store)(out)

    cap = capture(model, x, layer_modules, score_fn if need_grad else None, _output_fn(output))
    to_spatial(cap.activations, cap.gradients, model, layer_modules, (x.shape[-2], x.shape[-1]), reshape)
    out = cap.output
    if need_grad:
        classes = store.get("classes")
        assert cap.scores is not None
        scores = cap.scores if cap.scores.dim() == 1 else cap.scores.T
        lab = label_box.get("labels")
        targets = auto.get("t", targets)
    else:
        lab = _default_labels(out, labels)
        targets = pick(out, lab)
        classes = resolve_classes(targets, out, lab)
        if classes is None:
            assert callable(targets)
            scores = targets(out).detach()
        else:
            scores = out.gather(1, classes[:, None])[:, 0] if classes.dim() == 1 else out.gather(1, classes)
    probs = None
    class_labels: list[str] | list[list[str]] | None = None
    if classes is not None:
        p = torch.softmax(out.float(), dim=1)
        probs = p.gather(1, classes[:, None])[:, 0] if classes.dim() == 1 else p.gather(1, classes)
        if lab is not None:
            if classes.dim() == 1:
                class_labels = [lab[int(c)] for c in classes]
            else:
                class_labels = [[lab[int(c)] for c in row] for row in classes]
    multi = scores.dim() == 2
    n_targets = scores.shape[1] if scores.dim() == 2 else 1
    names = cap.order  # shallow to deep
    size = tuple(x.shape[-2:])

    progress = Progress(perturbation.progress if perturbation is not None else None)
    results: dict[str, Explanation] = {}
    for method in methods:
        raw: dict[str, Tensor] = {}
        layer_maps: dict[str, Tensor] = {}
        if isinstance(method, AttentionMethod):  # computes its own map in its own pass (attention rollout...)
            r = method.run(model, x, _output_fn(output), classes, targets)
            raw[method.name] = r
            layer_maps[method.name] = normalize(upsample(torch.relu(r) if relu else r, size))
        for name in names if not isinstance(method, AttentionMethod) else []:
            a = cap.activations[name]
            if a.dim() != 4:
                raise ValueError(
                    f"layer {name!r} outputs shape {tuple(a.shape)}; CNN methods need Tensor[B, K, h, w]. "
                    "Choose a convolutional layer (see `camkit layers MODEL`)"
                )
            weights = (
                _classifier_weights(model, a, out, name)
                if isinstance(method, LayerMethod) and method.needs_classifier
                else None
            )
            pweights = None
            if isinstance(method, PerturbationMethod):
                pweights = method.weights(
                    PerturbationContext(
                        model=model,
                        x=x,
                        layer=layer_modules[name],
                        layer_name=name,
                        calls=cap.calls.get(name, 1),
                        activations=a,
                        output=out,
                        classes=classes,
                        target_fn=targets if classes is None else None,  # type: ignore[arg-type]
                        output_fn=_output_fn(output),
                        options=perturbation or PerturbationOptions(),
                        progress=progress,
                    )
                )  # [B, T, K]
            per_target = []
            for t in range(n_targets):
                g = None
                if method.needs_grad:
                    grads = cap.gradients[name]
                    g = grads[t] if isinstance(grads, list) else grads
                cw = None
                if weights is not None:
                    assert classes is not None
                    cw = weights[classes if classes.dim() == 1 else classes[:, t]]
                if pweights is not None:
                    per_target.append(torch.einsum("bk,bkhw->bhw", pweights[:, t].float(), a.float()))
                    continue
                assert isinstance(method, LayerMethod)
                per_target.append(method.fn(MethodInput(a.float(), None if g is None else g.float(), cw)))
            r = torch.stack(per_target, dim=1) if multi else per_target[0]
            raw[name] = r
            m = torch.relu(r) if relu else r
            layer_maps[name] = normalize(upsample(m, size))
        mode = fusion or "max"
        shallow_tanh = 2.0 if (method.name == "layercam" and fusion is None) else None
        fused = fuse(list(layer_maps.values()), mode=mode, shallow_tanh=shallow_tanh)
        results[method.name] = Explanation(
            maps=fused,
            layer_maps=layer_maps,
            raw=raw,
            classes=classes,
            scores=scores,
            probs=probs,
            labels=class_labels,
            method=method.name,
            layers=list(layer_maps),
            images=pils,
            chosen=auto["t"].chosen if "t" in auto else None,
        )
    return results


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
