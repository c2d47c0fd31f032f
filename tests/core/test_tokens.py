"""Token / channels-last layouts, the transformer auto layer, attention rollout methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camkit
from camkit.core.outputs import output_fn
from camkit.core.tokens import Layout, infer_layout, prefix_tokens
from camkit.methods.attention import attention_probabilities, grad_rollout, rollout
from testbed import assert_unchanged, snapshot


def _tiny_vit(**kw):  # type: ignore[no-untyped-def]
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, **kw
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision's head starts at zero: no gradient at all
    return model.eval()


@pytest.fixture(scope="module")
def deit_distilled():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=3).eval()


@pytest.fixture(scope="module")
def tv_vit():
    return _tiny_vit()


@pytest.fixture(scope="module")
def swin():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.swin_t().eval()


# ----------------------------------------------------------------------------------------------- layouts


def test_tokens_with_one_class_token():
    lay = infer_layout((2, 197, 768), (224, 224), prefix=1)
    assert lay == Layout("tokens", (14, 14), 768, 1)


def test_prefix_is_found_without_a_hint_and_grids_follow_the_input_size():
    # DeiT distilled at 64x96 (patch 16): 2 prefix tokens + a 4x6 grid; nobody told us either number.
    assert infer_layout((1, 2 + 24, 192), (64, 96)) == Layout("tokens", (4, 6), 192, 2)
    assert infer_layout((1, 1 + 24, 192), (96, 64)) == Layout("tokens", (6, 4), 192, 1)
    assert infer_layout((1, 49, 96), (224, 224)) == Layout("tokens", (7, 7), 96, 0)


def test_sequence_first_tokens():
    lay = infer_layout((17, 3, 8), (64, 64), batch=3, prefix=1)
    assert lay is not None and lay.kind == "tokens-seq-first"
    t = torch.randn(17, 3, 8)
    assert torch.equal(lay(t), t.transpose(0, 1)[:, 1:].reshape(3, 4, 4, 8).permute(0, 3, 1, 2))


def test_channels_last_vs_channels_first():
    assert infer_layout((1, 7, 7, 768), (224, 224)).kind == "nhwc"  # type: ignore[union-attr]
    assert infer_layout((1, 768, 7, 7), (224, 224)).kind == "nchw"  # type: ignore[union-attr]
    assert infer_layout((1, 56, 56, 96), (224, 224)).kind == "nhwc"  # type: ignore[union-attr]
    # Ambiguous [B, 4, 4, 4]: NCHW unless the layer is a LayerNorm over the last dimension.
    assert infer_layout((1, 4, 4, 4), (64, 64)).kind == "nchw"  # type: ignore[union-attr]
    assert infer_layout((1, 4, 4, 4), (64, 64), module=nn.LayerNorm(4)).kind == "nhwc"  # type: ignore[union-attr]
    # Grids larger than the input (detection models resize inside) stay NCHW.
    assert infer_layout((1, 256, 200, 200), (128, 128)).kind == "nchw"  # type: ignore[union-attr]


def test_unreadable_outputs():
    assert infer_layout((1, 1000), (224, 224)) is None
    assert infer_layout((1, 3, 5), (224, 224)) is None  # 3 - p tokens never make a square grid of 2+ cells
    assert infer_layout((8, 3, 49, 49), (224, 224), batch=2) is None  # windows x heads, not the batch


def test_layout_equals_the_hand_written_reshape():
    t = torch.randn(2, 197, 12)
    hand = (
        t[:, 1:, :].reshape(2, 14, 14, 12).transpose(2, 3).transpose(1, 2)
    )  # pytorch-grad-cam's ViT reshape
    assert torch.equal(infer_layout(tuple(t.shape), (224, 224), prefix=1)(t), hand)  # type: ignore[misc]


def test_prefix_tokens_from_the_model(deit_distilled, tv_vit):
    assert prefix_tokens(deit_distilled) == 2
    assert prefix_tokens(tv_vit) == 1
    assert prefix_tokens(nn.DataParallel(tv_vit)) == 1
    assert prefix_tokens(nn.Conv2d(3, 3, 1)) is None


# ----------------------------------------------------------------------------------------------- CAMs on tokens


def test_deit_distilled_drops_both_prefix_tokens(deit_distilled):
    x = torch.randn(2, 3, 64, 64)
    before = snapshot(deit_distilled)
    auto = camkit.explain(deit_distilled, x, method="gradcam")
    assert auto.layers == ["blocks.2.norm1"]
    manual = camkit.explain(
        deit_distilled,
        x,
        method="gradcam",
        layers="blocks.2.norm1",
        reshape=lambda t: t[:, 2:, :].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2),
    )
    assert torch.equal(auto.raw["blocks.2.norm1"], manual.raw["blocks.2.norm1"])
    assert auto.raw["blocks.2.norm1"].abs().sum() > 0
    # pytorch-grad-cam's vit_reshape_transform (one prefix token, 14x14) cannot even reshape these 18 tokens.
    with pytest.raises((RuntimeError, ValueError)):
        camkit.explain(
            deit_distilled,
            x,
            method="gradcam",
            layers="blocks.2.norm1",
            reshape=lambda t: t[:, 1:, :].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2),
        )
    assert_unchanged(before, deit_distilled)


def test_class_token_pooling_makes_the_last_block_output_useless(deit_distilled):
    # Why the auto layer is the last block's norm1: after the last attention, patch tokens no longer reach the
    # class / distillation tokens, so their gradient is exactly zero.
    x = torch.randn(1, 3, 64, 64)
    last = camkit.explain(deit_distilled, x, method="hirescam", layers="blocks.2")
    assert torch.count_nonzero(last.raw["blocks.2"]) == 0
    assert torch.count_nonzero(last.maps) == 0


def test_gradcam_on_tokens_matches_a_manual_computation(tv_vit):
    x = torch.randn(2, 3, 64, 64)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    expl = camkit.explain(tv_vit, x, method="gradcam")
    assert expl.layers == [layer]
    store = {}
    h = tv_vit.get_submodule(layer).register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        out = tv_vit(x)
    finally:
        h.remove()
    cls = out.argmax(1)
    (g,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), store["a"])
    a = store["a"][:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    g = g[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    ref = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1)
    torch.testing.assert_close(expl.raw[layer], ref.detach(), rtol=1e-4, atol=1e-6)


def test_swin_channels_last_equals_the_permuted_layer(swin):
    # torchvision Swin: `norm` outputs [B, h, w, C], `permute` outputs the same values as [B, C, h, w].
    x = torch.randn(2, 3, 64, 64)
    nhwc = camkit.compare(swin, x, methods=["gradcam", "layercam"], layers="norm")
    nchw = camkit.compare(swin, x, methods=["gradcam", "layercam"], layers="permute")
    for m in ("gradcam", "layercam"):
        torch.testing.assert_close(nhwc[m].raw["norm"], nchw[m].raw["permute"], rtol=1e-5, atol=1e-6)
        assert nhwc[m].raw["norm"].shape == (2, 2, 2)
    user = camkit.explain(swin, x, layers="norm", reshape=lambda t: t.permute(0, 3, 1, 2))
    torch.testing.assert_close(user.raw["norm"], nhwc["gradcam"].raw["norm"])


def test_user_reshape_must_give_a_feature_map(tv_vit):
    with pytest.raises(ValueError, match=r"Tensor\[B, K, h, w\]"):
        camkit.explain(tv_vit, torch.randn(1, 3, 64, 64), reshape=lambda t: t[:, 1:])


def test_describe_layers_reports_token_layouts(tv_vit):
    infos = {i.name: i for i in camkit.describe_layers(tv_vit, torch.randn(1, 3, 64, 64))}
    ln = infos["encoder.layers.encoder_layer_1.ln_1"]
    assert ln.shape == (17, 32) and ln.spatial == (32, 4, 4) and ln.layout.prefix == 1  # type: ignore[union-attr]
    assert infos["conv_proj"].spatial == (32, 4, 4)


# ----------------------------------------------------------------------------------------------- attention


def test_attention_capture_does_not_change_the_outputs(tv_vit, deit_distilled):
    x = torch.randn(2, 3, 64, 64)
    for model, blocks in ((tv_vit, 2), (deit_distilled, 3)):
        with torch.no_grad():
            ref = model(x)
        before = snapshot(model)
        out, probs, grads = attention_probabilities(model, x, output_fn(None), lambda o: o[:, 3])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert len(probs) == blocks and len(grads) == 1 and len(grads[0]) == blocks
        for p in probs:
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))  # rows of probabilities
        # After the last attention only the prefix tokens reach the output: dS/dA of the last block is zero in
        # every patch row, and not zero in the prefix rows.
        p = prefix_tokens(model)
        last = grads[0][-1]
        assert torch.count_nonzero(last[:, :, p:, :]) == 0
        assert torch.count_nonzero(last[:, :, :p, :]) > 0
        assert_unchanged(before, model)


def test_fused_attention_is_never_switched(deit_distilled):
    """The fused flag stays as it is during the call too (other threads read it): a hook of the user's on the
    model, called inside camkit's forward, sees it unchanged; the maps equal those of the unfused model bitwise."""
    attns = [m for m in deit_distilled.modules() if hasattr(m, "fused_attn")]
    flags = [m.fused_attn for m in attns]
    assert all(flags)
    seen: list[list[bool]] = []
    handle = deit_distilled.register_forward_hook(lambda *_: seen.append([m.fused_attn for m in attns]))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        fused = {
            m: camkit.explain(deit_distilled, x, method=m, targets=3).maps for m in ("rollout", "gradrollout")
        }
    finally:
        handle.remove()
    assert seen and all(s == flags for s in seen)
    assert [m.fused_attn for m in attns] == flags
    try:
        for m in attns:
            m.fused_attn = False
        for method, maps in fused.items():
            assert torch.equal(camkit.explain(deit_distilled, x, method=method, targets=3).maps, maps)
    finally:
        for m, flag in zip(attns, flags, strict=True):
            m.fused_attn = flag


