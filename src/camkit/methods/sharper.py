"""Methods that aim at sharper, better-localised or more faithful maps than Grad-CAM: Recipro-CAM, CAMERAS, Poly-CAM
(and its PCAM+ and PCAM+/- variants, and Poly-CAM matched), Group-CAM, Opti-CAM.

A: the activation of a target layer (Tensor[B, K, h, w]); G = dS/dA, the gradient of the explained score S (the
class logit, or a callable target's value); p_c the softmax probability of class c; up(.) bilinear resizing;
n(.) min-max normalisation to [0, 1].

* **Recipro-CAM** (Byun & Lee 2022, "Recipro-CAM: Fast gradient-free visual explanations for convolutional
  neural networks"): for every cell (i, j) of the last layer's h x w grid, the activation is kept at that cell
  only (A * M_ij, M_ij one-hot) and the layers *after* the target run on it; the map is
  S(i, j) = p_c(tail(A * M_ij)). Gradient-free: 1 forward, then h*w replays of the layers after the target, in
  one batch per image (the prefix is not run again). A callable target's value replaces p_c. ``mask="gaussian"``
  (the authors' code's other option) keeps the cell's channel values A[:, i, j] spread over its 3x3
  neighbourhood by the filter [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16 (cut at the grid's border) instead of the
  cell alone.
* **CAMERAS** (Jalwana, Akhtar, Bennamoun & Mian, CVPR 2021): activations and gradients are accumulated over
  up-scaled copies of the input, A_bar = mean_r up(A_r), G_bar = mean_r up(G_r), and the map is
  ReLU(sum_k A_bar_k * G_bar_k). The paper runs 10 resolutions from 224 px in steps of 100 px; camkit's
  ``cameras`` uses the input size x (1, 1.5, 2) (:data:`CAMERAS_SCALES`) and resizes every scale's A and G to
  the feature grid of the largest, to stay within a few forwards' cost (``cameras(scales=(...))`` sets them).
* **Poly-CAM** (Englebert, Cornu & De Vleeschouwer, ICPR 2022, "Poly-CAM: high resolution class activation map
  for convolutional neural networks"): a backward recursion from the deepest layer to shallower ones,
  S_L = M_L, S_l = up(S_{l+1}) * M_l / up(avgpool(M_l)), where the average pool goes down to the coarser layer's
  grid: the shallow map only redistributes the coarse map's mass inside each coarse cell, which gives the map
  the resolution of the shallowest layer. The paper's PCAM+/- variants weight each layer's channels with
  Score-CAM-like masked forwards (K forwards per layer); camkit's ``polycam`` uses LayerCAM's layer maps
  M_l = ReLU(sum_k ReLU(G_k) A_k) from the one shared backward. With one target layer (``layers="auto"``) it
  takes the last layer of each of the three deepest resolutions (``stages=3``); ``polycam(layers=(a,b,c))`` names
  its layers whatever the call's, and so do ``pcamp``, ``pcampm`` and ``polycam-matched``.
* **PCAM+ and PCAM+/-** (the paper's variants; ``pcamp`` (alias ``pcam+``) and ``pcampm`` (alias
  ``pcam±``)): the same recursion over layer maps
  M_l = ReLU(sum_k w_k A_k) whose channel weights come from masked forwards, as in the authors' code:
  H_k = up(clip((A_k - q_0.001(A_k)) / q_0.999(A_k), 0, 1)) (their normalisation: percentiles 0.1% and 99.9% over
  the grid, divided by the upper one, then bilinear to the input size); PCAM+: w_k = p_c(X * H_k); PCAM+/-:
  w_k = ReLU(p_c(X * H_k) + p_c(X) - p_c(X * (1 - H_k))). One forward per channel and layer (two for PCAM+/-):
  sum_l K_l forwards, about 2,200 on EfficientNet-Lite0's three layers (1280 + 672 + 240 channels). camkit's
  recursion divides by the average pool (``polycam_recursion``), the authors' code by a bilinear down- and
  up-sampling; the masked forwards run in batches of 64 under ``torch.inference_mode()``.
* **Group-CAM** (Zhang, Rao & Yang 2021, "Group-CAM: Group score-weighted visual explanations for deep
  convolutional networks", arXiv 2103.13859): alpha_k = mean_ij G_k (Grad-CAM's weights); the K channels are split
  into ``groups`` consecutive groups (32, the paper's), M_g = ReLU(sum_{k in g} alpha_k A_k); the values of M_g at
  or below its 70th percentile are set to 0 (denoising); M'_g = n(up(M_g)) at the input size (a constant M_g is
  skipped); s_g = p_c(X * M'_g + X~ * (1 - M'_g)) - p_c(X~), X~ = blur(X) a Gaussian blur (kernel 51, sigma 50, the
  paper's); map = ReLU(sum_g s_g M'_g) at the input's resolution. Cost per image: 1 forward + 1 backward, then the
  blurred input and one forward per group in one batch (about 35 forwards). ``groupcam(groups=, percentile=,
  kernel_size=, sigma=)`` sets the four settings (defaults 32, 70, 51, 50).
* **Poly-CAM, matched** (``polycam-matched``, camkit's own combination): Poly-CAM's map ranks the pixels, Grad-CAM
  gives the values. Poly-CAM's maps are peaky (a few high cells), so a map threshold cuts a smaller region than
  Grad-CAM's at the same threshold; per image, the value of rank r of Poly-CAM's map is replaced by the value of
  rank r of Grad-CAM's map ReLU(sum_k mean_ij(G_k) A_k) at the deepest layer, bilinearly resized to Poly-CAM's
  grid (:func:`match_values`, a monotone transform: the order of Poly-CAM's values is kept, ties in their order
  of appearance). Thresholds then cut regions of the size Grad-CAM's would. Both maps come from the same forward
  and backward, so it costs what ``polycam`` costs. Fixed before any measurement: the deepest of Poly-CAM's
  layers for Grad-CAM, bilinear resizing, exact rank matching.
* **Opti-CAM** (Zhang, Rebuffi, Avrithis et al. 2023, "Opti-CAM: optimizing saliency maps for
  interpretability"): channel weights w = softmax(u) optimised so that the input masked by its own map scores
  highest: u* = argmax_u y_c(X * n(up(sum_k softmax(u)_k A_k))), Adam (learning rate 0.1) from u = 0,
  ``PerturbationOptions(iterations=N)`` iterations (default 100, the paper's). Each iteration is one forward and
  one backward through the whole model.

Recipro-CAM, CAMERAS, the Poly-CAMs and Group-CAM compute their maps in their own passes (:class:`PassMethod`); Opti-CAM is a
:class:`~camkit.methods.registry.PerturbationMethod` (channel weights). They read the target layers through the
one layout reader (:func:`camkit.core.tokens.to_spatial`), so token and channels-last layers are read as for
every method (Recipro-CAM writes its masked maps back in the layer's own layout); they explain one target per
image. The model is left exactly as it was: every
hook is removed, grad mode restored, parameters' ``requires_grad`` and ``.grad`` untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camkit.core.capture import Captured, capture, hook_forward
from camkit.core.layers import describe_layers, pick_auto, resolve_layers
from camkit.core.postprocess import normalize, upsample
from camkit.core.targets import score_fn
from camkit.core.tokens import FeatureMaps, Layout, to_spatial
from camkit.errors import CamkitError
from camkit.methods.engine import PerturbationContext
from camkit.methods.passes import image_rows, scaled_size
from camkit.methods.perturbation import register_tunable
from camkit.methods.registry import PassInput, PassMethod, PerturbationMethod, configured_name, register

__all__ = [
    "CAMERAS_SCALES",
    "DENOISE_PERCENTILE",
    "GROUPCAM_GROUPS",
    "RECIPRO_MASKS",
    "blur",
    "cameras",
    "group_maps",
    "groupcam",
    "match_values",
    "opticam",
    "pcam_masks",
    "pcam_plus",
    "polycam",
    "polycam_matched",
    "polycam_recursion",
    "reciprocam",
    "stage_layers",
]

CAMERAS_SCALES: tuple[float, ...] = (1.0, 1.5, 2.0)
"""Input scale factors accumulated by ``cameras`` (the paper: 224 to 1124 px in 10 steps)."""


# ----------------------------------------------------------------------------------------------- helpers


def _one_target(inp: PassInput, name: str) -> Callable[[Tensor], Tensor]:
    if inp.classes is not None and inp.classes.dim() != 1:
        raise CamkitError(
            f"{name} explains one target per image; got {inp.classes.shape[1]} per image (TopK): explain each "
            "class in its own call"
        )
    return score_fn(inp.classes, inp.target_fn)


def _spatial(a: Tensor, layer: str, name: str) -> Tensor:
    if a.dim() != 4:
        raise CamkitError(
            f"{name} needs a target layer whose output is a feature map Tensor[B, K, h, w]; {layer!r} outputs "
            f"shape {tuple(a.shape)} (pick a convolutional layer, see `camkit layers MODEL`)"
        )
    return a


def _features(inp: PassInput, cap: Captured, layers: dict[str, nn.Module], x: Tensor) -> FeatureMaps:
    """A pass's capture read through the one layout reader (:func:`camkit.core.tokens.to_spatial`): token and
    channels-last layers become Tensor[B, K, h, w] as for every method; an unreadable layout is refused there."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return to_spatial(cap.activations, cap.gradients, inp.model, layers, size, inp.reshape)


