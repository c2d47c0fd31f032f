"""Pictures: the 8-bit overlay (colour table, resize, blend, bands, memory), max_side, image inputs, the grid's
aspect ratio, captions and colour bars."""

from __future__ import annotations

import os
import pickle

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import camkit
from camkit import viz
from camkit.core.explanation import Explanation
from camkit.core.postprocess import upsample


def _solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _old_overlay(image: Image.Image, heatmap: torch.Tensor, cmap: str, alpha: float) -> np.ndarray:
    """The float64 renderer camkit had before (torch upsample, matplotlib RGBA), blended with rounding."""
    m = upsample(heatmap.float(), (image.height, image.width))
    heat = (matplotlib.colormaps[cmap](m.clamp(0, 1).numpy())[..., :3] * 255).round()
    return (1 - alpha) * np.asarray(image.convert("RGB"), dtype=np.float64) + alpha * heat


# --- the colour table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmap", ["jet", "viridis", "gray", "turbo"])
def test_colour_table_is_matplotlibs_256_colours(cmap):
    table = viz.colormap_table(cmap)
    assert table.shape == (256, 3) and table.dtype == np.uint8 and not table.flags.writeable
    ref = (matplotlib.colormaps[cmap](np.arange(256))[:, :3] * 255).round()  # integer input: entry i itself
    np.testing.assert_array_equal(table, ref)
    assert viz.colormap_table(cmap) is table  # computed once


@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.7499, 1.0])
def test_a_map_value_gets_the_table_colour_matplotlib_gives(value):
    pic = np.asarray(viz.colorize(torch.full((4, 5), value), cmap="jet"))
    expect = viz.colormap_table("jet")[min(int(value * 256), 255)]
    assert (pic == expect).all()
    mpl = (np.asarray(matplotlib.colormaps["jet"](value))[:3] * 255).round()
    np.testing.assert_array_equal(pic[0, 0], mpl)


def test_unknown_colormap_is_a_value_error():
    with pytest.raises(ValueError, match="colormap"):
        viz.colorize(torch.zeros(3, 3), cmap="nope")


# --- blending -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_blend_is_rounded_weighted_sum(alpha):
    photo_rgb = np.array([10, 200, 37])
    img = _solid((6, 4), tuple(photo_rgb))
    value = 0.6
    heat = viz.colormap_table("viridis")[int(value * 256)].astype(np.float64)
    expect = np.floor((1 - alpha) * photo_rgb + alpha * heat + 0.5)
    out = np.asarray(camkit.overlay(img, torch.full((3, 3), value), cmap="viridis", alpha=alpha))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert (out == expect.astype(np.uint8)).all(), (out[0, 0], expect)


def test_overlay_is_close_to_the_float64_renderer_it_replaced():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    heat = torch.rand(7, 7, generator=torch.Generator().manual_seed(0))
    new = np.asarray(camkit.overlay(img, heat, cmap="jet", alpha=0.5)).astype(np.float64)
    old = _old_overlay(img, heat, "jet", 0.5)
    diff = np.abs(new - old)
    # rounding (0.5) and, where the value sits on a bin edge, the neighbouring colour (jet steps <= 4 levels)
    assert diff.max() <= 3.0
    assert (diff > 0.5).mean() < 1e-3


# --- the map's resize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size"), [((7, 7), (200, 150)), ((14, 14), (1001, 37)), ((3, 50), (300, 200))]
)
def test_pil_bilinear_enlargement_matches_torch_upsample(shape, size):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    src = Image.fromarray(m.numpy())
    new = viz._map_band(src, size, 0, size[1])
    ref = upsample(m, (size[1], size[0])).numpy()
    # measured max difference: 2.4e-6 (float32 rounding); both are bilinear with align_corners=False
    assert new.shape == ref.shape
    assert np.abs(new - ref).max() < 1e-5


def test_bands_give_the_same_picture_as_one_band(monkeypatch):
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (97, 61, 3), dtype=np.uint8))
    heat = torch.rand(9, 5, generator=torch.Generator().manual_seed(2))
    whole = np.asarray(camkit.overlay(img, heat, alpha=0.4))
    shrunk_whole = np.asarray(camkit.overlay(img, heat, alpha=0.4, max_side=40))
    monkeypatch.setattr(viz, "_BAND_PIXELS", 61 * 3 + 5)  # bands of 3 rows
    assert np.array_equal(np.asarray(camkit.overlay(img, heat, alpha=0.4)), whole)
    shrunk = np.asarray(camkit.overlay(img, heat, alpha=0.4, max_side=40))
    # shrinking, PIL's 8-bit Lanczos of a band of rows is not bitwise its whole-image resize (measured on this
    # noise photo with 3-row bands: at most 3 levels, 19% of the values off by any)
    diff = np.abs(shrunk.astype(int) - shrunk_whole.astype(int))
    assert diff.max() <= 4 and diff.mean() < 0.5


