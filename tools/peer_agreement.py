"""Agreement of camkit's Grad-CAM, Grad-CAM++ and XGrad-CAM with pytorch-grad-cam 1.5.7 on DeiT, Swin and
MobileNetV2 (random weights, seeded: no download), and why they differ.

    PYTHONPATH=src .venv/bin/python tools/peer_agreement.py          # prints the README's table (Markdown)

For each model, the three sample photos at 224 px and their top-1 class: the Pearson correlation of camkit's map
with pytorch-grad-cam's (both at input size), and of pytorch-grad-cam's with camkit's formula evaluated on camkit's
own activations and gradients **with pytorch-grad-cam's epsilons added** (Grad-CAM++: + 1e-6 in alpha's
denominator; XGrad-CAM: + 1e-7 in sum_ab A_k[ab]), upsampled as camkit does. When that second column is ~1 the
difference is the epsilons alone. Also printed: the share of entries where 2 g^2 < 1e-6 (Grad-CAM++) and the
smallest |sum_ab A_k[ab]| relative to 1e-7 (XGrad-CAM).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    layer: str
    reshape: Callable[[Tensor], Tensor] | None


def _deit() -> nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


def _swin() -> nn.Module:
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)


def _mobilenet() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None)


def _tokens(t: Tensor) -> Tensor:
    return t[:, 1:, :].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)


def _nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


CASES = [
    Case("DeiT-tiny (timm), blocks.11.norm1", _deit, "blocks.11.norm1", _tokens),
    Case("Swin-T (timm), layers.3.blocks.1.norm1", _swin, "layers.3.blocks.1.norm1", _nhwc),
    Case("MobileNetV2 (torchvision), features.18", _mobilenet, "features.18", None),
]
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM"}


def _pearson(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _with_peer_eps(method: str, a: Tensor, g: Tensor) -> Tensor:
    """camkit's formula with pytorch-grad-cam's epsilon, Tensor[B, h, w] (signed)."""
    a, g = a.double(), g.double()
    if method == "gradcam":
        w = g.mean(dim=(2, 3))
    elif method == "gradcam++":
        s = a.sum(dim=(2, 3), keepdim=True)
        alpha = g**2 / (2 * g**2 + s * g**3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (torch.relu(g) * alpha).sum(dim=(2, 3))
    else:
        s = a.sum(dim=(2, 3), keepdim=True)
        w = (g * a / (s + 1e-7)).sum(dim=(2, 3))
    return torch.einsum("bk,bkhw->bhw", w, a)


def main() -> int:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import camkit
    from camkit.adapters import Preprocess
    from camkit.core.capture import capture
    from camkit.core.postprocess import normalize, upsample
    from camkit.core.tokens import to_spatial

    torch.set_num_threads(1)
    photos = [camkit.sample_image(n) for n in ("chelsea", "coffee", "astronaut")]
    x = Preprocess()(photos)  # ImageNet mean/std, 224 x 224
    rows = []
    for case in CASES:
        torch.manual_seed(0)
        model = case.build().eval()
        with torch.no_grad():
            classes = model(x).argmax(dim=1)
        layer = model.get_submodule(case.layer)
        cap = capture(model, x, {case.layer: layer}, lambda o, c=classes: o.gather(1, c[:, None])[:, 0])
        feats = to_spatial(cap.activations, cap.gradients, model, {case.layer: layer}, (224, 224))
        a = feats.activations[case.layer]
        g = feats.gradients[case.layer]
        assert isinstance(g, Tensor)
        small_g2 = float((2 * g.double() ** 2 < 1e-6).double().mean())
        min_sum = float(a.double().sum(dim=(2, 3)).abs().min())
        for method, cls_name in METHODS.items():
            ours = camkit.explain(model, x, method, case.layer, targets=classes.tolist()).maps
            with getattr(pgc, cls_name)(model, [layer], reshape_transform=case.reshape) as cam:
                ref = torch.from_numpy(cam(x, [ClassifierOutputTarget(int(c)) for c in classes]))
            eps_map = normalize(upsample(torch.relu(_with_peer_eps(method, a, g)).float(), (224, 224)))
            r = [_pearson(ours[i], ref[i]) for i in range(len(photos))]
            r_eps = [_pearson(eps_map[i], ref[i]) for i in range(len(photos))]
            rows.append((case.name, method, min(r), max(r), min(r_eps), small_g2, min_sum))
            print(f"{case.name} {method}: {r} with the peer's eps: {r_eps}", file=sys.stderr)
    print(
        "| model, layer | method | Pearson camkit vs grad-cam (min..max of 3 photos) "
        "| grad-cam vs camkit's formula + grad-cam's eps (min) | 2g^2 < 1e-6 | min_k abs(sum A_k) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, method, lo, hi, eps_lo, g2, ms in rows:
        print(f"| {name} | {method} | {lo:.4f}..{hi:.4f} | {eps_lo:.4f} | {g2:.0%} | {ms:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
