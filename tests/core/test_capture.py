"""The capture window: exact activations and gradients, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from camkit.core.capture import capture
from testbed import assert_unchanged, snapshot


def reference_grad(model, x, cls, split_at: int):
    """dS/dA for A = output of model.features[split_at], computed the plain way (no in-place, full graph)."""
    feats = model.features
    with torch.no_grad():
        h = x
        for i in range(split_at + 1):
            h = feats[i](h.clone())
    a = h.detach().requires_grad_(True)
    h = a
    for i in range(split_at + 1, len(feats)):
        layer = feats[i]
        h = torch.relu(h) if isinstance(layer, nn.ReLU) else layer(h)
    out = model.fc(model.pool(h).flatten(1))
    score = out.gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(score, a)
    return a.detach(), g


def test_activation_is_conv_output_despite_inplace_relu(tiny, x_small):
    cls = torch.tensor([0, 1, 2, 3])
    cap = capture(
        tiny, x_small, {"features.0": tiny.features[0]}, lambda out: out.gather(1, cls[:, None])[:, 0]
    )
    a_ref, g_ref = reference_grad(tiny, x_small, cls, 0)
    a = cap.activations["features.0"]
    assert (a < 0).any(), "the conv output has negatives; a ReLU-overwritten capture would not"
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(cap.gradients["features.0"], g_ref)


def test_several_layers_one_pass(tiny, x_small):
    cls = torch.tensor([4, 3, 2, 1])
    layers = {"features.2": tiny.features[2], "features.0": tiny.features[0]}
    cap = capture(tiny, x_small, layers, lambda out: out.gather(1, cls[:, None])[:, 0])
    assert cap.order == ["features.0", "features.2"]
    for name, idx in (("features.0", 0), ("features.2", 2)):
        a_ref, g_ref = reference_grad(tiny, x_small, cls, idx)
        torch.testing.assert_close(cap.activations[name], a_ref)
        torch.testing.assert_close(cap.gradients[name], g_ref)


def test_no_graph_before_target_and_no_param_grads(tiny, x_small):
    seen = {}

    def probe(_m, _i, out):
        seen["requires_grad"] = out.requires_grad

    h = tiny.features[0].register_forward_hook(probe)
    try:
        camkit.explain(tiny, x_small, layers="features.2")
    finally:
        h.remove()
    assert seen["requires_grad"] is False, "a graph was recorded before the target layer"
    assert all(p.grad is None for p in tiny.parameters())


@pytest.mark.parametrize("grad_mode", [True, False])
def test_model_unchanged(tiny, x_small, grad_mode):
    tiny.features[0].weight.requires_grad_(False)  # a mix of frozen and trainable parameters
    tiny.fc.weight.grad = torch.ones_like(tiny.fc.weight)  # a stale .grad must survive untouched
    x = x_small.clone()
    with torch.set_grad_enabled(grad_mode):
        before = snapshot(tiny)
        camkit.compare(tiny, x, methods=["gradcam", "gradcam++", "cam"], layers="features.3")
        assert_unchanged(before, tiny)
    assert torch.equal(x, x_small) and not x.requires_grad


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom inside forward")


def test_model_unchanged_after_exception(tiny, x_small):
    tiny.pool = nn.Sequential(Boom()).eval()
    before = snapshot(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        camkit.explain(tiny, x_small, layers="features.0,features.2")
    assert_unchanged(before, tiny)


def test_frozen_model_and_inference_mode_caller(tiny, x_small):
    expected = camkit.explain(tiny, x_small, method="gradcam++", layers="features.2").maps
    for p in tiny.parameters():
        p.requires_grad_(False)
    before = snapshot(tiny)
    with torch.inference_mode():
        x = x_small.clone()
        got = camkit.explain(tiny, x, method="gradcam++", layers="features.2").maps
    assert_unchanged(before, tiny)
    torch.testing.assert_close(got, expected)


def test_train_mode_without_mode_dependent_modules_warns_and_explains(tiny, x_small):
    expected = camkit.explain(tiny, x_small, "gradcam++").maps
    tiny.train()
    before = snapshot(tiny)
    with pytest.warns(UserWarning, match="no mode-dependent modules; explaining it as is; call model.eval"):
        got = camkit.explain(tiny, x_small, "gradcam++").maps
    assert_unchanged(before, tiny)
    assert tiny.training
    assert torch.equal(got, expected)


def test_train_mode_with_mode_dependent_modules_is_refused_and_named(tiny, x_small):
    tiny.features.insert(1, nn.BatchNorm2d(8))
    tiny.drop = nn.Dropout(0.5)  # registered, never called: its mode still matters to the refusal
    for i in range(5):
        tiny.add_module(f"extra{i}", nn.Dropout2d(0.1))
    tiny.train()
    before = snapshot(tiny)
    with pytest.raises(ValueError, match=r"model.eval\(\)") as err:
        camkit.explain(tiny, x_small)
    msg = str(err.value)
    assert "7 module(s)" in msg and "'features.1' (BatchNorm2d)" in msg and "'drop' (Dropout)" in msg
    assert "and 3 more" in msg and "'fc'" not in msg
    assert_unchanged(before, tiny)


def test_eval_root_with_a_training_batchnorm_is_refused(tiny, x_small):
    tiny.features.insert(1, nn.BatchNorm2d(8))
    tiny.eval()
    tiny.features[1].train()
    with pytest.raises(ValueError, match=r"'features.1' \(BatchNorm2d\)"):
        camkit.explain(tiny, x_small)


def test_metrics_apply_the_same_training_mode_rule(tiny, x_small):
    from camkit import metrics

    maps = camkit.explain(tiny, x_small).maps
    expected = metrics.deletion(tiny, x_small, maps, steps=4).auc
    tiny.train()
    with pytest.warns(UserWarning, match="no mode-dependent modules"):
        got = metrics.deletion(tiny, x_small, maps, steps=4).auc
    assert torch.equal(got, expected)
    tiny.features.insert(1, nn.BatchNorm2d(8))
    tiny.train()
    with pytest.raises(ValueError, match=r"'features.1' \(BatchNorm2d\)"):
        metrics.deletion(tiny, x_small, maps, steps=4)


def test_reused_module_keeps_last_call():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    m = Reuse().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="ran 2 times"):
        cap = capture(m, x, {"conv": m.conv}, lambda out: out[:, 0])
    with torch.no_grad():
        second = m.conv(m.conv(x))
    torch.testing.assert_close(cap.activations["conv"], second)
    # d out0 / d A = W[0, k] / (h*w) everywhere
    torch.testing.assert_close(
        cap.gradients["conv"], (m.fc.weight[0] / 64).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    )


def test_layer_that_does_not_run(tiny, x_small):
    tiny.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(RuntimeError, match="did not run"):
        camkit.explain(tiny, x_small, layers="unused")


def _batched_grad_raising(monkeypatch: pytest.MonkeyPatch, error: RuntimeError) -> list[bool]:
    """torch.autograd.grad raising ``error`` for the batched backward only; returns the calls' is_grads_batched."""
    real = torch.autograd.grad
    calls: list[bool] = []

    def grad(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        if kwargs.get("is_grads_batched", False):
            raise error
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


def test_target_gradients_falls_back_only_when_vmap_refuses_an_op(monkeypatch: pytest.MonkeyPatch):
    """The batched backward falls back to one backward per target when vmap cannot run an op (the documented
    case); any other RuntimeError (out of memory, a bug in a backward) propagates instead of being retried."""
    from camkit.core.capture import target_gradients

    leaf = torch.randn(3, 4, requires_grad=True)
    scores = torch.stack([(leaf * 2).sum(dim=1), (leaf**2).sum(dim=1)])  # [T=2, B=3]
    calls = _batched_grad_raising(
        monkeypatch,
        RuntimeError("Batching rule not implemented for aten::foo. We could not generate a fallback."),
    )
    grads = target_gradients(scores, [leaf])
    assert calls == [True, False, False]
    torch.testing.assert_close(grads[0][0], torch.full_like(leaf, 2.0))
    torch.testing.assert_close(grads[1][0], 2 * leaf.detach())
    monkeypatch.undo()
    scores = torch.stack([(leaf * 2).sum(dim=1), (leaf**2).sum(dim=1)])
    calls = _batched_grad_raising(monkeypatch, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError, match="out of memory"):
        target_gradients(scores, [leaf])
    assert calls == [True]
