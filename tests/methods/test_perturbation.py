"""Score-CAM, SS-CAM, IS-CAM and Ablation-CAM against one-mask-at-a-time references written from the papers.

Each reference below captures the target layer with its own forward hook, then runs one masked (or ablated)
input at a time through the whole model: no batching, no replay, no skipped work. camkit's batched, replayed,
shortcut version must give the same signed map (``Explanation.raw``) to float tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camkit
from camkit.core.accel import CHECK_ROWS
from camkit.methods import engine as pm
from camkit.methods.perturbation import PerturbationOptions
from testbed import TinyGapNet, assert_unchanged, snapshot


class ConvFeatures(nn.Module):
    """stem -> ``features`` (6 channels, stride 2) -> ReLU ``act`` -> mean -> fc, seeded; subclasses edit channels."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.features = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.features(self.stem(x)))
        return self.fc(a.mean(dim=(2, 3)))


class ConstantChannels(ConvFeatures):
    """Conv features where channel 0 is constant (bias only) and channel 1 is all zero (dead ReLU)."""

    def __init__(self) -> None:
        super().__init__(seed=3)
        with torch.no_grad():
            self.features.weight[0].zero_()
            self.features.bias[0] = 0.7
            self.features.weight[1].zero_()
            self.features.bias[1] = -1.0


class ConcatSkip(nn.Module):
    """The target's output is concatenated with an earlier tensor: replay with a batch-1 prefix cannot work."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.features = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.stem(x))
        a = self.features(s)
        return self.fc(torch.cat([s, a], dim=1).mean(dim=(2, 3)))


class CountCalls(nn.Module):
    """Wraps a module; records how many hooks are attached at each call and the batch size it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((len(self._forward_hooks), x.shape[0]))
        return self.inner(x)


def _activations(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    box: list[Tensor] = []
    h = layer.register_forward_hook(lambda _m, _i, o: box.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return box[-1]


def _norm_mask(a: Tensor, size: tuple[int, int]) -> Tensor | None:
    up = F.interpolate(a[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    if up.max() == up.min():
        return None
    return (up - up.min()) / (up.max() - up.min())


def ref_scorecam(model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int]) -> Tensor:
    """The Score-CAM authors' loop: w_k = softmax(f(X * H_k))[c], constant channels skipped."""
    a = _activations(model, layer, x)
    maps = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(a.shape[0]):
            for k in range(a.shape[1]):
                m = _norm_mask(a[b, k], tuple(x.shape[-2:]))
                if m is None:
                    continue
                p = torch.softmax(model(x[b : b + 1] * m), dim=1)[0, classes[b]]
                maps[b] += p * a[b, k]
    return maps


def ref_scorecam_channel_softmax(model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int]) -> Tensor:
    """pytorch-grad-cam / torchcam: softmax over channels of the masked logits; a constant channel's mask is 0."""
    a = _activations(model, layer, x)
    maps = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(a.shape[0]):
            logits = []
            for k in range(a.shape[1]):
                m = _norm_mask(a[b, k], tuple(x.shape[-2:]))
                m = torch.zeros(x.shape[-2:]) if m is None else m
                logits.append(model(x[b : b + 1] * m)[0, classes[b]])
            w = torch.softmax(torch.stack(logits), dim=0)
            maps[b] = torch.einsum("k,khw->hw", w, a[b])
    return maps


def ref_sscam(
    model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int], n: int, std: float, seed: int
) -> Tensor:
    a = _activations(model, layer, x)
    maps = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(a.shape[0]):
            for k in range(a.shape[1]):
                m = _norm_mask(a[b, k], tuple(x.shape[-2:]))
                if m is None:
                    continue
                # The noise is an input of the method: the same seeded draws as camkit's, one per sample.
                g = torch.Generator().manual_seed(seed * 1_000_003 + b * a.shape[1] + k)
                noise = torch.randn(n, *x.shape[-2:], generator=g) * std
                s = sum(
                    torch.softmax(model(x[b : b + 1] * (m + noise[i])), dim=1)[0, classes[b]]
                    for i in range(n)
                )
                maps[b] += (s / n) * a[b, k]
    return maps


def ref_iscam(model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int], n: int) -> Tensor:
    a = _activations(model, layer, x)
    maps = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(a.shape[0]):
            for k in range(a.shape[1]):
                m = _norm_mask(a[b, k], tuple(x.shape[-2:]))
                if m is None:
                    continue
                s = sum(
                    torch.softmax(model(x[b : b + 1] * (i / n) * m), dim=1)[0, classes[b]]
                    for i in range(1, n + 1)
                )
                maps[b] += (s / n) * a[b, k]
    return maps


