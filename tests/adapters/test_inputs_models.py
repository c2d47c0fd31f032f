"""Bad input gives clear errors or documented conversions; model loading, weights files, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import camkit
from camkit.adapters import Preprocess
from camkit.io import to_rgb


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        camkit.load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="cannot read"):
        camkit.load_image(bad)
    truncated = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "ok.png")
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read"):
        camkit.load_image(truncated)


def _bomb_header(path, side=30000):
    """A few bytes claiming a side x side PNG: nothing behind the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_a_value_error(tmp_path):
    bomb = _bomb_header(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match=r"30000x30000 = 900000000 pixels.*limit of 89478485.*max_pixels"):
        camkit.load_image(bomb)  # PIL's own DecompressionBombError before
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    with pytest.raises(ValueError, match="1200 pixels, more than the limit of 1000"):
        camkit.load_image(small, max_pixels=1000)
    assert camkit.load_image(small, max_pixels=1200).size == (40, 30)
    assert camkit.load_image(small, max_pixels=None).size == (40, 30)
    with pytest.raises(ValueError, match="cannot read"):  # no limit: past the size check, no data to decode
        camkit.load_image(bomb, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global limit left as it was


def test_float_images_with_nan_are_refused(tmp_path):
    arr = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    arr[1, 2] = np.nan
    arr[3, 3] = np.inf
    path = tmp_path / "nan.tif"
    Image.fromarray(arr, mode="F").save(path)
    with pytest.raises(ValueError, match=r"nan\.tif.*2 NaN or infinite"):
        camkit.load_image(path)  # a black image before
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(Image.fromarray(arr, mode="F"))
    arr[1, 2] = arr[3, 3] = 0.5
    Image.fromarray(arr, mode="F").save(path)
    assert np.asarray(camkit.load_image(path)).max() == 255


def test_grayscale_rgba_and_16bit_conversions(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    rgb = to_rgb(gray)
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel stays red
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    out16 = np.asarray(camkit.load_image(tmp_path / "deep.png"))
    assert out16.shape == (2, 2, 3) and out16[0, 0, 0] == 0 and out16[1, 1, 0] == 255


def test_bad_tensors(tiny):
    with pytest.raises(ValueError, match="channel"):
        camkit.explain(tiny, torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="channel"):
        camkit.explain(tiny, torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="dtype"):
        camkit.explain(tiny, torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        camkit.explain(tiny, torch.zeros(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        camkit.explain(tiny, torch.full((1, 3, 16, 16), float("nan")))


def test_single_chw_tensor_and_pil_inputs(tiny, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 16)
    assert camkit.explain(tiny, x).maps.shape == (1, 16, 16)
    pic = Image.fromarray((np.random.default_rng(0).random((20, 30, 4)) * 255).astype(np.uint8), mode="RGBA")
    pic.save(tmp_path / "p.png")
    pre = Preprocess(size=(16, 16))
    e = camkit.explain(tiny, [tmp_path / "p.png", pic.convert("L")], preprocess=pre)
    assert e.maps.shape == (2, 16, 16) and len(e.images) == 2
    over = e.overlay(0)
    assert over.size == (30, 20)  # back at the original size


def test_overlay_weights_and_errors():
    img = Image.new("RGB", (10, 10), (0, 0, 0))
    heat = torch.ones(5, 5)
    full = np.asarray(camkit.overlay(img, heat, cmap="gray", alpha=1.0))
    assert (full == 255).all()
    none = np.asarray(camkit.overlay(img, heat, cmap="gray", alpha=0.0))
    assert (none == 0).all()
    half = np.asarray(camkit.overlay(img, heat, cmap="gray", alpha=0.5))
    assert np.abs(half.astype(int) - 128).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        camkit.overlay(img, heat, alpha=1.5)
    with pytest.raises(ValueError, match="colormap"):
        camkit.overlay(img, heat, cmap="nope")


def test_weights_file_roundtrip_and_untrusted_pickle(tmp_path):
    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded = camkit.load_model("resnet18", weights=path)
    for (k, v), (_, w) in zip(src.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert not loaded.model.training and loaded.labels is not None and len(loaded.labels) == 1000

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        camkit.load_model("resnet18", weights=evil)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="does not match"):
        camkit.load_model("resnet18", weights=wrong)
    # a fine-tuned head with 7 classes: the model is rebuilt with 7 outputs
    tuned = torchvision.models.resnet18(weights=None, num_classes=7)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    got = camkit.load_model("resnet18", weights=tmp_path / "tuned.pth")
    assert got.model.fc.out_features == 7 and got.labels is None


def test_unknown_model_and_offline_download(monkeypatch):
    with pytest.raises(ValueError, match="resnet50"):
        camkit.load_model("resnet5O")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(RuntimeError, match="--weights"):
        camkit.load_model("resnet18")


def test_sample_images():
    assert camkit.sample_image("chelsea").size == (451, 300)
    with pytest.raises(ValueError, match="chelsea"):
        camkit.sample_image("dog")


def test_notebook_display_is_a_png(tiny):
    torch.manual_seed(0)
    e = camkit.explain(tiny, torch.randn(2, 3, 16, 16))
    png = e._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    assert Image.open(io.BytesIO(png)).size == (448, 224)  # two maps side by side