def _deepest(inp: PassInput, name: str) -> tuple[str, nn.Module]:
    if not inp.layers:
        raise CamkitError(f"{name} needs a target layer (layers='auto' or a name from `camkit layers MODEL`)")
    if len(inp.layers) == 1:
        return next(iter(inp.layers.items()))
    cap = capture(inp.model, inp.x[:1], inp.layers, None, inp.output_fn)
    last = cap.order[-1]
    return last, inp.layers[last]


def _probabilities(inp: PassInput, out: Tensor, image: int) -> Tensor:
    """Scores of one image's target for each row of ``out``: p_c, or the callable target's value."""
    if inp.classes is None:
        return image_rows(inp, out, image)
    return torch.softmax(out.float(), dim=1)[:, int(inp.classes[image])]


class _Replace:
    """Forward hook that hands the layers after the target given feature maps Tensor[n, K, h, w] on the layer's
    last call, put back into the layer's own layout (:meth:`camkit.core.tokens.Layout.write`)."""

    def __init__(self, calls: int, value: Tensor, layout: Layout | None) -> None:
        self.calls, self.seen, self.value, self.layout = calls, 0, value, layout

    def __call__(self, _m: nn.Module, _i: object, out: object) -> Tensor | None:
        self.seen += 1
        if self.seen != self.calls:
            return None
        if not isinstance(out, Tensor):
            raise CamkitError("the layer's output is not the feature map it was captured as")
        value = self.value if self.layout is None else self.layout.write(self.value, out)
        if tuple(out.shape[1:]) != tuple(value.shape[1:]):
            raise CamkitError("the layer's output is not the feature map it was captured as")
        return value