def ref_ablation(
    model: nn.Module, layer: nn.Module, x: Tensor, classes: list[int], gradcam_min: bool = False
) -> Tensor:
    """Desai & Ramaswamy: w_k = (y_c - y_c^k) / y_c, channel k zeroed in a whole forward, one at a time."""
    a = _activations(model, layer, x)
    maps = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(a.shape[0]):
            y = model(x[b : b + 1])[0, classes[b]]
            low = a[b].min()
            value = 0.0 if (not gradcam_min or low == 0) else float(low - 1e7)
            for k in range(a.shape[1]):

                def zero_k(_m: nn.Module, _i: object, o: Tensor, k: int = k, value: float = value) -> Tensor:
                    o = o.clone()
                    o[:, k] = value
                    return o

                h = layer.register_forward_hook(zero_k)
                yk = model(x[b : b + 1])[0, classes[b]]
                h.remove()
                maps[b] += ((y - yk) / y) * a[b, k]
    return maps


def _classes(model: nn.Module, x: Tensor) -> list[int]:
    with torch.no_grad():
        return model(x).argmax(dim=1).tolist()


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return TinyGapNet(k=7).eval()


@pytest.fixture
def xs() -> Tensor:
    torch.manual_seed(5)
    return torch.randn(3, 3, 16, 16)


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(
        a.float(), b.float(), rtol=1e-4, atol=1e-5 * float(b.abs().max().clamp_min(1e-3))
    )


@pytest.mark.parametrize("batch_size", [1, 5, None])
def test_scorecam_matches_reference(net: nn.Module, xs: Tensor, batch_size: int | None) -> None:
    ref = ref_scorecam(net, net.features, xs, _classes(net, xs))
    e = camkit.explain(
        net, xs, "scorecam", "features", perturbation=PerturbationOptions(batch_size=batch_size)
    )
    _close(e.raw["features"], ref)


def test_scorecam_channel_softmax_variant(net: nn.Module, xs: Tensor) -> None:
    classes = _classes(net, xs)
    ref = ref_scorecam_channel_softmax(net, net.features, xs, classes)
    e = camkit.explain(
        net, xs, "scorecam", "features", perturbation=PerturbationOptions(weighting="channel-softmax")
    )
    _close(e.raw["features"], ref)
    # ... and it is not the paper's map
    paper = ref_scorecam(net, net.features, xs, classes)
    assert not torch.allclose(e.raw["features"], paper, rtol=1e-3)


def test_sscam_and_iscam_match_reference(net: nn.Module, xs: Tensor) -> None:
    classes = _classes(net, xs)
    opts = PerturbationOptions(batch_size=7, samples=4, noise_std=0.5, seed=3)
    e = camkit.explain(net, xs, "sscam", "features", perturbation=opts)
    _close(e.raw["features"], ref_sscam(net, net.features, xs, classes, 4, 0.5, 3))
    e = camkit.explain(
        net, xs, "iscam", "features", perturbation=PerturbationOptions(batch_size=3, samples=5)
    )
    _close(e.raw["features"], ref_iscam(net, net.features, xs, classes, 5))


@pytest.mark.parametrize("replay", [True, False])
def test_ablation_matches_reference(net: nn.Module, xs: Tensor, replay: bool) -> None:
    classes = _classes(net, xs)
    e = camkit.explain(
        net, xs, "ablationcam", "features", perturbation=PerturbationOptions(batch_size=4, replay=replay)
    )
    _close(e.raw["features"], ref_ablation(net, net.features, xs, classes))


def test_ablation_gradcam_min_variant(nonlinear: nn.Module, xs: Tensor) -> None:
    """On a layer with negative activations grad-cam's min - 1e7 differs from the paper's zero."""
    layer = nonlinear.head[0]  # a conv: signed activations
    classes = _classes(nonlinear, xs)
    e = camkit.explain(
        nonlinear, xs, "ablationcam", "head.0", perturbation=PerturbationOptions(ablation="gradcam-min")
    )
    _close(e.raw["head.0"], ref_ablation(nonlinear, layer, xs, classes, gradcam_min=True))
    paper = camkit.explain(nonlinear, xs, "ablationcam", "head.0")
    _close(paper.raw["head.0"], ref_ablation(nonlinear, layer, xs, classes))
    assert not torch.allclose(paper.raw["head.0"], e.raw["head.0"], rtol=1e-2)


