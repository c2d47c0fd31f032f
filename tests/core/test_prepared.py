"""The capture on a prepared copy (camkit.core.prepared): BatchNorm (and timm BatchNormAct2d) folded, channels-last
on CPU; the same maps as the model as given for every method kind, checked once, falling back with one warning,
deterministic, the user's model untouched."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit.core import accel, prepared
from camkit.core.accel import AccelWarning, FoldedNormAct, fold_batchnorm
from testbed import assert_unchanged, in_threads, randomize_norms, snapshot

SIDE = 32


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    accel.clear_cache()
    yield
    accel.clear_cache()


class BnNet(nn.Module):
    """conv-BN-ReLU stem, a residual conv-BN block, GAP + Linear (CAM-compatible)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        )
        self.head = nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.stem(x))
        return self.fc(self.pool(self.head(h)).flatten(1))


def tiny_timm_efficientnet() -> nn.Module:
    """A timm EfficientNet of two stages (BatchNormAct2d everywhere), 5 classes."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c16"]])
    return randomize_norms(EfficientNet(arch, num_classes=5, stem_size=8, num_features=24))


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=SIDE, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5
    ).eval()


def _x(n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def _used(model: nn.Module) -> list[prepared.PreparedCopy]:
    """The prepared copies of ``model`` in use (made and not dropped)."""
    entry = accel._CACHE.get(model)
    kept = [] if entry is None else list(entry.kept.values())
    return [p for p in kept if isinstance(p, prepared.PreparedCopy) and p.failed is None]


def _assert_same(fast: dict[str, camkit.Explanation], plain: dict[str, camkit.Explanation]) -> None:
    for name, e in plain.items():
        f = fast[name]
        assert e.classes is not None and f.classes is not None
        assert torch.equal(e.classes, f.classes), name
        torch.testing.assert_close(f.maps, e.maps, rtol=0, atol=1e-5, msg=name)
        for layer, raw in e.raw.items():
            scale = float(raw.abs().max().clamp_min(1e-12))
            assert float((f.raw[layer] - raw).abs().max()) <= 1e-4 * scale, (name, layer)


# --------------------------------------------------------------------------------------------- folding


def test_fold_batchnormact_keeps_names_and_outputs() -> None:
    net = tiny_timm_efficientnet()
    x = _x()
    twin, n = fold_batchnorm(net, x[:1])
    assert n == 7  # every conv -> BatchNormAct2d pair
    assert isinstance(twin.get_submodule("bn2"), FoldedNormAct)
    assert isinstance(twin.get_submodule("bn2.act"), nn.ReLU)  # a name under the norm still resolves
    assert type(net.get_submodule("bn2")).__name__ == "BatchNormAct2d"  # the model is not touched
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-4, atol=1e-5)
    kept, n_kept = fold_batchnorm(net, x[:1], keep=["conv_head"])
    assert (
        n_kept == 6 and type(kept.get_submodule("conv_head")) is nn.Conv2d
    )  # a target conv keeps its output
    assert torch.equal(kept.get_submodule("conv_head").weight, net.get_submodule("conv_head").weight)


# --------------------------------------------------------------------------------------------- equality


LAYER_AND_OWN = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")
PERTURB_AND_PASSES = ("scorecam", "fullgrad", "guided-gradcam", "smoothgradcam++(n=2)")


@pytest.mark.parametrize(
    ("build", "layers"),
    [(lambda: randomize_norms(BnNet()), "head,block"), (tiny_timm_efficientnet, "bn2,blocks.1")],
    ids=["batchnorm", "timm-batchnormact"],
)
def test_every_method_kind_same_maps_on_the_copy(build: object, layers: str) -> None:
    assert callable(build)
    net, x = build(), _x()
    methods = LAYER_AND_OWN + PERTURB_AND_PASSES
    before = snapshot(net)
    plain = camkit.compare(net, x, methods, layers=layers, accelerate=False)
    assert not _used(net)  # accelerate=False: no copy made
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        fast = camkit.compare(net, x, methods, layers=layers)  # checked on this first call
        again = camkit.compare(net, x, methods, layers=layers)  # served by the checked copy
    (prep,) = _used(net)
    assert prep.folds > 0 and prep.channels_last and prep.checked(x)
    _assert_same(fast, plain)
    for name, e in fast.items():
        assert torch.equal(again[name].maps, e.maps), f"{name} is not deterministic"
    last = layers.split(",")[0]  # CAM: the layer that global pooling reads
    cam = camkit.explain(net, x, "cam", layers=last)
    _assert_same({"cam": cam}, {"cam": camkit.explain(net, x, "cam", layers=last, accelerate=False)})
    assert_unchanged(before, net)


def test_attention_and_topk_same_maps_on_the_copy() -> None:
    vit, x = tiny_vit(), _x()
    plain = camkit.compare(vit, x, ("gradcam", "rollout", "legrad"), accelerate=False)
    fast = camkit.compare(vit, x, ("gradcam", "rollout", "legrad"))
    assert _used(vit)  # channels-last input (nothing to fold)
    _assert_same(fast, plain)
    net = randomize_norms(BnNet())
    top = camkit.explain(net, x, "layercam", layers="head", targets=camkit.TopK(3))
    top_plain = camkit.explain(net, x, "layercam", layers="head", targets=camkit.TopK(3), accelerate=False)
    assert top.classes is not None and top_plain.classes is not None
    assert torch.equal(top.classes, top_plain.classes)
    torch.testing.assert_close(top.maps, top_plain.maps, rtol=0, atol=1e-5)


def test_conv_target_layer_is_not_folded() -> None:
    net, x = randomize_norms(BnNet()), _x()
    fast = camkit.explain(net, x, "gradcam", layers="head.0")  # the conv itself: its own output, not BN's
    plain = camkit.explain(net, x, "gradcam", layers="head.0", accelerate=False)
    _assert_same({"g": fast}, {"g": plain})
    (prep,) = _used(net)
    assert type(prep.layers["head.0"]) is nn.Conv2d and prep.folds == 2


# --------------------------------------------------------------------------------------------- fallback


class SkipBeforeNorm(nn.Module):
    """The conv's output is also added after its BatchNorm: folding changes the sum (the check must catch it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.fc(self.feat(self.bn(y) + y).mean(dim=(2, 3)))


