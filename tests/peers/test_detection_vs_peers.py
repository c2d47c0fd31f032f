"""Faster R-CNN with layers="backbone": every FPN level explained, the maps fused."""

from __future__ import annotations

import torch
from torch import nn

import camkit
from camkit.core import tasks


def _tiny_frcnn() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96, box_score_thresh=0.0
    ).eval()


def test_backbone_of_faster_rcnn_explains_every_fpn_level_and_fuses_them():
    model = _tiny_frcnn()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        det = model(x)[0]
    target = tasks.DetectionTarget(det["boxes"][0], label=int(det["labels"][0]), iou_threshold=0.99)
    ids = {id(m) for m in model.modules()}
    e = camkit.explain(model, x, "gradcam", layers="backbone", targets=target)
    levels = [f"backbone.fpn.layer_blocks.{i}" for i in range(len(model.backbone.fpn.layer_blocks))]
    assert sorted(e.layers) == levels and len(levels) >= 2  # in the order they run: the deepest first
    assert e.maps.shape == (1, 96, 96) and torch.isfinite(e.maps).all() and e.maps.max() == 1
    # the levels are the FPN's outputs: same activations as the dict the backbone returns
    with torch.no_grad():
        feats = model.backbone(model.transform([x[0]])[0].tensors)
    for i, name in enumerate(levels):
        assert e.raw[name].shape[-2:] == feats[str(i)].shape[-2:]
    # fused by max of the per-level maps (the default), or by their mean
    torch.testing.assert_close(e.maps, camkit.core.postprocess.fuse([e.layer_maps[n] for n in e.layers]))
    # one level explained alone gives that level's map
    one = camkit.explain(model, x, "gradcam", layers=levels[0], targets=target)
    torch.testing.assert_close(one.maps, e.layer_maps[levels[0]])
    assert {id(m) for m in model.modules()} == ids
    assert not any(m._forward_hooks for m in model.modules())