def test_ablation_replay_runs_only_the_tail(xs: Tensor) -> None:
    torch.manual_seed(0)
    net = TinyGapNet(k=7).eval()
    stem = CountCalls(net.features[0])
    net.features[0] = stem
    # accelerate=False: the capture runs on the model itself (the prepared copy's check would run it in pieces)
    e = camkit.explain(
        net, xs, "ablationcam", "features.2", perturbation=PerturbationOptions(batch_size=4), accelerate=False
    )
    # the capture forward sees the batch of 3; every replay runs the layers before the target on ONE image
    assert stem.seen[0] == (0, 3)
    assert all(bs == 1 for _, bs in stem.seen[1:])
    assert len(stem.seen) - 1 == 3 * 2  # 3 images x ceil(7 / 4) batches (first one has the check row)
    assert torch.isfinite(e.maps).all()


def test_ablation_falls_back_when_replay_cannot_work(xs: Tensor) -> None:
    net = ConcatSkip().eval()
    classes = _classes(net, xs)
    before = snapshot(net)
    with pytest.warns(RuntimeWarning, match="replaying the layers after 'features' does not work") as got:
        e = camkit.explain(net, xs, "ablationcam", "features", perturbation=PerturbationOptions(batch_size=2))
    assert len(got) == 1
    _close(e.raw["features"], ref_ablation(net, net.features, xs, classes))
    assert_unchanged(before, net)


def test_constant_channels_cost_nothing(xs: Tensor) -> None:
    net = ConstantChannels().eval()
    classes = _classes(net, xs)
    a = _activations(net, net.act, xs)
    flat = a.flatten(2)
    assert (flat[:, 0].amax(1) == flat[:, 0].amin(1)).all() and (flat[:, 1] == 0).all()
    refs = (
        ref_scorecam(net, net.act, xs, classes),
        ref_scorecam_channel_softmax(net, net.act, xs, classes),
        ref_ablation(net, net.act, xs, classes),
    )
    constant = int((flat.amax(2) == flat.amin(2)).sum())
    counter = CountCalls(net.stem)
    net.stem = counter
    # accelerate=False: the shared capture runs on the model itself (its first forward, skipped below by [1:])
    exact = PerturbationOptions(
        batch_size=64, channels_last=False
    )  # no first-batch layout check: exact counts
    e = camkit.explain(net, xs, "scorecam", "act", perturbation=exact, accelerate=False)
    _close(e.raw["act"], refs[0])
    assert sum(bs for _, bs in counter.seen[1:]) == 3 * 6 - constant  # no forward for a constant channel
    # By default on CPU the whole batch runs the faster way (here: channels-last inputs to the model itself, which
    # has no BatchNorm to fold), and once per model its first CHECK_ROWS rows run on the model as given too, to
    # check they agree; a second call reuses the checked path and gives the same map, bit for bit.
    counter.seen.clear()
    e = camkit.explain(
        net, xs, "scorecam", "act", perturbation=PerturbationOptions(batch_size=64), accelerate=False
    )
    _close(e.raw["act"], refs[0])
    n, k = 3 * 6 - constant, CHECK_ROWS
    assert [bs for _, bs in counter.seen[1:]] == [n, k]
    counter.seen.clear()
    again = camkit.explain(
        net, xs, "scorecam", "act", perturbation=PerturbationOptions(batch_size=64), accelerate=False
    )
    assert torch.equal(again.raw["act"], e.raw["act"])
    assert [bs for _, bs in counter.seen[1:]] == [n]
    # channel-softmax: constant channels score as the zero image, computed once per image (one batch of 3)
    counter.seen.clear()
    opts = PerturbationOptions(weighting="channel-softmax", batch_size=64, channels_last=False)
    e = camkit.explain(net, xs, "scorecam", "act", perturbation=opts, accelerate=False)
    _close(e.raw["act"], refs[1])
    assert sum(bs for _, bs in counter.seen[1:]) == 3 * 6 - constant + 3
    # Ablation: zeroing an all-zero channel changes nothing -> no forward for it; replay runs the prefix on one
    # image per batch, so the stem sees 3 single-image calls for 3 images
    counter.seen.clear()
    e = camkit.explain(
        net, xs, "ablationcam", "act", perturbation=PerturbationOptions(batch_size=64), accelerate=False
    )
    _close(e.raw["act"], refs[2])
    assert [bs for _, bs in counter.seen[1:]] == [1, 1, 1]


