"""LeGrad on timm and torchvision ViTs: against a direct autograd reference written here, and against torchcam
0.5.0's LeGrad (torchvision ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camkit

timm = pytest.importorskip("timm")


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().flatten().numpy(), b.double().flatten().numpy())[0, 1])


@pytest.fixture(scope="module")
def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=64,
        depth=3,
        embed_dim=48,
        num_heads=3,
        num_classes=6,
    ).eval()


@pytest.fixture(scope="module")
def tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(
        image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=6
    )
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision starts the classifier at zero
    return m.eval()


def _reference_timm(model: nn.Module, x: torch.Tensor, cls: int, prefix: int = 1) -> torch.Tensor:
    """The formula written out on a copy with timm's explicit attention (fused_attn off), plain autograd."""
    import copy

    m = copy.deepcopy(model)
    probs, outs = [], []
    for blk in m.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _i, o: probs.append(o))
        blk.register_forward_hook(lambda _m, _i, o: outs.append(o))
    m(x)
    per_layer = []
    for z, a in zip(outs, probs, strict=True):
        f = m.fc_norm(m.norm(z.mean(dim=1)))
        logits = (m.head(f) + m.head_dist(f)) / 2 if hasattr(m, "head_dist") else m.head(f)
        (g,) = torch.autograd.grad(logits[:, cls].sum(), a, retain_graph=True)
        per_layer.append(g.clamp_min(0).mean(dim=(1, 2))[:, prefix:])  # drop the prefix keys
    return torch.stack(per_layer).mean(dim=0).reshape(x.shape[0], 4, 4)


def test_legrad_timm_equals_the_formula(timm_vit):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    flags = [b.attn.fused_attn for b in timm_vit.blocks]
    e = camkit.explain(timm_vit, x, "legrad", targets=[2, 5], relu=False)
    for i, cls in enumerate((2, 5)):
        ref = _reference_timm(timm_vit, x[i : i + 1], cls)
        torch.testing.assert_close(e.raw["legrad"][i], ref[0].float(), rtol=1e-4, atol=1e-7)
    assert [b.attn.fused_attn for b in timm_vit.blocks] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in timm_vit.modules())
    assert e.maps.shape == (2, 64, 64)


def test_legrad_deit_distilled_uses_both_heads():
    torch.manual_seed(3)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=48, num_heads=3
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    e = camkit.explain(model, x, "legrad", targets=7, relu=False)
    ref = _reference_timm(model, x, 7, prefix=2)
    torch.testing.assert_close(e.raw["legrad"][0], ref[0].float(), rtol=1e-4, atol=1e-7)


def test_legrad_topk_stacks_the_targets(timm_vit):
    x = torch.randn(1, 3, 64, 64)
    top = camkit.explain(timm_vit, x, "legrad", targets=camkit.TopK(2))
    assert top.maps.shape == (1, 2, 64, 64)
    one = camkit.explain(timm_vit, x, "legrad", targets=int(top.classes[0, 1]))
    torch.testing.assert_close(top.maps[:, 1], one.maps)


def test_legrad_torchvision_agrees_with_torchcam(tv_vit):
    from torchcam.methods import LeGrad

    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    e = camkit.explain(tv_vit, x, "legrad", targets=3, relu=False)
    with LeGrad(tv_vit, list(tv_vit.encoder.layers)) as extractor:
        scores = tv_vit(x)
        ref = extractor(3, scores, normalized=False)[0]
    assert _pearson(e.raw["legrad"][0], ref[0]) > 0.9999
    torch.testing.assert_close(e.raw["legrad"][0], ref[0].float(), rtol=1e-4, atol=1e-7)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tv_vit.modules())


def test_legrad_refuses_what_it_cannot_read(tiny):
    with pytest.raises(ValueError, match="LeGrad needs a ViT"):
        camkit.explain(tiny, torch.randn(1, 3, 32, 32), "legrad")
