"""Task targets (segmentation, detection, multi-label, regression, similarity) and model outputs (output=)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

import camkit
from camkit.core import tasks
from testbed import assert_unchanged, snapshot


class PointwiseSeg(nn.Module):
    """A 3x3 conv, then a 1x1 conv head: pixel (i, j) of the output depends on feature (i, j) only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.features(x))}


def test_segmentation_mask_confines_the_map():
    model = PointwiseSeg().eval()
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :4] = True
    target = tasks.SegmentationTarget(2, mask)
    expl = camkit.explain(model, x, method="hirescam", layers="features", targets=target, relu=False)
    raw = expl.raw["features"]
    assert torch.count_nonzero(raw[:, :, 4:]) == 0  # no gradient outside the mask for a pointwise head
    assert torch.count_nonzero(raw[:, :, :4]) > 0
    a = model.features(x)
    ref = (model.head.weight[2, :, 0, 0][None, :, None, None] * a).sum(1) * mask  # g = W[c] inside the mask
    torch.testing.assert_close(raw, ref.detach())
    with torch.no_grad():
        score = target(model(x)["out"])
    torch.testing.assert_close(expl.scores, score)
    whole = tasks.SegmentationTarget(2)(model(x)["out"])
    assert whole.shape == (2,) and not torch.allclose(whole, score)


def test_segmentation_target_errors():
    out = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        tasks.SegmentationTarget(5)(out)
    with pytest.raises(ValueError, match="does not match"):
        tasks.SegmentationTarget(1, torch.ones(3, 3))(out)
    with pytest.raises(ValueError, match=r"Tensor\[B, C, H, W\]"):
        tasks.SegmentationTarget(1)(torch.randn(1, 3))


