"""3-D / video models: [B, T, H, W] maps from every layer method, known answers, overlays, GIF/MP4, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

import camkit
from camkit.adapters.video import (
    ClipPreprocess,
    load_clip,
    overlay_frames,
    postprocess_clip,
    read_frames,
    save_animation,
)
from camkit.cli import app
from testbed import assert_unchanged, snapshot

LAYER_METHODS = (
    "gradcam",
    "gradcam++",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "eigencam",
)
T, SIDE = 8, 24


class Tiny3d(nn.Module):
    """A small trainable Conv3d classifier: conv (stride 1) -> conv (stride 2 in t, h, w) -> GAP -> Linear."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(4, 8, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _blob_clips(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Noise clips; class 1 clips hold a bright square in frames 5 and 6 only. -> clips, labels, masks [n,T,H,W]."""
    x = 0.3 * torch.randn(n, 3, T, SIDE, SIDE, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    masks = torch.zeros(n, T, SIDE, SIDE)
    for i in range(n):
        if y[i] == 1:
            r, c = (int(v) for v in torch.randint(0, SIDE - 8, (2,), generator=gen))
            masks[i, 5:7, r : r + 8, c : c + 8] = 1
    return x + 2.0 * masks[:, None], y, masks


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """Tiny3d trained in a second or two to find a square that appears in two frames of eight."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Tiny3d()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        x, y, _ = _blob_clips(12, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def r3d() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.video.r3d_18(weights=None, num_classes=10).eval()


def test_every_layer_method_gives_a_clip_map(trained: nn.Module) -> None:
    x, _, _ = _blob_clips(2, torch.Generator().manual_seed(5))
    x[:, :, 5:7] += 2.0  # the square's frames light up whole: class 1 evidence in both clips
    for method in LAYER_METHODS:
        e = camkit.explain(trained, x, method=method, layers="features.2", targets=1)
        assert e.maps.shape == (2, T, SIDE, SIDE), method
        assert e.raw["features.2"].shape == (2, T // 2, SIDE // 2, SIDE // 2), method
        assert torch.isfinite(e.maps).all() and 0 <= float(e.maps.min()) <= float(e.maps.max()) <= 1, method
        assert e.maps.amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0]), method
    e = camkit.explain(trained, x, method="cam", layers="features.3")
    assert e.maps.shape == (2, T, SIDE, SIDE)
    top = camkit.explain(trained, x, layers="features.0,features.2", targets=camkit.TopK(2))
    assert top.maps.shape == (2, 2, T, SIDE, SIDE)
    assert top.layer_maps["features.0"].shape == (2, 2, T, SIDE, SIDE)


def test_gradcam_on_a_clip_is_the_3d_formula(trained: nn.Module) -> None:
    """w_k = mean over (t, h, w) of dS/dA_k; map = sum_k w_k A_k, computed here by hand with autograd."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, T, SIDE, SIDE)
    e = camkit.explain(trained, x, method="gradcam", layers="features.2", targets=[1, 0])
    acts: list[Tensor] = []

    def keep(_m: nn.Module, _i: object, o: Tensor) -> Tensor:
        acts.append(o)
        return o.clone()  # the in-place ReLU that follows must not overwrite A

    handle = trained.features[2].register_forward_hook(keep)
    try:
        out = trained(x)
    finally:
        handle.remove()
    a = acts[0]
    (g,) = torch.autograd.grad(out[0, 1] + out[1, 0], a)
    w = g.mean(dim=(2, 3, 4))
    want = torch.einsum("bk,bkthw->bthw", w, a.detach())
    torch.testing.assert_close(e.raw["features.2"], want, rtol=1e-5, atol=1e-6)
    # and the maps: ReLU, trilinear resize to the clip, min-max over the whole clip
    up = nn.functional.interpolate(torch.relu(want)[:, None], size=(T, SIDE, SIDE), mode="trilinear")[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None, None]
    hi = up.flatten(1).amax(1)[:, None, None, None]
    torch.testing.assert_close(e.maps, (up - lo) / (hi - lo), rtol=1e-5, atol=1e-5)


def test_trained_model_looks_at_the_right_frames(trained: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    x, y, masks = _blob_clips(32, gen)
    pos = y == 1
    assert float((trained(x).argmax(1) == y).float().mean()) > 0.9  # it learned the task
    for method in ("gradcam", "gradcam++", "layercam"):
        e = camkit.explain(trained, x[pos], method=method, layers="features.0", targets=1)
        per_frame = e.maps.sum(dim=(2, 3))  # [n, T]
        blob_frames = per_frame[:, 5:7].mean(1)
        other = per_frame[:, [0, 1, 2, 3]].mean(1)
        assert bool((blob_frames > 2 * other).float().mean() > 0.9), method
        inside = (e.maps * masks[pos]).sum(dim=(1, 2, 3)) / masks[pos].sum(dim=(1, 2, 3))
        assert float(inside.mean()) > 2 * float(e.maps.mean()), method


def _score_weights(model: nn.Module, x: Tensor, acts: Tensor, classes: Tensor) -> Tensor:
    """Score-CAM's w_k = p_c(X * minmax(up(A_k))) by hand, one masked clip per forward (constant channels: 0)."""
    w = torch.zeros(acts.shape[:2])
    with torch.no_grad():
        for b in range(acts.shape[0]):
            for k in range(acts.shape[1]):
                a = acts[b, k]
                if bool(a.max() == a.min()):
                    continue
                up = nn.functional.interpolate(a[None, None], size=x.shape[2:], mode="trilinear")[0, 0]
                h = (up - up.min()) / (up.max() - up.min())
                w[b, k] = torch.softmax(model(x[b : b + 1] * h), dim=1)[0, classes[b]]
    return w


def _features(model: nn.Module, x: Tensor, upto: int) -> Tensor:
    with torch.no_grad():
        return model.features[:upto](x)


def test_scorecam_and_ablationcam_on_a_clip_are_the_3d_formulas(trained: nn.Module) -> None:
    """Score-CAM's masks are the 3-D channels upsampled trilinearly to [T, H, W]; Ablation-CAM zeroes a whole
    space-time channel: both computed here by hand, one forward per channel."""
    torch.manual_seed(4)
    x, classes = torch.randn(2, 3, T, SIDE, SIDE), torch.tensor([1, 0])
    acts = _features(trained, x, 3)  # features.2's output (the in-place ReLU after it is not applied)
    before = snapshot(trained)
    score = camkit.explain(trained, x, method="scorecam", layers="features.2", targets=classes.tolist())
    want = torch.einsum("bk,bkthw->bthw", _score_weights(trained, x, acts, classes), acts)
    torch.testing.assert_close(score.raw["features.2"], want, rtol=1e-5, atol=1e-6)
    ablation = camkit.explain(trained, x, method="ablationcam", layers="features.2", targets=classes.tolist())
    with torch.no_grad():
        y = trained(x)[torch.arange(2), classes]
        w = torch.zeros(2, acts.shape[1])
        for k in range(acts.shape[1]):
            cut = acts.clone()
            cut[:, k] = 0
            head = trained.fc(trained.pool(torch.relu(cut)).flatten(1))
            w[:, k] = (y - head[torch.arange(2), classes]) / y
    torch.testing.assert_close(
        ablation.raw["features.2"], torch.einsum("bk,bkthw->bthw", w, acts), rtol=1e-4, atol=1e-5
    )
    assert_unchanged(before, trained)


def test_score_cam_family_finds_the_frames_of_a_clip(trained: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    x, y, _ = _blob_clips(8, gen)
    pos = y == 1
    options = camkit.PerturbationOptions(noise_draws=4, integration_steps=4)
    maps = {}
    for method in ("scorecam", "sscam", "iscam", "ablationcam"):
        e = camkit.explain(
            trained, x[pos], method=method, layers="features.0", targets=1, perturbation=options
        )
        assert e.maps.shape == (int(pos.sum()), T, SIDE, SIDE), method
        per_frame = e.maps.sum(dim=(2, 3))
        assert bool((per_frame[:, 5:7].mean(1) > 5 * per_frame[:, :4].mean(1)).all()), method
        maps[method] = e.maps
    again = camkit.explain(
        trained, x[pos], method="sscam", layers="features.0", targets=1, perturbation=options
    )
    torch.testing.assert_close(again.maps, maps["sscam"])  # seeded noise: the same clip gives the same map


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_models(name: str, r3d: nn.Module) -> None:
    torch.manual_seed(0)
    model = (
        r3d if name == "r3d_18" else torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    )
    before = [(n, id(m), m.training) for n, m in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    x = torch.randn(1, 3, 4, 48, 48)
    # gradcam++, xgradcam and layercam are the ones pytorch-grad-cam crashes on with 5-D input (its issue 583)
    many = camkit.compare(model, x, methods=["gradcam", "gradcam++", "xgradcam", "layercam"])
    for expl in many.values():
        assert expl.layers == ["layer4"]
        assert expl.maps.shape == (1, 4, 48, 48)
        assert torch.isfinite(expl.maps).all()
    assert [(n, id(m), m.training) for n, m in model.named_modules()] == before
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_clip_errors(trained: nn.Module) -> None:
    x = torch.randn(1, 3, T, SIDE, SIDE)
    with pytest.raises(ValueError, match=r"cannot explain a clip.*scorecam"):
        camkit.explain(trained, x, method="polycam", layers="features.0,features.2")
    with pytest.raises(ValueError, match="channels before"):
        camkit.explain(trained, torch.randn(1, T, 3, SIDE, SIDE))
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=r"no nn\.Conv3d"):
        camkit.explain(flat, x)
    with pytest.raises(ValueError, match="one map per frame"):
        overlay_frames([Image.new("RGB", (8, 8))] * 3, torch.zeros(2, 8, 8))


def _write_clip(path: Path, frames: int = T, side: int = 48) -> np.ndarray:
    arr = np.zeros((frames, side, side, 3), dtype=np.uint8)
    for t in range(frames):
        arr[t, 10:30, 2 + 2 * t : 22 + 2 * t] = (255, 200, 0)
    if path.suffix == ".gif":
        iio.imwrite(path, arr, extension=".gif", duration=100, loop=0)
    else:
        iio.imwrite(path, arr, extension=path.suffix, plugin="FFMPEG", fps=8, macro_block_size=1)
    return arr


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".gif"])
def test_read_and_preprocess_clips(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"clip{suffix}"
    _write_clip(path, frames=12)
    frames, fps = read_frames(path)
    assert len(frames) == 12 and frames[0].size == (48, 48) and frames[0].mode == "RGB"
    assert fps == pytest.approx(10.0 if suffix == ".gif" else 8.0, rel=0.05)
    clip = load_clip(path, ClipPreprocess(size=(32, 32), frames=4))
    assert clip.x.shape == (1, 3, 4, 32, 32) and len(clip.frames) == 4
    assert ClipPreprocess(frames=4).pick(12) == [0, 4, 7, 11]
    assert ClipPreprocess(frames=0).pick(5) == [0, 1, 2, 3, 4]


def test_overlays_and_animations(tmp_path: Path, trained: nn.Module) -> None:
    path = tmp_path / "clip.gif"
    _write_clip(path)
    clip = load_clip(path, ClipPreprocess(size=(SIDE, SIDE), frames=T))
    e = camkit.explain(trained, clip.x, layers="features.2")
    pictures = overlay_frames(clip.frames, e.maps[0])
    assert len(pictures) == T and pictures[0].size == (48, 48)
    gif = save_animation(pictures, tmp_path / "a.gif", fps=5)
    assert len(list(iio.imiter(gif))) == T
    mp4 = save_animation(pictures, tmp_path / "a.mp4", fps=5)
    assert len(list(iio.imiter(mp4))) == T
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        save_animation(pictures, tmp_path / "a.png")


def test_postprocess_clip_normalises_over_the_clip() -> None:
    raw = {"a": torch.zeros(1, 2, 2, 2)}
    raw["a"][0, 1, 0, 0] = 4.0  # only the second time step is active
    maps, fused = postprocess_clip(raw, (4, 4, 4))
    m = maps["a"][0]
    assert m.shape == (4, 4, 4) and float(m.max()) == 1.0
    assert float(m[0].max()) < 0.5  # early frames stay dim: not normalised per frame
    torch.testing.assert_close(fused, maps["a"])


def test_cli_explains_a_clip(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    _write_clip(path)
    out = tmp_path / "out"
    args = [
        "explain",
        str(path),
        "--model",
        "r3d_18",
        "--no-pretrained",
        "--frames",
        "4",
        "--input-size",
        "48",
    ]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--methods", "gradcam,layercam"])
    assert res.exit_code == 0, res.output
    for method in ("gradcam", "layercam"):
        gif = out / f"clip_r3d_18_{method}.gif"
        assert len(list(iio.imiter(gif))) == 4
        assert (out / f"clip_r3d_18_{method}_frames.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert {e["method"] for e in summary} == {"gradcam", "layercam"} and all(
        e["frames"] == 4 for e in summary
    )
    assert all(e["label"] for e in summary)  # Kinetics-400 names
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--target", "top2", "--animation", "mp4"])
    assert res.exit_code == 0, res.output
    for k in (1, 2):
        assert len(list(iio.imiter(out / f"clip_r3d_18_gradcam_top{k}.mp4"))) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 8  # the first run's four files are kept, the second run's four added


def test_cli_offline_pretrained_video_model_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "clip.mp4"
    _write_clip(path, frames=2, side=16)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    res = CliRunner().invoke(app, ["explain", str(path), "--model", "r3d_18", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert (
        "could not get the pretrained weights of 'r3d_18'" in res.output and "--no-pretrained" in res.output
    )


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "fem", "segeigencam"])
def test_agrees_with_pytorch_grad_cam_on_clips(
    trained: nn.Module, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the definitions coincide: the same map at the layer's resolution (pytorch-grad-cam's resize, a cubic
    spline zoom after a per-image min-max, is switched off; its epsilons are negligible here)."""
    import pytorch_grad_cam
    import pytorch_grad_cam.base_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def minmax_only(cam: np.ndarray, target_size: object = None) -> np.ndarray:
        flat = cam.reshape(cam.shape[0], -1)
        lo, hi = flat.min(1), flat.max(1)
        return np.float32(
            (cam - lo.reshape(-1, *[1] * (cam.ndim - 1)))
            / (1e-7 + (hi - lo).reshape(-1, *[1] * (cam.ndim - 1)))
        )

    monkeypatch.setattr(pytorch_grad_cam.base_cam, "scale_cam_image", minmax_only)
    cls = {
        "gradcam": pytorch_grad_cam.GradCAM,
        "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
        "xgradcam": pytorch_grad_cam.XGradCAM,
        "layercam": pytorch_grad_cam.LayerCAM,
        "fem": pytorch_grad_cam.FEM,  # its k-sigma statistics over (t, h, w): camkit's over the stacked frames
        "segeigencam": pytorch_grad_cam.SegEigenCAM,
    }[method]
    x, _, _ = _blob_clips(2, torch.Generator().manual_seed(9))
    with cls(model=trained, target_layers=[trained.features[3]]) as cam:
        theirs = torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(1)] * 2))
    trained.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward leaves parameter gradients
    ours = torch.relu(
        camkit.explain(trained, x, method=method, layers="features.3", targets=1).raw["features.3"]
    )
    assert theirs.shape == ours.shape == (2, T // 2, SIDE // 2, SIDE // 2)
    for i in range(2):
        r = torch.corrcoef(torch.stack([theirs[i].flatten(), ours[i].flatten()]))[0, 1]
        assert float(r) >= 0.999, (method, i, float(r))