@pytest.mark.parametrize("method", ["scorecam", "sscam", "iscam", "ablationcam"])
def test_all_channels_flat_gives_zeros_not_nan(method: str) -> None:
    torch.manual_seed(0)
    net = TinyGapNet(k=4).eval()
    with torch.no_grad():
        net.features[2].weight.zero_()
        net.features[2].bias.fill_(0.3)
    x = torch.randn(2, 3, 16, 16)
    e = camkit.explain(net, x, method, "features")
    assert torch.isfinite(e.maps).all() and torch.isfinite(e.raw["features"]).all()
    assert (e.maps == 0).all()


def test_hooks_do_not_fire_during_masked_forwards(xs: Tensor) -> None:
    torch.manual_seed(0)
    net = TinyGapNet(k=7).eval()
    wrapped = CountCalls(net.features)
    net.features = wrapped  # type: ignore[assignment]
    before = snapshot(net)
    camkit.explain(net, xs, "scorecam", "features", perturbation=PerturbationOptions(batch_size=4))
    hooks = [n_hooks for n_hooks, _ in wrapped.seen]
    # the capture forwards first (our hook on; the prepared copy's check runs the model in pieces), then the
    # masked forwards, none with a hook
    first_masked = hooks.index(0)
    assert first_masked >= 1 and set(hooks[:first_masked]) == {1} and set(hooks[first_masked:]) == {0}
    assert_unchanged(before, net)


def test_model_unchanged_after_error_mid_way(net: nn.Module, xs: Tensor) -> None:
    before = snapshot(net)
    calls = {"n": 0}

    def target(out: Tensor) -> Tensor:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return out[:, 0]

    for method in ("scorecam", "ablationcam"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="boom"):
            camkit.explain(
                net, xs, method, "features", targets=target, perturbation=PerturbationOptions(batch_size=2)
            )
        assert_unchanged(before, net)


def test_topk_targets_share_the_forwards(net: nn.Module, xs: Tensor) -> None:
    with torch.no_grad():
        top2 = net(xs).topk(2, dim=1).indices
    e = camkit.explain(net, xs, "scorecam", "features", targets=camkit.TopK(2))
    for t in range(2):
        _close(e.raw["features"][:, t], ref_scorecam(net, net.features, xs, top2[:, t].tolist()))
    e = camkit.explain(net, xs, "ablationcam", "features", targets=camkit.TopK(2))
    _close(e.raw["features"][:, 1], ref_ablation(net, net.features, xs, top2[:, 1].tolist()))


def test_callable_target_uses_its_value(net: nn.Module, xs: Tensor) -> None:
    def diff(out: Tensor) -> Tensor:
        return out[:, 1] - out[:, 0]

    e = camkit.explain(net, xs, "scorecam", "features", targets=diff)
    a = _activations(net, net.features, xs)
    ref = torch.zeros(a.shape[0], *a.shape[2:])
    with torch.no_grad():
        for b in range(3):
            for k in range(a.shape[1]):
                m = _norm_mask(a[b, k], (16, 16))
                if m is not None:
                    ref[b] += diff(net(xs[b : b + 1] * m))[0] * a[b, k]
    _close(e.raw["features"], ref)


def test_top_channels_option(net: nn.Module, xs: Tensor) -> None:
    exact = camkit.explain(net, xs, "scorecam", "features")
    same = camkit.explain(net, xs, "scorecam", "features", perturbation=PerturbationOptions(top_channels=7))
    _close(same.raw["features"], exact.raw["features"])
    seen: list[tuple[int, int]] = []
    approx = camkit.explain(
        net,
        xs,
        "scorecam",
        "features",
        perturbation=PerturbationOptions(top_channels=2, progress=lambda d, t: seen.append((d, t))),
    )
    assert seen[-1][0] == seen[-1][1] <= 3 * 2
    assert not torch.allclose(approx.raw["features"], exact.raw["features"])