# ----------------------------------------------------------------------------------------------- Recipro-CAM


RECIPRO_MASKS = ("onehot", "gaussian")
"""Recipro-CAM's spatial masks: the cell alone (the paper's), or its value spread over the 3x3 neighbourhood by the
Gaussian filter [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16 (the authors' code's ``is_gaussian`` option)."""


def _check_count(method: str, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CamkitError(f"{method}: {key} must be an integer >= 1, got {value!r}")
    return value


def _check_positive(method: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CamkitError(f"{method}: {key} must be a number > 0, got {value!r}")
    return float(value)


def _check_mask(mask: object) -> str:
    if mask not in RECIPRO_MASKS:
        raise CamkitError(f"reciprocam: mask must be 'onehot' or 'gaussian', got {mask!r}")
    return str(mask)


def recipro_masks(h: int, w: int, mask: str = "onehot", device: torch.device | None = None) -> Tensor:
    """Recipro-CAM's masks Tensor[h*w, 1, h, w]: mask n is the one of cell n (row-major), one-hot or the 3x3
    Gaussian centred there (cut at the grid's border, as the authors' code)."""
    _check_mask(mask)
    eye = torch.eye(h * w, device=device).view(h * w, 1, h, w)
    if mask == "onehot":
        return eye
    g = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=device) / 16
    return F.conv2d(eye, g.view(1, 1, 3, 3), padding=1)


def _replay(inp: PassInput, layer: nn.Module, hook: _Replace, x: Tensor) -> Tensor:
    """The model's output when ``layer`` hands on ``hook``'s n feature maps: one forward of the one image ``x``;
    where the layers after it join earlier features that do not broadcast to n rows (a concatenation with a
    skip connection, as in a YOLO neck), the image repeated n times (the same earlier features in each row)."""
    n = hook.value.shape[0]
    for rows in (x, x.expand(n, *x.shape[1:])) if n > 1 else (x,):
        hook.seen = 0
        handle = hook_forward(layer, hook)
        try:
            return inp.output_fn(inp.model(rows))
        except RuntimeError:
            if rows.shape[0] == n:
                raise
        finally:
            handle.remove()
    raise AssertionError("unreachable")


def reciprocam(inp: PassInput, batch_size: int = 64, mask: str = "onehot") -> Tensor:
    """Recipro-CAM (Byun & Lee 2022): S(i, j) = p_c(tail(A_ij M_ij)), A_ij the channels' values at cell (i, j)
    and M_ij its mask (:func:`recipro_masks`; one-hot: A * M_ij, the paper's).

    Args:
        inp: the model, input, targets and layers (the deepest layer is used).
        batch_size: masked feature maps per replay of the layers after the target.
        mask: ``"onehot"`` (the paper's) or ``"gaussian"`` (the cell's value over its 3x3 neighbourhood).

    Returns:
        Tensor[B, h, w], the map on the layer's grid.
    """
    _check_count("reciprocam", "batch_size", batch_size)
    _check_mask(mask)
    _one_target(inp, "reciprocam")
    name, layer = _deepest(inp, "reciprocam")
    cap = capture(inp.model, inp.x, {name: layer}, None, inp.output_fn)
    features = _features(inp, cap, {name: layer}, inp.x)
    a, layout = features.activations[name], features.layouts.get(name)
    if layout is None and tuple(a.shape) != tuple(cap.activations[name].shape):
        raise CamkitError(
            f"reciprocam feeds masked feature maps back into {name!r}, and the inverse of a custom reshape= is "
            "unknown: leave reshape= to camkit, or use a gradient method"
        )
    calls = cap.calls.get(name, 1)
    bsz, _, h, w = a.shape
    eye = recipro_masks(h, w, mask, a.device).to(a.dtype)
    out_maps = torch.zeros(bsz, h * w, device=a.device)
    with torch.inference_mode():
        for b in range(bsz):
            cells = a[b].flatten(1).T[:, :, None, None]  # [h*w, K, 1, 1]: the channels at each cell
            for start in range(0, h * w, batch_size):
                masks = eye[start : start + batch_size]
                feats = cells[start : start + batch_size] * masks  # [n, K, h, w]
                out = _replay(inp, layer, _Replace(calls, feats, layout), inp.x[b : b + 1])
                out_maps[b, start : start + masks.shape[0]] = _probabilities(inp, out, b)
    return out_maps.view(bsz, h, w)


# ----------------------------------------------------------------------------------------------- CAMERAS


def check_scales(method: str, scales: object) -> tuple[float, ...]:
    """``scales`` as a tuple of floats, or a CamkitError: a non-empty sequence of finite factors > 0."""
    factors: tuple[object, ...] = (
        tuple(scales) if isinstance(scales, Sequence) and not isinstance(scales, (str, bytes)) else ()
    )
    if not factors or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < float("inf") for s in factors
    ):
        raise CamkitError(
            f"{method}: scales must be a non-empty sequence of factors > 0, got {scales!r}; write scales=(1, 1.5, 2)"
        )
    return tuple(float(s) for s in factors)  # type: ignore[arg-type]  # numbers here