class ViewsFeatures(nn.Module):
    """``.view`` of a feature map: raises on a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIDE * SIDE, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.feat(x))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: randomize_norms(SkipBeforeNorm()), "differs from the model's"),
        (lambda: ViewsFeatures().eval(), "it raised"),
    ],
    ids=["mismatch", "raises"],
)
def test_fallback_warns_once_and_gives_the_models_maps(build: object, why: str) -> None:
    assert callable(build)
    net, x = build(), _x()
    before = snapshot(net)
    plain = camkit.explain(net, x, "gradcam", layers="feat", accelerate=False)
    with pytest.warns(AccelWarning, match=why) as seen:
        first = camkit.explain(net, x, "gradcam", layers="feat")
    assert len([w for w in seen if issubclass(w.category, AccelWarning)]) == 1
    assert any("accelerate=False" in str(w.message) for w in seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)  # warned once: the copy is dropped for this model
        second = camkit.explain(net, x, "gradcam", layers="feat")
    assert not _used(net)
    for e in (first, second):
        assert torch.equal(e.maps, plain.maps)  # the model as given ran the capture
    assert_unchanged(before, net)


def test_forced_mismatch_by_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    net, x = randomize_norms(BnNet()), _x()
    monkeypatch.setattr(prepared, "RTOL", -1.0)  # no map can agree
    with pytest.warns(AccelWarning, match="its map of 'head'"):
        e = camkit.explain(net, x, "gradcam", layers="head")
    assert torch.equal(e.maps, camkit.explain(net, x, "gradcam", layers="head", accelerate=False).maps)


def test_disagreement_names_classes_and_missing_gradients() -> None:
    a = torch.ones(1, 2, 3, 3)
    cap = camkit.core.capture.Captured(torch.zeros(1, 3), {"l": a}, {"l": a}, torch.zeros(1), ["l"], {"l": 1})
    same = prepared.disagreement(cap, cap, torch.tensor([0]), torch.tensor([0]))
    assert same is None
    assert "other classes" in str(prepared.disagreement(cap, cap, torch.tensor([0]), torch.tensor([1])))
    no_grad = camkit.core.capture.Captured(cap.output, {"l": a}, {}, cap.scores, ["l"], {"l": 1})
    assert prepared.disagreement(cap, no_grad, None, None) is not None


# --------------------------------------------------------------------------------------------- the model


def test_model_untouched_after_an_exception_mid_way() -> None:
    net, x = randomize_norms(BnNet()), _x()
    for p in net.fc.parameters():
        p.requires_grad_(False)  # a mixed requires_grad state to keep
    before = snapshot(net)
    camkit.explain(net, x, "gradcam", layers="head")  # the copy is checked and in use

    def broken(out: Tensor) -> Tensor:
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        camkit.explain(net, x, "gradcam", layers="head", targets=broken)
    assert_unchanged(before, net)
    assert all(not m.training for m in net.modules())
    assert _used(net)


def test_not_used_where_the_model_must_run_itself() -> None:
    net, x = randomize_norms(BnNet()), _x()
    seen: list[int] = []
    handle = net.head.register_forward_hook(lambda m, i, o: seen.append(1))  # the user's own hook
    try:
        camkit.explain(net, x, "gradcam", layers="head")
    finally:
        handle.remove()
    assert seen == [1] and not _used(net)
    camkit.explain(net, x, "gradcam", layers=net.head)  # a module: found under its name
    assert _used(net)
    with pytest.raises(TypeError, match="accelerate must be True or False"):
        camkit.explain(net, x, "gradcam", accelerate="yes")  # type: ignore[arg-type]


def test_threads_share_the_copy() -> None:
    net, x = randomize_norms(BnNet()), _x(4)
    expected = camkit.explain(net, x, "gradcam++", layers="head").maps
    before = snapshot(net)
    out = in_threads(lambda: camkit.explain(net, x, "gradcam++", layers="head").maps, threads=3, calls=3)
    assert len(out) == 9
    assert all(torch.equal(m, expected) for m in out)
    assert_unchanged(before, net)
    assert len(_used(net)) == 1


# --------------------------------------------------------------------------------------------- memory


def test_copy_shares_unfolded_weights_and_folds_in_float64() -> None:
    net, x = randomize_norms(BnNet()), _x()
    twin, n = fold_batchnorm(net, x[:1], share=True)
    assert n == 3
    assert twin.fc.weight.data_ptr() == net.fc.weight.data_ptr()  # unfolded: the model's storage, no copy
    assert not twin.fc.weight.requires_grad and net.fc.weight.requires_grad  # the model's flags untouched
    conv, bn = net.block[0], net.block[1]
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    want_w = (conv.weight.double() * s[:, None, None, None]).float()
    want_b = ((conv.bias.double() - bn.running_mean.double()) * s + bn.bias.double()).float()
    folded = twin.block[0]
    assert folded.weight.data_ptr() != conv.weight.data_ptr()
    assert torch.equal(folded.weight, want_w) and torch.equal(folded.bias, want_b)  # rounded once
    assert type(net.block[1]) is nn.BatchNorm2d  # the model keeps its BatchNorm
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-6)


class DataDependent(nn.Module):
    """A forward that reads a value (fails on meta tensors): the pairs are found on the real copy instead."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.feat(x)
        if float(h.mean()) > 1e9:  # never true; reads data
            h = h * 0
        return self.fc(h.mean(dim=(2, 3)))


