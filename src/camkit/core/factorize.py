"""Deep Feature Factorization (Collins, Achanta & Süsstrunk, ECCV 2018) as an entry point: :func:`factorize`.

Stages 1-2 and 4-5 of :mod:`camkit.core.pipeline` (inputs, layers, one capture forward, the token layout), then a
non-negative matrix factorisation of the layer's activations (:func:`camkit.methods.projection.nmf`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from camkit.adapters import Preprocess
from camkit.core.capture import capture
from camkit.core.layers import LayerSpec
from camkit.core.outputs import OutputSpec, output_fn
from camkit.core.pipeline import ImageInput, enter_model, prepare
from camkit.core.postprocess import normalize, upsample
from camkit.core.tokens import Reshape, to_spatial
from camkit.errors import CamkitError
from camkit.methods.head import classifier_weights
from camkit.methods.projection import Factorization, nmf

__all__ = ["Factorization", "factorize"]


def _head_scores(model: nn.Module, concepts: Tensor, a: Tensor, output: Tensor) -> Tensor | None:
    """The classifier (GAP + Linear, or 1x1 conv + GAP) applied to concept vectors Tensor[n, K], or None."""
    try:
        w = classifier_weights(model, a, output, "")
    except ValueError:
        return None
    k = a.shape[1]
    head = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.in_features == k)
        or (isinstance(m, nn.Conv2d) and m.in_channels == k)
    ]
    bias = next(
        (
            m.bias
            for m in reversed(head)
            if m.weight.flatten(1).shape == w.flatten(1).shape and m.bias is not None
        ),
        None,
    )
    scores = concepts.double() @ w.flatten(1).double().T
    return scores + bias.detach().double() if bias is not None else scores


def factorize(
    model: nn.Module,
    images: ImageInput,
    layer: LayerSpec = "auto",
    n_concepts: int = 5,
    *,
    preprocess: Preprocess | None = None,
    classifier: nn.Module | None = None,
    seed: int = 0,
    iterations: int = 500,
    output: OutputSpec = None,
    reshape: Reshape | None = None,
) -> Factorization:
    """Deep Feature Factorization (Collins et al., ECCV 2018): ``n_concepts`` concepts shared by the images.

    The layer's activations of the whole batch, A^T = [K, B*h*w], shifted per channel to be non-negative (its
    minimum subtracted, as pytorch-grad-cam does), are factorised by NMF (:func:`camkit.methods.projection.nmf`, torch, seeded) into concept
    vectors W [K, n] and heatmaps H [n, B*h*w]. One forward, no backward; the model is not modified.

    Args:
        model: a model in eval mode.
        images: as for :func:`camkit.explain` (a normalised tensor, PIL images or paths).
        layer: one target layer (``"auto"``, a name or a module); token and channels-last layouts are read as by
            :func:`camkit.explain`.
        n_concepts: the number of concepts n (>= 1).
        preprocess: how PIL images become the model input.
        classifier: a module mapping concept vectors Tensor[n, K] to class logits (default: the layer's own
            GAP + Linear / 1x1-conv head, found and checked as for CAM; None when there is none).
        seed: seed of the NMF's random start (same seed, same concepts).
        iterations: at most this many NMF updates.
        output: which part of a non-tensor model output holds the scores (as for :func:`camkit.explain`).
        reshape: ``f(Tensor) -> Tensor[B, K, h, w]`` instead of camkit's layout inference.

    Returns:
        a :class:`Factorization`: the maps, the raw heatmaps, the concept vectors and their class scores.
    """
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, int) or n_concepts < 1:
        raise CamkitError(f"n_concepts must be an int >= 1, got {n_concepts!r}")
    if classifier is not None and not callable(classifier):
        raise TypeError(
            f"classifier must be a module Tensor[n, K] -> logits, got {type(classifier).__name__}"
        )
    model = enter_model(model, stacklevel=2)
    inputs, modules = prepare(model, images, layer, preprocess)
    if len(modules) != 1:
        raise CamkitError(f"factorize takes one target layer, got {list(modules)}")
    name = next(iter(modules))
    cap = capture(model, inputs.x, modules, None, output_fn(output))
    size = (inputs.x.shape[-2], inputs.x.shape[-1])
    a = to_spatial(cap.activations, {}, model, modules, size, reshape).activations[name].detach()
    b, k, h, w = a.shape
    flat = torch.nan_to_num(a.double()).transpose(0, 1).reshape(k, b * h * w)
    offset = flat.amin(dim=1, keepdim=True)
    wm, hm = nmf(flat - offset, n_concepts, seed=seed, iterations=iterations)
    concepts = (wm + offset).T.contiguous()  # [n, K]
    raw = hm.reshape(n_concepts, b, h, w).transpose(0, 1).float()
    if classifier is not None:
        with torch.no_grad():
            scores: Tensor | None = classifier(concepts.to(a.dtype)).double()
    else:
        scores = _head_scores(model, concepts, a.float(), cap.output.float())
    up = upsample(raw.reshape(b * n_concepts, h, w), size)
    maps = normalize(up).reshape(b, n_concepts, *size)
    return Factorization(
        maps=maps,
        raw=raw,
        concepts=concepts.float(),
        scores=None if scores is None else scores.float(),
        layer=name,
    )