def cameras(inp: PassInput, scales: Sequence[float] = CAMERAS_SCALES) -> Tensor:
    """CAMERAS (Jalwana et al., CVPR 2021): ReLU(sum_k mean_r up(A_r)_k * mean_r up(G_r)_k).

    Args:
        inp: the model, input, targets and layers (the deepest layer is used).
        scales: input scale factors; every scale's A and G are resized to the largest scale's feature grid.

    Returns:
        Tensor[B, h', w'] on the largest scale's grid (the signed sum; the ReLU is applied by post-processing).
    """
    scales = check_scales("cameras", scales)
    score = _one_target(inp, "cameras")
    name, layer = _deepest(inp, "cameras")
    height, width = inp.x.shape[-2:]
    pairs = []
    sizes = [scaled_size("cameras", (height, width), s) for s in sorted(scales)]  # all checked first
    for s, size in zip(sorted(scales), sizes, strict=True):
        xs = inp.x if size == (height, width) else F.interpolate(inp.x, size=size, mode="bilinear")
        try:
            cap = capture(inp.model, xs, {name: layer}, score, inp.output_fn)
        except (RuntimeError, AssertionError, ValueError) as err:
            if size == (height, width):
                raise
            raise CamkitError(
                f"cameras resizes the input by {s:g} to {size[0]}x{size[1]}, and this model does not take that "
                f"size ({type(err).__name__}: {err}); use scales this model takes (scales=(1,) for a fixed input "
                "size), or a model that accepts any input size"
            ) from err
        features = _features(inp, cap, {name: layer}, xs)
        g = features.gradients[name]
        assert isinstance(g, Tensor)
        pairs.append((features.activations[name].float(), g.float()))
    grid = pairs[-1][0].shape[-2:]
    a_bar = torch.stack([upsample(a, grid) for a, _ in pairs]).mean(dim=0)
    g_bar = torch.stack([upsample(g, grid) for _, g in pairs]).mean(dim=0)
    return (a_bar * g_bar).sum(dim=1)


# ----------------------------------------------------------------------------------------------- Poly-CAM


def polycam_recursion(maps: list[Tensor], eps: float = 1e-8) -> Tensor:
    """Poly-CAM's backward recursion over layer maps, shallow to deep, each Tensor[B, h_l, w_l], non-negative.

    S_L = M_L; S_l = up(S_{l+1}) * M_l / up(avgpool(M_l)) with the pool down to layer l+1's grid (adaptive
    average pooling), so that within each coarse cell the shallow map only redistributes the coarse map's mass.

    Returns:
        Tensor[B, h_1, w_1], the map at the shallowest layer's resolution.
    """
    if not maps:
        raise CamkitError("polycam_recursion needs at least one layer map")
    s = maps[-1]
    for m in reversed(maps[:-1]):
        coarse = (int(s.shape[-2]), int(s.shape[-1]))
        local = F.adaptive_avg_pool2d(m[:, None], coarse)[:, 0]
        s = upsample(s, m.shape[-2:]) * m / (upsample(local, m.shape[-2:]) + eps)
    return s


_STAGES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], list[str]]] = (
    weakref.WeakKeyDictionary()
)
_STAGES_LOCK = threading.Lock()


def stage_layers(model: nn.Module, example: Tensor, stages: int = 3) -> dict[str, nn.Module]:
    """The last layer of each of the ``stages`` deepest resolutions (CNN layouts), shallow to deep.

    Cached per model and input shape, like the automatic layer (one traced batch-1 forward the first time)."""
    key = (tuple(example.shape[1:]), example.dtype, str(example.device), stages)
    with _STAGES_LOCK:
        names = _STAGES.get(model, {}).get(key)
    if names is None:
        names = _stage_names(model, example, stages)
        with _STAGES_LOCK:
            _STAGES.setdefault(model, {})[key] = names
    return resolve_layers(model, ",".join(names), example)


def _stage_names(model: nn.Module, example: Tensor, stages: int) -> list[str]:
    infos = [
        i
        for i in describe_layers(model, example[:1])
        if not i.passthrough
        and i.layout is not None
        and i.calls == 1
        and i.layout.grid[0] * i.layout.grid[1] > 1
    ]
    auto = pick_auto(infos, model)
    last_of: dict[tuple[int, int], tuple[int, str]] = {}
    for i in infos:
        assert i.layout is not None
        grid = (int(i.layout.grid[0]), int(i.layout.grid[1]))
        if grid not in last_of or i.order > last_of[grid][0]:
            last_of[grid] = (i.order, i.name)
    chosen = sorted(last_of.values())[-stages:]
    names = [n for _, n in chosen]
    if auto is not None and auto not in names:
        names = [*names[1:], auto]
    return names