def test_pairs_found_on_meta_tensors_else_on_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    devices: list[str] = []
    real = accel._conv_norm_pairs

    def spy(twin: nn.Module, convs: object, norms: object, example: Tensor) -> object:
        devices.append(example.device.type)
        return real(twin, convs, norms, example)  # type: ignore[arg-type]

    monkeypatch.setattr(accel, "_conv_norm_pairs", spy)
    assert fold_batchnorm(randomize_norms(BnNet()), _x(1))[1] == 3
    assert devices == ["meta"]  # no forward on real tensors
    devices.clear()
    net, x = randomize_norms(DataDependent()), _x()
    twin, n = fold_batchnorm(net, x[:1])
    assert n == 1 and devices == ["meta", "cpu"]
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-6)


def test_first_call_runs_the_copy_then_the_model_a_few_images_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, x = randomize_norms(BnNet()), _x(5)
    runs: list[tuple[bool, int, bool]] = []  # (the model as given?, images, the copy's graph already freed?)
    graphs: list[object] = []
    forward = camkit.core.capture.LayerCapture.forward

    def spy(self: object, model: nn.Module, inputs: Tensor, output_fn: object = None) -> Tensor:
        runs.append((model is net, inputs.shape[0], all(g() is None for g in graphs)))
        out = forward(self, model, inputs, output_fn)  # type: ignore[arg-type]
        if model is not net:
            graphs.append(weakref.ref(out))  # the copy's output, holding its autograd graph
        return out

    monkeypatch.setattr(camkit.core.capture.LayerCapture, "forward", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        first = camkit.explain(net, x, "gradcam", layers="head")
    rows = accel.CHECK_ROWS
    assert runs == [(False, 5, True)] + [(True, min(rows, 5 - i), True) for i in range(0, 5, rows)]
    runs.clear()
    again = camkit.explain(net, x, "gradcam", layers="head")
    assert runs == [(False, 5, True)] and torch.equal(again.maps, first.maps)  # checked: the copy alone
    _assert_same({"g": first}, {"g": camkit.explain(net, x, "gradcam", layers="head", accelerate=False)})


# --------------------------------------------------------------------------------------------- exact check


def _cap(a: Tensor, g: Tensor) -> camkit.core.capture.Captured:
    out = a.flatten(1)[:, :3].clone()
    return camkit.core.capture.Captured(out, {"l": a}, {"l": g}, out[:, 0], ["l"], {"l": 1})


def test_an_image_the_float32_model_gets_wrong_is_judged_against_float64() -> None:
    g = torch.Generator().manual_seed(0)
    a, grad = torch.rand(3, 4, 5, 5, generator=g), torch.rand(3, 4, 5, 5, generator=g)
    got = _cap(a, grad)
    off = grad.clone()
    off[1, 0, 0, 0] += 0.5  # the model's float32 gradient of image 1 is off (a ReLU bend on the other side)
    ref = _cap(a, off)
    cls = torch.zeros(3, dtype=torch.long)
    asked: list[int] = []

    def exact_like(right: camkit.core.capture.Captured) -> Callable[[int], camkit.core.capture.Captured]:
        def run(i: int) -> camkit.core.capture.Captured:
            asked.append(i)
            return prepared._image(right, i)

        return run

    assert "its map of 'l'" in str(prepared.disagreement(ref, got, cls, cls))  # no exact result: fails
    assert prepared.disagreement(ref, got, cls, cls, exact_like(got)) is None  # the copy is the exact one
    assert asked == [1]  # only the image that disagreed was recomputed
    assert prepared.disagreement(ref, got, cls, cls, exact_like(ref)) is not None  # the model was right

    def no_float64(i: int) -> camkit.core.capture.Captured:
        raise RuntimeError("expected scalar type Float")

    assert prepared.disagreement(ref, got, cls, cls, no_float64) is not None


def test_the_check_asks_the_float64_model_when_the_float32_model_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, x = randomize_norms(BnNet()), _x(3)
    rows = prepared.capture_rows

    def off_by_rounding(model: nn.Module, *args: object, **kwargs: object) -> camkit.core.capture.Captured:
        cap = rows(model, *args, **kwargs)  # type: ignore[arg-type]
        if cap.output.dtype == torch.float32:  # the float32 model's gradient of image 0 is off
            cap.gradients["head"][0, 0] += 1.0  # type: ignore[index]
        return cap

    monkeypatch.setattr(camkit.core.pipeline, "capture_rows", off_by_rounding)
    monkeypatch.setattr(prepared, "capture_rows", off_by_rounding)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccelWarning)
        e = camkit.explain(net, x, "gradcam", layers="head")  # the float64 model agrees with the copy
    assert _used(net)
    _assert_same({"g": e}, {"g": camkit.explain(net, x, "gradcam", layers="head", accelerate=False)})
    accel.clear_cache()
    monkeypatch.setattr(accel, "float64_copy", lambda m: (_ for _ in ()).throw(RuntimeError("no float64")))
    monkeypatch.setattr(prepared, "float64_copy", accel.float64_copy)
    with pytest.warns(AccelWarning, match="gradient of 'head'|its map of 'head'"):
        camkit.explain(net, x, "gradcam", layers="head")
    assert not _used(net)