def test_rollout_formula_on_known_matrices():
    torch.manual_seed(0)
    a1 = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    a2 = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    eye = torch.eye(5, dtype=torch.float64)
    m1 = 0.5 * a1.double().mean(1)[0] + 0.5 * eye
    m2 = 0.5 * a2.double().mean(1)[0] + 0.5 * eye
    torch.testing.assert_close(rollout([a1, a2])[0], m2 @ m1)
    g1, g2 = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5)
    b1 = torch.relu(g1 * a1).double().mean(1)[0]
    b2 = torch.relu(g2 * a2).double().mean(1)[0]
    torch.testing.assert_close(grad_rollout([a1, a2], [g1, g2])[0], (eye + b2) @ (eye + b1))


def test_one_block_rollout_is_the_class_row_of_the_attention():
    # One block: R = (A + I) / 2, so the map is half the class token's attention to the patches.
    model = _tiny_vit()
    model.encoder.layers = model.encoder.layers[:1]
    x = torch.randn(2, 3, 64, 64)
    _, probs, grads = attention_probabilities(model, x, output_fn(None), lambda o: o[:, 0])
    expl = camkit.explain(model, x, method="rollout", relu=False)
    ref = 0.5 * probs[0].mean(1)[:, 0, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(expl.raw["rollout"], ref, rtol=1e-5, atol=1e-7)
    g = camkit.explain(model, x, method="gradrollout", targets=0, relu=False)
    ref_g = torch.relu(grads[0][0] * probs[0]).mean(1)[:, 0, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(g.raw["gradrollout"], ref_g, rtol=1e-5, atol=1e-8)


def test_attention_methods_topk_and_refusals(deit_distilled, swin):
    x = torch.randn(2, 3, 64, 64)
    res = camkit.compare(deit_distilled, x, methods=["rollout", "gradrollout"], targets=camkit.TopK(2))
    assert res["rollout"].maps.shape == (2, 2, 64, 64)
    torch.testing.assert_close(res["rollout"].maps[:, 0], res["rollout"].maps[:, 1])  # class-agnostic
    assert not torch.allclose(res["gradrollout"].maps[:, 0], res["gradrollout"].maps[:, 1])
    with pytest.raises(ValueError, match="windowed attention"):
        camkit.explain(swin, x, method="rollout")
    with pytest.raises(ValueError, match="no self-attention"):
        cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        camkit.explain(cnn, x, method="rollout", layers="0")


def test_frozen_transformer_under_no_grad(tv_vit):
    x = torch.randn(1, 3, 64, 64)
    ref = camkit.compare(tv_vit, x, methods=["gradcam", "gradrollout"])
    for p in tv_vit.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            res = camkit.compare(tv_vit, x, methods=["gradcam", "gradrollout"])
    finally:
        for p in tv_vit.parameters():
            p.requires_grad_(True)
    for m in ("gradcam", "gradrollout"):
        torch.testing.assert_close(res[m].maps, ref[m].maps)
        assert res[m].maps.max() > 0


def test_mha_hook_output_matches_torch():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    ref, _ = mha(x, x, x, need_weights=False)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.attn(t, t, t, need_weights=False)[0]

    out, probs, _ = attention_probabilities(Wrap(), x, lambda o: o)  # type: ignore[arg-type]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    q = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)[..., :16].reshape(2, 5, 4, 4).transpose(1, 2)
    k = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)[..., 16:32].reshape(2, 5, 4, 4).transpose(1, 2)
    torch.testing.assert_close(probs[0], torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1))