def check_layer_names(method: str, layers: object) -> tuple[str, ...] | None:
    """A method's own ``layers`` setting as a tuple of names (None: the call's), or a CamkitError: a
    comma-separated str or a non-empty sequence of non-empty names."""
    if layers is None:
        return None
    names: list[object] = []
    if isinstance(layers, str):
        names.extend(layers.split(","))
    elif isinstance(layers, Sequence):
        names.extend(layers)
    cleaned = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
    if not cleaned or len(cleaned) != len(names):
        raise CamkitError(
            f"{method}: layers must be layer names, e.g. layers=(layer3,layer4) (see `camkit layers MODEL`), "
            f"got {layers!r}"
        )
    return cleaned


def poly_layers(
    inp: PassInput, layers: Sequence[str] | None = None, stages: int = 3, method: str = "polycam"
) -> dict[str, nn.Module]:
    """The layers of Poly-CAM's recursion: ``layers`` when given (names of the model's layers), else the call's
    target layers when there are several, else the last layers of the ``stages`` deepest resolutions."""
    _check_count(method, "stages", stages)
    names = check_layer_names(method, layers)
    if names is not None:
        return resolve_layers(inp.model, list(names), inp.x)
    return inp.layers if len(inp.layers) > 1 else stage_layers(inp.model, inp.x, stages)


def polycam(inp: PassInput, layers: Sequence[str] | None = None, stages: int = 3) -> Tensor:
    """Poly-CAM's recursion (Englebert et al., ICPR 2022) over LayerCAM layer maps ReLU(sum_k ReLU(G_k) A_k).

    Args:
        inp: the model, input, targets and the call's layers.
        layers: the recursion's layers by name (any order: they run shallow to deep as the model computes them);
            None: the call's layers when there are several, else the automatic choice.
        stages: the automatic choice: the last layer of each of the ``stages`` deepest resolutions.

    Returns:
        Tensor[B, h, w] at the shallowest layer's resolution.
    """
    score = _one_target(inp, "polycam")
    chosen = poly_layers(inp, layers, stages)
    cap = capture(inp.model, inp.x, chosen, score, inp.output_fn)
    features = _features(inp, cap, chosen, inp.x)
    maps = []
    for name in cap.order:
        a = features.activations[name].float()
        g = features.gradients[name]
        assert isinstance(g, Tensor)
        maps.append(torch.relu((torch.relu(g.float()) * a).sum(dim=1)))
    return polycam_recursion(maps)


PCAM_BATCH = 64
"""Masked inputs per forward of ``pcamp`` and ``pcampm``."""


def pcam_masks(a: Tensor, size: tuple[int, int]) -> Tensor:
    """The masks of PCAM+/-: per channel of Tensor[K, h, w], (A - q_0.001) / q_0.999 clipped to [0, 1] (the
    authors' normalisation), then bilinear to ``size``: Tensor[K, H, W]."""
    flat = a.flatten(1).float()
    lo = torch.quantile(flat, 0.001, dim=1, keepdim=True)
    hi = torch.quantile(flat, 0.999, dim=1, keepdim=True)
    norm = ((flat - lo) / torch.clamp(hi, min=1e-12)).clamp(0, 1)
    return upsample(norm.view_as(a), size)


def _channel_weights(inp: PassInput, a: Tensor, b: int, base: Tensor, signed: bool) -> Tensor:
    """w_k of one image: p_c(X * H_k), or ReLU(p_c(X * H_k) + p_c(X) - p_c(X * (1 - H_k))) when ``signed``."""
    x = inp.x[b : b + 1]
    masks = pcam_masks(a[b], (int(x.shape[-2]), int(x.shape[-1])))[:, None].to(x.dtype)
    out = []
    for start in range(0, masks.shape[0], PCAM_BATCH):
        m = masks[start : start + PCAM_BATCH]
        w = _probabilities(inp, inp.output_fn(inp.model(x * m)), b)
        if signed:
            w = torch.relu(w + base[b] - _probabilities(inp, inp.output_fn(inp.model(x * (1 - m))), b))
        out.append(w)
    return torch.cat(out)


def pcam_plus(
    inp: PassInput, signed: bool = False, layers: Sequence[str] | None = None, stages: int = 3
) -> Tensor:
    """PCAM+ (``signed=False``) or PCAM+/- (``signed=True``): Poly-CAM's recursion over layer maps
    ReLU(sum_k w_k A_k) with masked-forward channel weights (see the module's notes); ``layers`` and ``stages``
    as :func:`polycam`'s.

    Returns:
        Tensor[B, h, w] at the shallowest layer's resolution.
    """
    name = "pcampm" if signed else "pcamp"
    _one_target(inp, name)
    chosen = poly_layers(inp, layers, stages, name)
    cap = capture(inp.model, inp.x, chosen, None, inp.output_fn)
    features = _features(inp, cap, chosen, inp.x)
    maps = []
    with torch.inference_mode():
        base = torch.stack([_probabilities(inp, cap.output[b : b + 1], b)[0] for b in range(inp.x.shape[0])])
        for layer in cap.order:
            a = _spatial(features.activations[layer], layer, name).float()
            w = torch.stack([_channel_weights(inp, a, b, base, signed) for b in range(a.shape[0])])
            maps.append(torch.relu((w[:, :, None, None] * a).sum(dim=1)))
    return polycam_recursion(maps)