# --- max_side -----------------------------------------------------------------------------------------------


def test_max_side_shrinks_keeping_the_aspect():
    img = _solid((400, 300), (0, 0, 0))
    heat = torch.ones(5, 5)
    assert camkit.overlay(img, heat, max_side=100).size == (100, 75)
    assert camkit.overlay(img.rotate(90, expand=True), heat, max_side=100).size == (75, 100)
    assert camkit.overlay(img, heat, max_side=400).size == (400, 300)
    assert camkit.overlay(img, heat, max_side=1000).size == (400, 300)  # never enlarged
    assert viz.colorize(heat, size=(50, 200), max_side=100).size == (25, 100)
    assert viz.colorize(torch.ones(300, 30), max_side=10).size == (1, 10)
    # the shrunk photo is blended: a white map over black at alpha 1 / 0
    white = np.asarray(camkit.overlay(img, heat, cmap="gray", alpha=1.0, max_side=100))
    assert (white == 255).all()
    black = np.asarray(camkit.overlay(img, heat, cmap="gray", alpha=0.0, max_side=100))
    assert (black == 0).all()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_side"):
            camkit.overlay(img, heat, max_side=bad)


def test_explanation_overlay_passes_max_side():
    maps = torch.rand(1, 8, 8)
    img = _solid((640, 480), (1, 2, 3))
    e = Explanation(maps, {"l": maps}, {}, None, torch.zeros(1), None, None, "gradcam", ["l"], images=[img])
    assert e.overlay(0, max_side=64).size == (64, 48)
    assert e.overlay(0).size == (640, 480)
    e.images = None
    assert e.overlay(0, max_side=4).size == (4, 4)


# --- image inputs -------------------------------------------------------------------------------------------