def test_pack_detections_keeps_the_graph():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]], requires_grad=True)
    scores = torch.tensor([0.9, 0.4], requires_grad=True)
    out = [
        {"boxes": boxes, "scores": scores, "labels": torch.tensor([3, 7])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    assert tasks.is_detection_output(out) and not tasks.is_detection_output([torch.zeros(1)])
    packed = tasks.pack_detections(out)
    assert packed.shape == (2, 2, 6)
    assert packed[1, :, 5].tolist() == [-1, -1]
    target = tasks.DetectionTarget([0.0, 0, 10, 12], label=3)
    s = target(packed[:1])
    assert target.matched == [0]
    torch.testing.assert_close(s, torch.tensor([0.9 + 100 / 120]))
    s.sum().backward()
    assert scores.grad is not None and scores.grad.tolist() == [1.0, 0.0]
    assert boxes.grad is not None and boxes.grad[0].abs().sum() > 0  # the IoU term explains the position
    with pytest.raises(ValueError, match="no detection of class 7"):
        tasks.DetectionTarget([0.0, 0, 10, 12], label=7)(packed[:1])


def _tiny_frcnn() -> nn.Module:
    """Faster R-CNN (MobileNetV3 FPN) with random weights at 96 px, keeping every detection."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96, box_score_thresh=0.0
    ).eval()


def test_faster_rcnn_explains_one_box():
    model = _tiny_frcnn()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        det = model(x)[0]
    before = snapshot(model)
    j = 3
    target = tasks.DetectionTarget(det["boxes"][j], label=int(det["labels"][j]), iou_threshold=0.99)
    res = camkit.compare(model, x, methods=["gradcam", "layercam"], targets=target)
    assert res["gradcam"].layers == ["backbone.body.16"]
    assert res["gradcam"].maps.shape == (1, 96, 96) and torch.isfinite(res["gradcam"].maps).all()
    assert res["gradcam"].raw["backbone.body.16"].abs().sum() > 0
    iou = box_iou(det["boxes"][target.matched], det["boxes"][j][None])[:, 0]
    assert float(iou) > 0.99
    torch.testing.assert_close(
        res["gradcam"].scores, det["scores"][target.matched] + iou, rtol=1e-4, atol=1e-5
    )
    assert_unchanged(before, model)


def test_multilabel_probability_gives_the_same_map_as_the_logit(nonlinear, x_small):
    logit = camkit.explain(nonlinear, x_small, targets=tasks.MultiLabelTarget(2))
    prob = camkit.explain(nonlinear, x_small, targets=tasks.MultiLabelTarget(2, probability=True))
    index = camkit.explain(nonlinear, x_small, targets=2)
    torch.testing.assert_close(logit.maps, index.maps)
    torch.testing.assert_close(prob.maps, logit.maps, rtol=1e-4, atol=1e-5)
    # sigmoid' > 0 scales each image's gradient: same map, different raw scale
    layer = logit.layers[0]
    assert not torch.allclose(prob.raw[layer], logit.raw[layer])
    both = camkit.explain(nonlinear, x_small, targets=tasks.MultiLabelTarget([1, 2]), relu=False)
    one = camkit.explain(nonlinear, x_small, targets=1, relu=False)
    two = camkit.explain(nonlinear, x_small, targets=2, relu=False)
    torch.testing.assert_close(both.raw[layer], one.raw[layer] + two.raw[layer])  # linear in S


def test_regression_sign_flips_the_signed_map(nonlinear, x_small):
    reg = nn.Sequential(nonlinear, nn.Linear(5, 1)).eval()
    up = camkit.explain(reg, x_small, layers="0.features", targets=tasks.RegressionTarget(), relu=False)
    down = camkit.explain(
        reg, x_small, layers="0.features", targets=tasks.RegressionTarget(sign=-1), relu=False
    )
    torch.testing.assert_close(down.raw["0.features"], -up.raw["0.features"])
    with torch.no_grad():
        torch.testing.assert_close(up.scores, reg(x_small)[:, 0])


def test_similarity_to_itself_and_to_another_image(nonlinear, x_small):
    with torch.no_grad():
        emb = nonlinear(x_small)
    same = camkit.explain(nonlinear, x_small, targets=tasks.SimilarityTarget(emb))
    torch.testing.assert_close(same.scores, torch.ones(4), rtol=1e-5, atol=1e-5)
    other = camkit.explain(nonlinear, x_small[:1], targets=tasks.SimilarityTarget(emb[1]))
    ref = torch.nn.functional.cosine_similarity(emb[:1], emb[1:2])
    torch.testing.assert_close(other.scores, ref)
    assert other.maps.max() > 0


class MultiOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> object:
        h = self.features(x).mean((2, 3))
        a, b = self.a(h), self.b(h)
        if self.kind == "tuple":
            return a, b
        if self.kind == "list":
            return [a, b]
        if self.kind == "dict":
            return {"aux": b, "logits": a}
        return type("Out", (), {"logits": a, "aux": b})()


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "object"])
def test_outputs_and_output_selection(kind, x_small):
    model = MultiOut(kind).eval()
    default = camkit.explain(model, x_small)
    assert default.scores.shape == (4,)
    with torch.no_grad():
        h = model.features(x_small).mean((2, 3))
        a, b = model.a(h), model.b(h)
    torch.testing.assert_close(default.scores, a.max(1).values)
    pick = {"tuple": 1, "list": 1, "dict": "aux", "object": "aux"}[kind]
    second = camkit.explain(model, x_small, output=pick)
    torch.testing.assert_close(second.scores, b.max(1).values)
    fn = camkit.explain(
        model,
        x_small,
        output=lambda o: (
            o[1] if isinstance(o, (tuple, list)) else (o["aux"] if isinstance(o, dict) else o.aux)
        ),
    )
    torch.testing.assert_close(fn.scores, b.max(1).values)


def test_unknown_output_asks_for_output():
    class Weird(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> object:
            return {"something": self.c(x).mean((2, 3))}

    with pytest.raises(TypeError, match="output="):
        camkit.explain(Weird().eval(), torch.randn(1, 3, 8, 8), layers="c")
    e = camkit.explain(Weird().eval(), torch.randn(1, 3, 8, 8), layers="c", output="something")
    assert e.maps.shape == (1, 8, 8)


# ------------------------------------------------------------------ default targets (what `camkit explain` picks)

SEG_LABELS = ["__background__", "road", "car", "tree"]


def _seg_logits(pred: torch.Tensor, num: int = 4) -> torch.Tensor:
    """Logits Tensor[1, num, H, W] whose argmax over classes is ``pred``."""
    return torch.nn.functional.one_hot(pred, num).permute(2, 0, 1)[None].float() * 5.0


def test_default_segmentation_target_is_the_largest_non_background_class():
    pred = torch.zeros(6, 8, dtype=torch.long)  # background: 30 of 48 pixels
    pred[:3, :2] = 1  # 6 pixels
    pred[3:, 4:] = 2  # 12 pixels
    logits = _seg_logits(pred)
    chosen = tasks.default_target({"out": logits}, "segmentation", labels=SEG_LABELS)
    assert (chosen.category, chosen.label, chosen.region) == (2, "car", "mask")
    assert chosen.coverage == pytest.approx(12 / 48)
    assert isinstance(chosen.target, tasks.SegmentationTarget)
    assert torch.equal(chosen.target.mask, pred == 2)
    prob = torch.softmax(logits[0], dim=0)[2][pred == 2].mean()
    assert chosen.score == pytest.approx(float(prob))
    torch.testing.assert_close(chosen.target(logits), (logits[:, 2] * (pred == 2)).sum(dim=(1, 2)))
    assert "class 2 'car' over its predicted mask (25.0% of the image)" == chosen.describe()
    named = tasks.default_target(logits, "segmentation", category="road", labels=SEG_LABELS)
    assert (named.category, named.region, named.coverage) == (1, "mask", pytest.approx(6 / 48))
    absent = tasks.default_target(logits, "segmentation", category=3)  # predicted nowhere: the whole image
    assert (absent.category, absent.region, absent.coverage, absent.label) == (3, "image", 0.0, None)
    assert absent.target.mask is None
    assert tasks.default_target(logits, "segmentation", background=None).category == 0


def test_default_segmentation_target_when_only_the_background_is_predicted():
    logits = torch.zeros(1, 3, 4, 5)
    logits[:, 0] = 5.0
    logits[:, 1, 0, 0] = 3.0  # class 1 is stronger in one pixel, class 2 on average
    logits[:, 2] = 1.0
    chosen = tasks.default_target(logits, "segmentation")
    assert (chosen.category, chosen.region) == (2, "image")
    assert chosen.target.mask is None


def test_default_target_errors():
    logits = _seg_logits(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one image, got a batch of 2"):
        tasks.default_target(logits.expand(2, -1, -1, -1), "segmentation")
    with pytest.raises(ValueError, match="unknown class name 'bus'"):
        tasks.default_target(logits, "segmentation", category="bus", labels=SEG_LABELS)
    with pytest.raises(ValueError, match="out of range"):
        tasks.default_target(logits, "segmentation", category=9)
    with pytest.raises(ValueError, match="not 'classification'"):
        tasks.default_target(logits, "classification")
    with pytest.raises(ValueError, match=r"Tensor\[1, C, H, W\]"):
        tasks.default_target(torch.zeros(1, 4), "segmentation")


DET_LABELS = ["__background__", "person", "bicycle", "car"]


def _detections() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 30, 40], [1, 1, 8, 9], [4, 6, 9, 6]]),
            "scores": torch.tensor([0.3, 0.9, 0.6, 0.95]),  # the best is a line: IoU cannot match it
            "labels": torch.tensor([3, 1, 3, 3]),
        }
    ]


def test_default_detection_target_is_the_best_detection():
    out = _detections()
    best = tasks.default_target(out, "detection", labels=DET_LABELS)
    assert (best.category, best.label, best.region, best.box) == (1, "person", "box", [5.0, 5, 30, 40])
    assert best.score == pytest.approx(0.9)
    assert isinstance(best.target, tasks.DetectionTarget) and best.target.label == 1
    score = best.target(tasks.pack_detections(out))  # finds that detection again in the model's output
    assert best.target.matched == [1]
    torch.testing.assert_close(score, torch.tensor([0.9 + 1.0]))
    car = tasks.default_target(tasks.pack_detections(out), "detection", category="car", labels=DET_LABELS)
    assert (car.category, car.box, car.score) == (3, [1.0, 1, 8, 9], pytest.approx(0.6))
    assert tasks.default_target(out, "detection", category=3).box == [1.0, 1, 8, 9]  # no labels needed
    assert best.describe() == "the detection of class 1 'person', score 0.900, box (5, 5, 30, 40)"


def test_no_detection_is_a_clear_error():
    empty = [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    ]
    with pytest.raises(
        ValueError, match=r"no detection above the model's score threshold \(0.05\)\. .*--det-threshold 0"
    ):
        tasks.default_target(empty, "detection", threshold=0.05)
    with pytest.raises(
        ValueError, match=r"no detection of class 2 'bicycle' .*4 object\(s\) of other classes.*--target"
    ):
        tasks.default_target(_detections(), "detection", category="bicycle", labels=DET_LABELS)


# ------------------------------------------------------------------ torchvision segmentation / detection by name


@pytest.fixture
def offline(monkeypatch):
    """Any weights download fails, as it does without a network."""
    import torchvision.models._api as api

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"no network: {url}")

    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_load_detection_model_by_name(offline):
    loaded = camkit.load_model("fasterrcnn_mobilenet_v3_large_fpn", pretrained=False, input_size=160)
    model = loaded.model
    assert loaded.task == "detection" == tasks.model_task(model) and not model.training
    assert loaded.preprocess == camkit.Preprocess(size=(160, 160), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert camkit.Preprocess.for_model(model) == loaded.preprocess
    assert model.transform.min_size == (160,) and model.transform.max_size == 160
    assert loaded.labels is not None and len(loaded.labels) == 91
    assert loaded.labels[:3] == ["__background__", "person", "bicycle"]
    x = loaded.preprocess(camkit.sample_image())
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    images, _ = model.transform([x[0]])
    assert images.image_sizes == [(160, 160)]  # not resized again inside: the boxes are in input pixels
    assert tasks.score_threshold(model) == pytest.approx(0.05)
    rpn = model.rpn.score_thresh
    tasks.set_score_threshold(model, 0.0)
    assert model.roi_heads.score_thresh == 0.0 and model.rpn.score_thresh == rpn  # the RPN's own: untouched
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tasks.set_score_threshold(model, 1.5)
    with pytest.raises(ValueError, match="not a torchvision detection model"):
        tasks.set_score_threshold(nn.Conv2d(3, 3, 1), 0.1)
    default = camkit.load_model("fasterrcnn_mobilenet_v3_large_fpn", pretrained=False)
    assert default.preprocess.size == (640, 640)  # the model's 800, capped
    with pytest.raises(RuntimeError, match=r"could not get the pretrained weights.*--no-pretrained"):
        camkit.load_model("fasterrcnn_mobilenet_v3_large_fpn")


def test_load_segmentation_model_by_name(offline):
    loaded = camkit.load_model("lraspp_mobilenet_v3_large", pretrained=False)
    assert loaded.task == "segmentation" == tasks.model_task(loaded.model)
    assert loaded.preprocess == camkit.Preprocess(size=(520, 520))  # ImageNet mean/std
    assert camkit.Preprocess.for_model(loaded.model) == loaded.preprocess
    assert loaded.labels is not None and len(loaded.labels) == 21
    assert (loaded.labels[0], loaded.labels[8]) == ("__background__", "cat")
    small = camkit.load_model("lraspp_mobilenet_v3_large", pretrained=False, input_size=128)
    assert small.preprocess.size == (128, 128)
    with pytest.raises(ValueError, match="input_size is for segmentation, detection and video models"):
        camkit.load_model("resnet18", pretrained=False, input_size=128)
    assert tasks.model_task(nn.Conv2d(3, 3, 1)) == "classification"


def test_draw_boxes_accepts_a_box_under_one_pixel_wide():
    from PIL import Image

    from camkit.viz import draw_boxes

    out = draw_boxes(Image.new("RGB", (20, 20)), [[5.0, 4.0, 5.4, 12.0]], width=1)
    assert out.getpixel((5, 8)) != (0, 0, 0) and out.getpixel((7, 8)) == (0, 0, 0)


def test_explain_with_no_target_chooses_per_image_on_segmentation_models():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    before = snapshot(model)
    res = camkit.explain(model, x, method="gradcam")
    assert res.chosen is not None and len(res.chosen) == 2 and res.classes is None
    with torch.no_grad():
        out = model(x)["out"]
    for i in range(2):
        expected = tasks.default_target(out[i : i + 1], "segmentation")
        assert (res.chosen[i].category, res.chosen[i].region) == (expected.category, expected.region)
        one = camkit.explain(model, x[i : i + 1], method="gradcam", targets=expected.target)
        torch.testing.assert_close(res.maps[i], one.maps[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.scores[i], one.scores[0], atol=1e-4, rtol=1e-4)
    # A perturbation method scores each masked copy with its own image's target.
    small = camkit.PerturbationOptions(top_channels=8, batch_size=8)
    both = camkit.explain(model, x, method="scorecam", perturbation=small)
    for i in range(2):
        one = camkit.explain(
            model, x[i : i + 1], method="scorecam", targets=res.chosen[i].target, perturbation=small
        )
        torch.testing.assert_close(both.maps[i], one.maps[0], atol=1e-5, rtol=1e-4)
    # A class index or name (with labels): that class over its mask in each image; a wrong one: a clear error.
    labels = ["background", "cat", "dog", "car"]
    by_name = camkit.explain(model, x, targets="dog", labels=labels)
    assert by_name.chosen is not None and [c.category for c in by_name.chosen] == [2, 2]
    expected = tasks.default_target(out[1:2], "segmentation", category=2)
    one = camkit.explain(model, x[1:2], targets=expected.target)
    torch.testing.assert_close(by_name.maps[1], one.maps[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="Closest: 'dog'"):
        camkit.explain(model, x, targets="dgo", labels=labels)
    with pytest.raises(ValueError, match="out of range"):
        camkit.explain(model, x, targets=9)
    assert_unchanged(before, model)
    # A classifier is unaffected: no choice recorded.
    assert (
        camkit.explain(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(), x, layers="0"
        ).chosen
        is None
    )


def test_explain_with_no_target_explains_the_best_detection():
    model = _tiny_frcnn()
    x = torch.rand(1, 3, 96, 96)
    res = camkit.explain(model, x)
    with torch.no_grad():
        det = model(x)
    best = tasks.default_target(det, "detection", threshold=0.0)
    assert res.chosen is not None and res.chosen[0].box == pytest.approx(best.box)
    one = camkit.explain(model, x, targets=best.target)
    torch.testing.assert_close(res.maps, one.maps, atol=1e-5, rtol=1e-4)
    tasks.set_score_threshold(model, 1.0)
    with pytest.raises(ValueError, match="no detection"):
        camkit.explain(model, x)