def match_values(source: Tensor, reference: Tensor) -> Tensor:
    """Per image, each value of ``source`` replaced by the value of the same rank in ``reference``.

    Args:
        source: Tensor[B, h, w], the map whose order is kept.
        reference: Tensor[B, h, w], the map whose values are used (same shape).

    Returns:
        Tensor[B, h, w]: sorted, its values are ``reference``'s sorted values; its order is ``source``'s (ties
        in order of appearance).
    """
    if source.shape != reference.shape:
        raise CamkitError(
            f"match_values needs maps of one shape, got {tuple(source.shape)} and {tuple(reference.shape)}"
        )
    b = source.shape[0]
    order = source.reshape(b, -1).argsort(dim=1, stable=True)
    out = torch.empty_like(reference.reshape(b, -1))
    out.scatter_(1, order, reference.reshape(b, -1).sort(dim=1, stable=True).values)
    return out.view_as(source)


def polycam_matched(inp: PassInput, layers: Sequence[str] | None = None, stages: int = 3) -> Tensor:
    """Poly-CAM's map with Grad-CAM's values per image (:func:`match_values`); one forward and one backward;
    ``layers`` and ``stages`` as :func:`polycam`'s (Grad-CAM's map is the deepest layer's).

    Returns:
        Tensor[B, h, w] at the shallowest layer's resolution.
    """
    score = _one_target(inp, "polycam-matched")
    chosen = poly_layers(inp, layers, stages, "polycam-matched")
    cap = capture(inp.model, inp.x, chosen, score, inp.output_fn)
    features = _features(inp, cap, chosen, inp.x)
    maps, grad_cam = [], None
    for name in cap.order:
        a = features.activations[name].float()
        g = features.gradients[name]
        assert isinstance(g, Tensor)
        maps.append(torch.relu((torch.relu(g.float()) * a).sum(dim=1)))
        grad_cam = torch.relu((g.float().mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
    assert grad_cam is not None
    poly = polycam_recursion(maps)
    return match_values(poly, upsample(grad_cam, poly.shape[-2:]))


# ----------------------------------------------------------------------------------------------- Group-CAM


GROUPCAM_GROUPS = 32
"""Channel groups of ``groupcam`` (the paper's default)."""

DENOISE_PERCENTILE = 70.0
"""Values of a group map at or below this percentile of the map are set to 0 (the paper's 70th)."""


def _check_blur(kernel_size: object, sigma: object) -> tuple[int, float]:
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise CamkitError(f"groupcam: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    return kernel_size, _check_positive("groupcam", "sigma", sigma)


def blur(x: Tensor, kernel_size: int = 51, sigma: float = 50.0) -> Tensor:
    """Group-CAM's baseline: a separable, depthwise Gaussian blur of Tensor[B, C, H, W] (kernel 51, sigma 50),
    reflect padding (edge padding when a side is too short to reflect), as torchvision's ``gaussian_blur``."""
    _check_blur(kernel_size, sigma)
    r = kernel_size // 2
    t = torch.linspace(-r, r, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = torch.nn.functional.pad(x.float(), (r, r, r, r), mode=mode)
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y.to(x.dtype)


def _check_groups(groups: object, percentile: object) -> tuple[int, float]:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise CamkitError(
            f"groupcam needs at least 1 channel group: groups must be an integer >= 1, got {groups!r}"
        )
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile < 100:
        raise CamkitError(f"groupcam: percentile must be a number in [0, 100), got {percentile!r}")
    return groups, float(percentile)


def group_maps(
    a: Tensor, alpha: Tensor, groups: int = GROUPCAM_GROUPS, percentile: float = DENOISE_PERCENTILE
) -> Tensor:
    """Steps 1-2: Tensor[B, G, h, w], ReLU(sum_{k in g} alpha_k A_k) with the values at or below the group map's
    ``percentile`` (70th) set to 0. ``torch.chunk`` splits the channels (K not divisible by G: fewer, larger
    groups, as in the authors' code)."""
    _check_groups(groups, percentile)
    weighted = a * alpha[:, :, None, None]
    maps = torch.stack([torch.relu(part.sum(dim=1)) for part in weighted.chunk(groups, dim=1)], dim=1)
    flat = maps.flatten(2)
    cut = torch.quantile(flat, percentile / 100, dim=2, keepdim=True)
    return torch.where(flat > cut, flat, torch.zeros_like(flat)).view_as(maps)


def groupcam(
    inp: PassInput,
    groups: int = GROUPCAM_GROUPS,
    percentile: float = DENOISE_PERCENTILE,
    kernel_size: int = 51,
    sigma: float = 50.0,
) -> Tensor:
    """Group-CAM: ReLU(sum_g s_g M'_g), s_g = p_c(X * M'_g + blur(X) * (1 - M'_g)) - p_c(blur(X)).

    Args:
        inp: the model, input, targets and layers (the deepest layer is used).
        groups: channel groups (32, the paper's).
        percentile: a group map's values at or below this percentile are set to 0 (70, the paper's).
        kernel_size, sigma: the Gaussian blur of the baseline (51 and 50, the paper's).

    Returns:
        Tensor[B, H, W] at the input's resolution.
    """
    _check_groups(groups, percentile)
    _check_blur(kernel_size, sigma)
    score = _one_target(inp, "groupcam")
    name, layer = _deepest(inp, "groupcam")
    cap = capture(inp.model, inp.x, {name: layer}, score, inp.output_fn)
    features = _features(inp, cap, {name: layer}, inp.x)
    a = _spatial(features.activations[name], name, "groupcam").float()
    g = features.gradients[name]
    assert isinstance(g, Tensor)
    alpha = g.float().mean(dim=(2, 3))
    size = (int(inp.x.shape[-2]), int(inp.x.shape[-1]))
    masks = group_maps(a, alpha, groups, percentile)
    out = torch.zeros(a.shape[0], *size, device=a.device)
    with torch.inference_mode():
        blurred = blur(inp.x, kernel_size, sigma)
        for b in range(a.shape[0]):
            m = masks[b]
            keep = m.flatten(1).amax(dim=1) > m.flatten(1).amin(dim=1)
            if not bool(keep.any()):
                continue
            up = normalize(upsample(m[keep][None], size)[0])[:, None]  # [G', 1, H, W]
            xb, bb = inp.x[b : b + 1], blurred[b : b + 1]
            mixed = xb * up.to(xb.dtype) + bb * (1 - up.to(xb.dtype))
            scores = _probabilities(inp, inp.output_fn(inp.model(torch.cat([bb, mixed]))), b)
            s = scores[1:] - scores[0]
            out[b] = torch.relu((s[:, None, None] * up[:, 0]).sum(dim=0))
    return out


# ----------------------------------------------------------------------------------------------- Opti-CAM


def opticam(ctx: PerturbationContext) -> Tensor:
    """Opti-CAM (Zhang et al. 2023): w = softmax(u*), u* maximising y_c(X * n(up(sum_k softmax(u)_k A_k))).

    Adam, learning rate 0.1, from u = 0 (uniform weights), ``iterations`` steps (default 100; ``samples`` when unset).

    Returns:
        Tensor[B, T, K], T = 1.
    """
    if ctx.classes is not None and ctx.classes.dim() != 1:
        raise CamkitError(
            "opticam explains one target per image; explain each class of a TopK in its own call"
        )
    a = _spatial(ctx.activations, ctx.layer_name, "opticam").detach().float()
    steps = ctx.options.count("iterations", 100)
    x = ctx.x.detach()
    score = score_fn(ctx.classes, ctx.target_fn)
    u = torch.zeros(a.shape[:2], device=a.device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.1)
    size = x.shape[-2:]
    with torch.enable_grad():
        for _ in range(steps):
            w = torch.softmax(u, dim=1)
            sal = normalize(upsample(torch.einsum("bk,bkhw->bhw", w, a), size))
            out = ctx.output_fn(ctx.model(x * sal[:, None].to(x.dtype)))
            loss = -score(out).float().sum()
            (grad,) = torch.autograd.grad(loss, [u])
            u.grad = grad
            opt.step()
            if ctx.progress is not None:
                ctx.progress.add(1)
    return torch.softmax(u.detach(), dim=1)[:, None, :]


# ----------------------------------------------------------------------------------------------- registry


def _named(name: str, fn: Callable[[PassInput], Tensor]) -> Callable[[PassInput], dict[str, Tensor]]:
    """A pass method's ``run``: its one signed map, filed under the method's name."""

    def run(inp: PassInput) -> dict[str, Tensor]:
        return {name: fn(inp)}

    return run


def _register_pass(
    template: PassMethod,
    fn: Callable[..., Tensor],
    defaults: Mapping[str, object],
    check: Callable[..., dict[str, object]],
    fixed: Mapping[str, object] | None = None,
) -> None:
    """Register a pass method with its settings: ``name(key=value, ...)`` gives a copy whose map is
    ``fn(inp, **fixed, **settings)``, the settings checked by ``check`` (the messages of the functions), named
    after the settings that differ from ``defaults`` (:func:`camkit.methods.registry.configured_name`)."""

    def factory(**settings: object) -> PassMethod:
        values = check(**{**defaults, **settings})
        run = _named(template.name, functools.partial(fn, **(fixed or {}), **values))
        return dataclasses.replace(template, name=configured_name(template.name, values, defaults), run=run)

    register(factory(), factory, defaults)


def _recipro_settings(batch_size: object, mask: object) -> dict[str, object]:
    return {"batch_size": _check_count("reciprocam", "batch_size", batch_size), "mask": _check_mask(mask)}


def _cameras_settings(scales: object) -> dict[str, object]:
    return {"scales": check_scales("cameras", scales)}


def _poly_settings(method: str) -> Callable[..., dict[str, object]]:
    def check(layers: object, stages: object) -> dict[str, object]:
        return {"layers": check_layer_names(method, layers), "stages": _check_count(method, "stages", stages)}

    return check


def _groupcam_settings(
    groups: object, percentile: object, kernel_size: object, sigma: object
) -> dict[str, object]:
    g, p = _check_groups(groups, percentile)
    k, s = _check_blur(kernel_size, sigma)
    return {"groups": g, "percentile": p, "kernel_size": k, "sigma": s}


_POLY = {"layers": None, "stages": 3}
"""Poly-CAM's settings: its own layers (None: the call's, or the automatic choice) and the automatic choice's
number of resolutions."""

_register_pass(
    PassMethod(
        name="reciprocam",
        needs_grad=False,
        cost="1 forward + h*w replays of the layers after the target (batched), no backward",
        paper="Byun & Lee 2022 (Recipro-CAM)",
        summary="S(i,j) = p_c(tail(A * onehot_ij)): the class probability with only cell (i,j) of A kept",
        aliases=("recipro-cam",),
        run=_named("reciprocam", reciprocam),
        prefer="gradient-free and about one forward when the target is the last layer (the tail is the head)",
    ),
    reciprocam,
    {"batch_size": 64, "mask": "onehot"},
    _recipro_settings,
)
_register_pass(
    PassMethod(
        name="cameras",
        needs_grad=False,
        cost="forward + backward at 3 input scales (x1, x1.5, x2): about 7.5 forwards + backwards",
        paper="Jalwana et al., CVPR 2021 (CAMERAS)",
        summary="map = ReLU(sum_k mean_r up(A_r) * mean_r up(G_r)) over up-scaled inputs",
        aliases=("cameras-cam",),
        run=_named("cameras", cameras),
        prefer="higher-resolution maps from the same layer: the input is up-scaled, the grid grows with it",
    ),
    cameras,
    {"scales": CAMERAS_SCALES},
    _cameras_settings,
)
_register_pass(
    PassMethod(
        name="polycam",
        needs_grad=False,
        cost="1 forward + 1 backward to the shallowest of its layers",
        paper="Englebert, Cornu & De Vleeschouwer, ICPR 2022 (Poly-CAM)",
        summary="S_l = up(S_{l+1}) * M_l / up(avgpool(M_l)), deep to shallow, M_l LayerCAM maps",
        aliases=("poly-cam",),
        run=_named("polycam", polycam),
        prefer="sharper maps that keep the deep layer's class focus: better boxes, insertion and deletion than "
        "Grad-CAM on the development set (docs/evaluation.md), for one backward",
    ),
    polycam,
    _POLY,
    _poly_settings("polycam"),
)
_register_pass(
    PassMethod(
        name="pcamp",
        needs_grad=False,
        cost="1 forward + one forward per channel of each layer (about 2,200 on EfficientNet-Lite0), no backward",
        paper="Englebert, Cornu & De Vleeschouwer, ICPR 2022 (Poly-CAM, PCAM+)",
        summary="Poly-CAM's recursion over ReLU(sum_k w_k A_k), w_k = p_c(X * H_k) per layer",
        aliases=("pcam+", "polycam+"),
        run=_named("pcamp", pcam_plus),
        prefer="the paper's gradient-free Poly-CAM, when thousands of forwards per image are affordable",
    ),
    pcam_plus,
    _POLY,
    _poly_settings("pcamp"),
    {"signed": False},
)
_register_pass(
    PassMethod(
        name="pcampm",
        needs_grad=False,
        cost="1 forward + two forwards per channel of each layer (about 4,400 on EfficientNet-Lite0), no backward",
        paper="Englebert, Cornu & De Vleeschouwer, ICPR 2022 (Poly-CAM, PCAM+/-)",
        summary="Poly-CAM's recursion, w_k = ReLU(p_c(X * H_k) + p_c(X) - p_c(X * (1 - H_k))) per layer",
        aliases=("pcam±", "polycam±"),
        run=_named("pcampm", functools.partial(pcam_plus, signed=True)),
        prefer="PCAM+ that also counts what removing a channel's region costs, at twice PCAM+'s forwards",
    ),
    pcam_plus,
    _POLY,
    _poly_settings("pcampm"),
    {"signed": True},
)
_register_pass(
    PassMethod(
        name="polycam-matched",
        needs_grad=False,
        cost="1 forward + 1 backward to the shallowest of its layers (as polycam)",
        paper="camkit's combination of Poly-CAM (Englebert et al., ICPR 2022) and Grad-CAM",
        summary="Poly-CAM's order of the pixels with Grad-CAM's values (per-image rank matching)",
        aliases=("polycam-gc",),
        run=_named("polycam-matched", polycam_matched),
        prefer="Poly-CAM's sharper order with thresholds that cut Grad-CAM-sized regions (boxes from maps)",
    ),
    polycam_matched,
    _POLY,
    _poly_settings("polycam-matched"),
)
register_tunable(
    PerturbationMethod(
        name="opticam",
        needs_grad=False,
        cost="1 forward + samples (100) forward + backward passes through the whole model",
        paper="Zhang, Rebuffi, Avrithis et al. 2023 (Opti-CAM)",
        summary="w = softmax(u*), u* = argmax_u y_c(X * n(up(sum_k softmax(u)_k A_k))) by Adam",
        aliases=("opti-cam",),
        weights=opticam,
        prefer="the map that, used as a mask, keeps the class score highest (faithfulness), at 100x the cost",
    ),
    {"samples": 100},
)
_register_pass(
    PassMethod(
        name="groupcam",
        needs_grad=False,
        cost="1 forward + 1 backward, then 1 + 32 forwards (the blurred input and one per channel group)",
        paper="Zhang, Rao & Yang 2021 (Group-CAM, arXiv 2103.13859)",
        summary="sum_g [p_c(X*M_g + blur(X)*(1-M_g)) - p_c(blur(X))] M_g over 32 denoised Grad-CAM group maps",
        aliases=("group-cam",),
        run=_named("groupcam", groupcam),
        prefer="a score-weighted map (faithfulness) at about 35 forwards instead of Score-CAM's one per channel",
    ),
    groupcam,
    {"groups": GROUPCAM_GROUPS, "percentile": DENOISE_PERCENTILE, "kernel_size": 51, "sigma": 50.0},
    _groupcam_settings,
)
