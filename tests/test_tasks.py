"""Task targets (segmentation, detection, multi-label, regression, similarity) and model outputs (output=)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camkit
from camkit import tasks
from conftest import assert_unchanged, snapshot


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


def test_faster_rcnn_explains_one_box():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96, box_score_thresh=0.0
    ).eval()
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
    iou = tasks.box_iou(det["boxes"][target.matched], det["boxes"][j])
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
