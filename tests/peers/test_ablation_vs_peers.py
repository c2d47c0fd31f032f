"""Ablation-CAM on token (DeiT) and channels-last (Swin) layers: the replay feeds the ablated maps back in the
layer's own layout and equals whole forwards with the channel zeroed by hand."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import camkit
from camkit import PerturbationOptions

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def deit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=24, num_heads=2
    ).eval()


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=64,
        window_size=4,
        embed_dim=8,
        depths=(1, 1, 2, 2),
        num_heads=(1, 1, 2, 2),
        num_classes=7,
    ).eval()


def _reference(model: nn.Module, x: torch.Tensor, layer: str, cls: int, zero) -> torch.Tensor:
    """Whole forwards, channel k zeroed by a hook on the layer's own output: the weights w_k = (y - y_k) / y and the
    layer's output."""
    module = model.get_submodule(layer)
    with torch.no_grad():
        y = model(x)[0, cls]
        store = {}
        h = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.clone()))
        model(x)
        h.remove()
        a = store["a"]
        k = a.shape[-1]
        ys = []
        for c in range(k):
            h = module.register_forward_hook(lambda m, i, o, c=c: zero(o, c))
            ys.append(model(x)[0, cls])
            h.remove()
        return (y - torch.stack(ys)) / y, a


def _zero_patch_tokens(prefix: int):
    def zero(o: torch.Tensor, c: int) -> torch.Tensor:
        o = o.clone()
        o[:, prefix:, c] = 0
        return o

    return zero


def _zero_last(o: torch.Tensor, c: int) -> torch.Tensor:
    o = o.clone()
    o[..., c] = 0
    return o


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("replay", [True, False])
def test_ablation_on_deit_tokens_equals_whole_forwards(deit, replay):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    layer = "blocks.1.norm1"
    before = _hooks(deit)
    e = camkit.explain(
        deit, x, "ablationcam", layer, targets=3, perturbation=PerturbationOptions(replay=replay)
    )
    w, a = _reference(deit, x, layer, 3, _zero_patch_tokens(2))  # distilled: class + distillation tokens
    grid = a[0, 2:].reshape(4, 4, -1).permute(2, 0, 1)
    expected = torch.einsum("k,khw->hw", w, grid)
    torch.testing.assert_close(e.raw[layer][0], expected, rtol=1e-3, atol=1e-4)
    assert _hooks(deit) == before


def test_ablation_on_swin_channels_last_and_token_layers(swin):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    before = _hooks(swin)
    # a block's output is channels-last [B, h, w, C]; norm2 inside a block sees tokens [B, h*w, C] (no prefix)
    # (inside a block the replay cannot run: the residual's batch of 1 meets the n ablations; camkit falls back to
    # whole forwards, with a warning)
    for layer, grid_of, replays in (
        ("layers.1.blocks.0", lambda a: a[0], True),
        ("layers.3.blocks.1.norm2", lambda a: a[0].reshape(2, 2, -1), False),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e = camkit.explain(swin, x, "ablationcam", layer, targets=1)
        fell_back = any("running whole forwards" in str(w.message) for w in caught)
        assert fell_back is not replays
        w, a = _reference(swin, x, layer, 1, _zero_last)
        grid = grid_of(a)
        expected = torch.einsum("k,hwk->hw", w, grid)
        torch.testing.assert_close(e.raw[layer][0], expected, rtol=1e-3, atol=1e-4)
    assert _hooks(swin) == before


def test_custom_reshape_cannot_be_fed_back_and_says_so(deit):
    x = torch.randn(1, 3, 64, 64)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 2:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    with pytest.raises(ValueError, match="reshape="):
        camkit.explain(deit, x, "ablationcam", "blocks.1.norm1", reshape=reshape)
    assert _hooks(deit) == 0