def test_numpy_and_tensor_images_give_the_pil_result():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    heat = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    ref = np.asarray(camkit.overlay(Image.fromarray(hwc), heat))
    same = [
        hwc,
        hwc[None],
        torch.from_numpy(hwc).permute(2, 0, 1),  # CHW uint8
        torch.from_numpy(hwc).permute(2, 0, 1)[None],  # [1, C, H, W]
        hwc.astype(np.float32) / 255,  # HWC float in [0, 1]
        torch.from_numpy(hwc).permute(2, 0, 1).double() / 255,
        hwc.astype(np.int64),
        np.moveaxis(hwc, -1, 0),  # CHW numpy: only the first dimension can be channels
    ]
    for image in same:
        assert np.array_equal(np.asarray(camkit.overlay(image, heat)), ref), type(image)
    grey = hwc[..., 0]
    ref_grey = np.asarray(camkit.overlay(Image.fromarray(grey), heat))
    for image in (grey, grey[..., None], torch.from_numpy(grey)[None], grey > 127):
        out = np.asarray(camkit.overlay(image, heat))
        assert out.shape == (12, 16, 3)
        if not (isinstance(image, np.ndarray) and image.dtype == np.bool_):
            assert np.array_equal(out, ref_grey)
    rgba = np.concatenate([hwc, np.full((12, 16, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(np.asarray(camkit.overlay(rgba, heat)), ref)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (torch.full((3, 4, 4), -0.5), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.full((4, 4, 3), 300, np.int32), r"\[0, 255\]"),
        (np.zeros((6, 4, 5), np.uint8), "channels"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_image_arrays_are_value_errors(image, match):
    with pytest.raises(ValueError, match=match):
        camkit.overlay(image, torch.ones(2, 2))


def test_other_pil_modes_are_converted():
    heat = torch.rand(3, 3, generator=torch.Generator().manual_seed(4))
    rgb = Image.new("RGB", (9, 7), (50, 100, 150))
    for image in (rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK"), rgb.convert("L")):
        ref = np.asarray(camkit.overlay(image.convert("RGB"), heat))
        assert np.array_equal(np.asarray(camkit.overlay(image, heat)), ref), image.mode
    grey16 = Image.new("I;16", (9, 7), 100)
    assert camkit.overlay(grey16, heat).size == (9, 7)


def test_bad_heatmaps_are_value_errors():
    img = _solid((4, 4), (0, 0, 0))
    with pytest.raises(ValueError, match="NaN"):
        camkit.overlay(img, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        camkit.overlay(img, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="empty"):
        camkit.overlay(img, torch.zeros(0, 3))


# --- memory -------------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_overlay_memory_beyond_the_photo_is_a_few_bytes_a_pixel():
    """The float64 renderer peaked near 90 bytes a pixel beyond the photo; the 8-bit one holds the output (4) and
    a band of temporaries. Measured in a forked child; the bound leaves room for the allocator."""
    heat = np.random.default_rng(6).random((224, 224), dtype=np.float32)
    camkit.overlay(_solid((64, 48), (1, 2, 3)), heat)  # imports and the colour table
    width, height = 3000, 2000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read)
            photo = Image.linear_gradient("L").resize((width, height)).convert("RGB")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status("VmRSS")
            out = camkit.overlay(photo, heat)
            extra = _status("VmHWM") - before
            os.write(write, pickle.dumps((extra, out.size)))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data
    extra, size = pickle.loads(data)
    assert size == (width, height)
    per_pixel = extra / (width * height)
    assert per_pixel < 10.0, f"{per_pixel:.1f} bytes a pixel beyond the photo"


# --- grid ---------------------------------------------------------------------------------------------------


def _run_length(line: np.ndarray, color: tuple[int, int, int]) -> int:
    return int((line == np.array(color)).all(axis=-1).sum())


def test_grid_keeps_the_aspect_ratio():
    red, blue = (255, 0, 0), (0, 0, 255)
    wide = _solid((300, 100), red)
    tall = _solid((100, 300), blue)
    out = np.asarray(viz.grid({"gradcam": {"a": wide, "b": tall}}, cell=60))
    rows_red = np.nonzero((out == red).all(axis=-1).any(axis=1))[0]
    cols_red = np.nonzero((out == red).all(axis=-1).any(axis=0))[0]
    assert len(rows_red) == 60 and len(cols_red) == 180  # 3:1 at height 60
    rows_blue = np.nonzero((out == blue).all(axis=-1).any(axis=1))[0]
    cols_blue = np.nonzero((out == blue).all(axis=-1).any(axis=0))[0]
    assert len(rows_blue) == 60 and len(cols_blue) == 20  # 1:3
    assert rows_red[0] == rows_blue[0]  # one row
    assert out.shape[1] < 300  # no 60-wide column was padded to the wide picture


def test_grid_with_the_input_and_a_very_wide_picture():
    green = (0, 255, 0)
    photo = _solid((400, 200), (0, 0, 0))
    panorama = _solid((1000, 50), green)
    out = np.asarray(viz.grid({"m": {"l": panorama}, "n": {"l": panorama}}, image=photo, cell=50, title="t"))
    cols = np.nonzero((out == green).all(axis=-1).any(axis=0))[0]
    rows = np.nonzero((out == green).all(axis=-1).any(axis=1))[0]
    assert len(cols) == 200  # at most 4 cells wide
    assert len(rows) == 2 * 10  # 1000x50 -> 200x10, in each of the two rows
    black_cols = np.nonzero((out[:, :, :] == 0).all(axis=-1).sum(axis=0) >= 25)[0]
    assert len(black_cols) == 100  # the 2:1 input at height 50


# --- annotate -----------------------------------------------------------------------------------------------


def test_annotate_keeps_the_picture_and_adds_a_colour_bar_and_caption():
    rng = np.random.default_rng(5)
    pic = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    plain = viz.annotate(pic)
    assert plain.size == pic.size and np.array_equal(np.asarray(plain), np.asarray(pic))
    barred = viz.annotate(pic, colorbar="viridis")
    arr = np.asarray(barred)
    assert barred.height == 120 and barred.width > 160
    assert np.array_equal(arr[:120, :160], np.asarray(pic))
    table = viz.colormap_table("viridis")
    strip = arr[:, 160:]
    top_rows = [y for y in range(120) if (strip[y] == table[255]).all(axis=-1).sum() >= 8]
    bottom_rows = [y for y in range(120) if (strip[y] == table[0]).all(axis=-1).sum() >= 8]
    assert top_rows and bottom_rows and max(top_rows) < min(bottom_rows)  # 1 at the top, 0 at the bottom
    captioned = viz.annotate(pic, caption="tabby p=0.93 · gradcam · layer4", colorbar="viridis")
    carr = np.asarray(captioned)
    assert captioned.width == barred.width and captioned.height > 120
    assert np.array_equal(carr[:120], arr)
    below = carr[120:]
    assert (below < 100).all(axis=-1).sum() > 20  # text was written
    longer = viz.annotate(pic, caption=" ".join(["word"] * 60), colorbar="viridis")
    assert longer.width == barred.width and longer.height > captioned.height  # wrapped, not widened
    with pytest.raises(ValueError, match="colormap"):
        viz.annotate(pic, colorbar="nope")


def test_caption_text():
    assert (
        viz.caption_text("tabby", 281, 0.934, "gradcam", "layer4") == "tabby (281) p=0.93 · gradcam · layer4"
    )
    assert viz.caption_text(cls=3, method="layercam", layer=["a", "b"]) == "3 · layercam · a+b"
    assert viz.caption_text() == ""