def test_progress_reports_every_forward(net: nn.Module, xs: Tensor) -> None:
    seen: list[tuple[int, int]] = []
    camkit.compare(
        net,
        xs,
        ["scorecam", "ablationcam"],
        "features",
        perturbation=PerturbationOptions(batch_size=3, progress=lambda d, t: seen.append((d, t))),
    )
    assert seen and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="weighting"):
        PerturbationOptions(weighting="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        PerturbationOptions(batch_size=0)
    with pytest.raises(ValueError, match="channels_last must be None, True or False"):
        PerturbationOptions(channels_last="yes")  # type: ignore[arg-type]


def test_auto_batch_size_is_bounded(net: nn.Module, xs: Tensor) -> None:
    ctx = pm.PerturbationContext(
        model=net,
        x=xs,
        layer=net.features,
        layer_name="features",
        calls=1,
        activations=_activations(net, net.features, xs),
        output=net(xs).detach(),
        classes=torch.zeros(3, dtype=torch.long),
        target_fn=None,
        output_fn=lambda o: o,  # type: ignore[arg-type,return-value]
    )
    assert 1 <= pm.batch_size_for(ctx) <= 64


@pytest.mark.slow
def test_pretrained_peaks_on_the_object(pretrained) -> None:
    """Ablation-CAM (exact: the replayed tail after bn2 is pooling + classifier) and Score-CAM on the 32 most
    active channels put their peak on the cat and on the cup, in original pixels."""
    from camkit.core.postprocess import upsample

    cat, coffee = camkit.sample_image("chelsea"), camkit.sample_image("coffee")
    for method, opts in (
        ("ablationcam", PerturbationOptions()),
        ("scorecam", PerturbationOptions(top_channels=32)),
    ):
        e = camkit.explain(
            pretrained.model, [cat, coffee], method, preprocess=pretrained.preprocess, perturbation=opts
        )
        for i, (img, box) in enumerate(((cat, (100, 40, 360, 300)), (coffee, (170, 15, 420, 300)))):
            w, h = img.size
            flat = int(upsample(e.maps[i], (h, w)).argmax())
            x, y = flat % w, flat // w
            assert box[0] <= x <= box[2] and box[1] <= y <= box[3], f"{method} peak at {(x, y)} on image {i}"


@pytest.mark.slow
def test_cli_perturbation_options(tmp_path) -> None:
    from typer.testing import CliRunner

    from camkit.cli import app

    res = CliRunner().invoke(
        app,
        [
            "explain",
            "--methods",
            "scorecam",
            "--top-channels",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "chelsea_scorecam.png").exists()
    res = CliRunner().invoke(
        app, ["explain", "--methods", "scorecam", "--weighting", "softmax", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "weighting" in res.output


class DuplicateChannels(ConvFeatures):
    """Channel 3 of ``features`` is channel 2 times 2.5 (weights and bias): after the ReLU their maps are equal
    up to scale, so they have the same normalised mask."""

    def __init__(self) -> None:
        super().__init__(seed=6)
        with torch.no_grad():
            self.features.weight[3] = 2.5 * self.features.weight[2]
            self.features.bias[3] = 2.5 * self.features.bias[2]


@pytest.mark.parametrize("method", ["scorecam", "iscam"])
def test_equal_masks_share_one_forward(xs: Tensor, method: str) -> None:
    net = DuplicateChannels().eval()
    classes = _classes(net, xs)
    a = _activations(net, net.act, xs)
    assert not torch.equal(a[:, 2], a[:, 3])  # different maps, equal once normalised
    ref = (
        ref_scorecam(net, net.act, xs, classes)
        if method == "scorecam"
        else ref_iscam(net, net.act, xs, classes, 4)
    )
    counter = CountCalls(net.stem)
    net.stem = counter
    opts = PerturbationOptions(batch_size=64, channels_last=False, samples=4)
    # accelerate=False: the shared capture runs on the model itself (its first forward, skipped below by [1:])
    e = camkit.explain(net, xs, method, "act", perturbation=opts, accelerate=False)
    _close(e.raw["act"], ref)  # channel 3 gets channel 2's score
    flat = a.flatten(2)
    live = int((flat.amax(2) != flat.amin(2)).sum())
    per_mask = 1 if method == "scorecam" else 4
    assert sum(bs for _, bs in counter.seen[1:]) == (live - 3) * per_mask  # one pair fewer per image
    # SS-CAM's noisy masks differ per channel: nothing shared there.
    counter.seen.clear()
    camkit.explain(
        net,
        xs,
        "sscam",
        "act",
        perturbation=PerturbationOptions(batch_size=64, channels_last=False, samples=2),
        accelerate=False,
    )
    assert sum(bs for _, bs in counter.seen[1:]) == live * 2
