"""Transformers semantic segmentation and object detection models through ``hf:DIR``: the task from the config's
architecture, the outputs camkit's targets read, the default target rule, YOLOS's detection tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camkit
from camkit.adapters import Preprocess, load_model
from camkit.core.tasks import (
    DetectionTarget,
    SegmentationTarget,
    default_target,
    model_task,
    set_score_threshold,
)
from camkit.core.tokens import infer_layout
from camkit.errors import CamkitError
from testbed import HF_DETECTORS, HF_SEGMENTERS, assert_unchanged, save_hf, snapshot

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tasks")
    return {name: save_hf(name, root / name) for name in (*HF_SEGMENTERS, *HF_DETECTORS)}


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(48, 40, 3) * 255).astype("uint8")) for _ in range(2)]


@pytest.mark.parametrize(
    ("family", "task", "view", "auto"),
    [
        ("segformer", "segmentation", "HFSegmenter", "model.segformer.stages.1.blocks.0.layernorm_before"),
        ("upernet", "segmentation", "HFSegmenter", "model.backbone.hidden_states_norms.stage3"),
        ("detr", "detection", "HFDetector", "model.model.backbone.model.encoder.stages.2"),
        ("yolos", "detection", "HFDetector", "model.vit.encoder.layer.1.layernorm_before"),
    ],
)
def test_task_view_and_auto_layer_from_the_architecture(
    folders: dict[str, Path], family: str, task: str, view: str, auto: str
) -> None:
    lm = load_model(f"hf:{folders[family]}")
    assert (lm.task, type(lm.model).__name__, lm.labels) == (task, view, ["cat", "dog", "bird"])
    assert model_task(lm.model) == task and lm.preprocess.size == (32, 32)
    assert Preprocess.for_model(lm.model) is lm.preprocess  # the folder's, also when none is passed
    x = lm.preprocess(_images())
    assert camkit.auto_layer(lm.model, x) == auto


@pytest.mark.parametrize("family", HF_SEGMENTERS)
def test_segmentation_default_target_and_class(folders: dict[str, Path], family: str) -> None:
    lm = load_model(f"hf:{folders[family]}")
    images = _images()
    x = lm.preprocess(images)
    with torch.no_grad():
        logits = lm.model(x)
        raw = lm.model.model(pixel_values=x).logits
    # the view's output: the model's logits upsampled to the input, as post_process_semantic_segmentation does
    expected = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)
    before = snapshot(lm.model)
    e = camkit.explain(lm.model, images, "gradcam", preprocess=lm.preprocess, labels=lm.labels)
    assert e.chosen is not None and len(e.chosen) == 2
    for i, chosen in enumerate(e.chosen):
        ref = default_target(logits[i : i + 1], "segmentation", labels=lm.labels)
        assert (chosen.category, chosen.region, chosen.label) == (ref.category, ref.region, ref.label)
    assert e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all() and e.maps.amax() > 0
    fixed = camkit.explain(lm.model, x, "gradcam", targets=SegmentationTarget(category=2))
    assert torch.isfinite(fixed.maps).all() and fixed.maps.amax() > 0
    assert_unchanged(before, lm.model)


@pytest.mark.parametrize("family", HF_DETECTORS)
def test_detections_match_the_processors_post_processing(folders: dict[str, Path], family: str) -> None:
    lm = load_model(f"hf:{folders[family]}")
    x = lm.preprocess(_images())
    set_score_threshold(lm.model, 0.3)
    processor = transformers.DetrImageProcessor()
    with torch.no_grad():
        ours = lm.model(x)
        raw = lm.model.model(pixel_values=x)
    ref = processor.post_process_object_detection(raw, threshold=0.3, target_sizes=[(32, 32)] * 2)
    for d, r in zip(ours, ref, strict=True):
        order, ref_order = d["scores"].argsort(), r["scores"].argsort()
        torch.testing.assert_close(d["scores"][order], r["scores"][ref_order])
        torch.testing.assert_close(d["labels"][order], r["labels"][ref_order])
        torch.testing.assert_close(d["boxes"][order], r["boxes"][ref_order], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", HF_DETECTORS)
def test_detection_default_target_and_box(folders: dict[str, Path], family: str) -> None:
    lm = load_model(f"hf:{folders[family]}")
    images = _images()
    x = lm.preprocess(images)
    set_score_threshold(lm.model, 0.0)
    with torch.no_grad():
        det = lm.model(x)
    before = snapshot(lm.model)
    e = camkit.explain(lm.model, images, "gradcam", preprocess=lm.preprocess)
    assert e.chosen is not None
    for i, chosen in enumerate(e.chosen):
        j = int(det[i]["scores"].argmax())
        assert chosen.score == pytest.approx(float(det[i]["scores"][j]), rel=1e-5)
        assert chosen.box == pytest.approx(det[i]["boxes"][j].tolist(), abs=1e-4)
    assert e.maps.shape == (2, 32, 32) and torch.isfinite(e.maps).all() and e.maps.amax() > 0
    box = det[0]["boxes"][0]
    target = DetectionTarget(box, label=int(det[0]["labels"][0]))
    one = camkit.explain(lm.model, x[:1], "gradcam++", targets=target)
    assert target.matched == [0] and torch.isfinite(one.maps).all() and one.maps.amax() > 0
    assert_unchanged(before, lm.model)
    set_score_threshold(lm.model, 1.0)
    with pytest.raises(CamkitError, match="no detection above the model's score threshold"):
        camkit.explain(lm.model, images, "gradcam", preprocess=lm.preprocess)


def test_yolos_detection_tokens_are_dropped(folders: dict[str, Path]) -> None:
    # [class token, 16 patch tokens, 5 detection tokens]: the layout keeps the 16 patches, in order
    lm = load_model(f"hf:{folders['yolos']}")
    assert (lm.model.num_prefix_tokens, lm.model.num_suffix_tokens) == (1, 5)
    t = torch.arange(2 * 22 * 3, dtype=torch.float32).reshape(2, 22, 3)
    layout = infer_layout(tuple(t.shape), (32, 32), prefix=1, suffix=5)
    assert layout is not None and (layout.prefix, layout.suffix, layout.grid) == (1, 5, (4, 4))
    grid = layout(t)
    torch.testing.assert_close(grid, t[:, 1:17].reshape(2, 4, 4, 3).permute(0, 3, 1, 2))
    back = layout.write(grid * 0 - 1, t)
    assert (
        (back[:, 1:17] == -1).all()
        and torch.equal(back[:, 0], t[:, 0])
        and torch.equal(back[:, 17:], t[:, 17:])
    )


def test_a_model_of_another_task_is_refused(tmp_path: Path) -> None:
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(CamkitError, match=r"ViTModel is not a model camkit reads.*ForSemanticSegmentation"):
        load_model(f"hf:{tmp_path}")
