"""Boxes from maps: thresholds, components, coordinates in original-image pixels, drawing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import camkit
from camkit.localize import Box, binarize, localize, map_to_image, otsu_threshold, parse_threshold
from camkit.metrics import box_iou
from camkit.viz import draw_boxes
from testbed import normalize


def two_blobs() -> torch.Tensor:
    m = torch.zeros(64, 64)
    m[10:30, 5:25] = 1.0  # 400 px, peak 1
    m[40:50, 40:60] = 0.5  # 200 px
    m[0, 63] = 0.1  # below 0.2 * max
    return m


def test_largest_component_box_half_open() -> None:
    (boxes,) = localize(two_blobs())
    assert boxes == [Box(5, 10, 25, 30, score=1.0, area=400.0)]
    assert boxes[0].xyxy == [5, 10, 25, 30]


def test_all_components_and_min_area() -> None:
    (boxes,) = localize(two_blobs(), mode="all")
    assert [b.xyxy for b in boxes] == [[5, 10, 25, 30], [40, 40, 60, 50]]
    assert boxes[1].score == pytest.approx(0.5) and boxes[1].area == 200.0
    (big,) = localize(two_blobs(), mode="all", min_area=300 / 64**2)
    assert [b.xyxy for b in big] == [[5, 10, 25, 30]]
    # a lower threshold lets the 0.1 pixel in; a fixed value above 0.5 drops the second blob
    (low,) = localize(two_blobs(), threshold=0.05, mode="all")
    assert len(low) == 3
    (fixed,) = localize(two_blobs(), threshold=("value", 0.6), mode="all")
    assert [b.xyxy for b in fixed] == [[5, 10, 25, 30]]


def test_diagonal_pixels_are_one_component() -> None:
    m = torch.zeros(8, 8)
    m[2, 2] = m[3, 3] = m[4, 4] = 1.0  # 8-connectivity
    assert [b.xyxy for b in localize(m, mode="all")[0]] == [[2, 2, 5, 5]]


def test_otsu_splits_a_bimodal_map() -> None:
    g = torch.Generator().manual_seed(0)
    m = 0.2 + 0.05 * torch.rand(32, 32, generator=g)
    m[8:16, 8:24] = 0.8 + 0.05 * torch.rand(8, 16, generator=g)
    t = otsu_threshold(m)
    assert 0.25 <= t <= 0.8
    assert binarize(m, "otsu").sum().item() == 8 * 16
    assert localize(m, threshold="otsu")[0][0].xyxy == [8, 8, 24, 16]


def _histogram_otsu(m: torch.Tensor, bins: int = 256) -> float:
    """Otsu as camkit computed it by hand before it called scikit-image: a ``bins``-bin histogram between the
    map's min and max, the split k maximising the between-class variance, the upper edge of bin k."""
    m = m.float().flatten()
    lo, hi = float(m.min()), float(m.max())
    hist = torch.histc(m, bins=bins, min=lo, max=hi).double()
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    s0 = (hist * centers).cumsum(0)
    between = w0 * w1 * (s0 / w0.clamp_min(1e-12) - (s0[-1] - s0) / w1.clamp_min(1e-12)) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    return lo + (int(between.argmax()) + 1) * (hi - lo) / bins


def _cam_like_maps() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    maps = []
    for i in range(24):
        low = torch.randn(1, 1, 7, 7, generator=g)
        m = torch.nn.functional.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False)[0, 0]
        maps.append(m.clamp_min(0) if i % 2 else m)  # every other one ReLU'd: a spike at 0, as a CAM
    maps += [torch.rand(48, 64, generator=g) ** 3 for _ in range(8)]
    return maps


def test_otsu_agrees_with_the_hand_written_histogram_otsu() -> None:
    """scikit-image's threshold is the centre of the background's last bin; camkit's is that bin's upper edge,
    so ``m > t`` keeps exactly Otsu's foreground class: the masks of the former implementation, pixel for pixel."""
    from skimage.filters import threshold_otsu

    centre_differs = 0
    for m in _cam_like_maps():
        t, ref = otsu_threshold(m), _histogram_otsu(m)
        assert t == pytest.approx(ref, rel=0, abs=1e-9)
        assert torch.equal(binarize(m, "otsu"), m > ref)
        centre_differs += int(not torch.equal(m > float(threshold_otsu(m.double().numpy())), m > ref))
    assert centre_differs > 0  # the bin centre alone would move pixels: the half bin matters


def test_otsu_of_a_constant_map_keeps_nothing() -> None:
    m = torch.full((8, 8), 0.5)
    assert otsu_threshold(m) == 0.5
    assert not binarize(m, "otsu").any()


def test_empty_map_has_no_box() -> None:
    assert localize(torch.zeros(2, 16, 16)) == [[], []]


def test_boxes_scale_to_the_original_image() -> None:
    m = torch.zeros(224, 224)
    m[56:112, 28:56] = 1.0
    (boxes,) = localize(m, image_sizes=[(448, 112)])  # W x H: x2, y / 2
    assert boxes[0].xyxy == [56, 28, 112, 56]
    assert boxes[0].area == pytest.approx(56 * 28 * 2 * 0.5)
    assert map_to_image([0, 0, 224, 224], (224, 224), (451, 300)) == (0, 0, 451, 300)


def test_explanation_gives_original_pixels(tiny) -> None:
    photo = Image.new("RGB", (96, 48), "gray")
    expl = camkit.explain(tiny, [photo, photo.resize((32, 64))], layers="features.2")
    boxes = localize(expl, threshold=0.0)  # everything: the whole image
    assert [b.xyxy for b in boxes[0]] == [[0, 0, 96, 48]] and [b.xyxy for b in boxes[1]] == [[0, 0, 32, 64]]


def test_parse_threshold() -> None:
    assert parse_threshold("0.3") == 0.3
    assert parse_threshold("otsu") == "otsu"
    assert parse_threshold("value:0.5") == ("value", 0.5)
    with pytest.raises(ValueError, match="unknown threshold"):
        parse_threshold("half")
    with pytest.raises(ValueError, match="unknown mode"):
        localize(two_blobs(), mode="biggest")


def test_draw_boxes_outlines_exactly_the_box() -> None:
    img = Image.new("RGB", (40, 30), "black")
    out = draw_boxes(img, [Box(5, 6, 15, 20), [20, 2, 30, 12]], color=(255, 0, 0), width=1)
    px = out.load()
    assert px[5, 6] == (255, 0, 0) and px[14, 19] == (255, 0, 0)  # x1, y1 exclusive: last pixel x1 - 1
    assert px[15, 19] == (0, 0, 0) and px[10, 12] == (0, 0, 0)  # outside / inside stays
    assert px[29, 11] == (255, 0, 0)
    assert img.getpixel((5, 6)) == (0, 0, 0)  # the input is not modified


def test_gradcam_boxes_overlap_the_objects(trained_cnn, testbed_data) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = normalize(testbed_data.images[:32])
        expl = camkit.explain(trained_cnn, x, method="gradcam", layers="features.3")
        boxes = localize(expl)
    finally:
        torch.set_num_threads(threads)
    ious = torch.tensor(
        [box_iou(b, testbed_data.boxes[i][None]).max().item() if b else 0.0 for i, b in enumerate(boxes)]
    )
    assert ious.mean() > 0.45 and (ious >= 0.5).float().mean() > 0.5, ious
