"""Ultralytics YOLO models (``yolo:``): random-weight models from the package's configs at 64 px, loaded with
the network cut off; detections against ultralytics' own suppression, a known-answer locality of the gradient
maps, the model unchanged, the command line."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import camkit
from camkit.adapters import load_model
from camkit.adapters.yolo import YOLOClassifier, YOLODetector
from camkit.core.tasks import DetectionTarget, set_score_threshold
from camkit.errors import CamkitError
from testbed import assert_unchanged, snapshot

pytest.importorskip("ultralytics")


class _NoNetwork(Exception):
    pass


def _refuse(*args: object, **kwargs: object) -> Any:
    raise _NoNetwork("network access attempted")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """ultralytics writes its settings into YOLO_CONFIG_DIR (a temporary folder here); no socket may be opened."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-settings")))
        mp.setattr(socket, "getaddrinfo", _refuse)
        mp.setattr(socket.socket, "connect", _refuse)
        yield


@pytest.fixture(scope="module")
def yolo() -> Any:
    torch.manual_seed(0)
    lm = load_model("yolo:yolov8n.yaml", input_size=64)
    set_score_threshold(lm.model, 0.0)  # random weights: every score is tiny
    return lm


def test_loads_a_config_offline_with_coco_names_and_yolo_preprocessing(yolo: Any) -> None:
    assert isinstance(yolo.model, YOLODetector) and yolo.task == "detection"
    assert yolo.labels[:3] == ["person", "bicycle", "car"] and len(yolo.labels) == 80
    assert yolo.preprocess.size == (64, 64) and yolo.preprocess.mean == (0.0, 0.0, 0.0)
    assert yolo.preprocess.std == (1.0, 1.0, 1.0)
    assert (
        yolo.model.camkit_auto_layer == "model.model.15"
    )  # the first input of Detect: the stride-8 neck map
    assert load_model("yolo:yolov8n.yaml", input_size=70).preprocess.size == (
        96,
        96,
    )  # a multiple of the stride


def test_detections_equal_ultralytics_suppression(yolo: Any) -> None:
    from ultralytics.utils.nms import non_max_suppression

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        det = yolo.model(x)
        refs = non_max_suppression(yolo.model.model(x)[0], conf_thres=0.0, iou_thres=0.7)
    for i, ref in enumerate(refs):
        ref[:, :4] = ref[:, :4].clamp(0, 64)
        rows = det[i][det[i, :, 5] >= 0]
        assert rows.shape == ref.shape and rows.shape[0] > 0
        assert torch.allclose(rows, ref, atol=1e-4)


def test_explains_one_detection_model_unchanged(yolo: Any) -> None:
    image = camkit.sample_image("chelsea").resize((64, 64))
    before = snapshot(yolo.model)
    methods = ["gradcam", "gradcam++", "eigencam", "layercam"]
    results = camkit.compare(yolo.model, image, methods, preprocess=yolo.preprocess, labels=yolo.labels)
    assert_unchanged(before, yolo.model)
    for method, expl in results.items():
        assert expl.layers == ["model.model.15"] and expl.maps.shape == (1, 64, 64), method
        assert float(expl.maps.std()) > 0.05, method  # non-trivial
        chosen = expl.chosen[0]
        assert chosen.task == "detection" and chosen.label == yolo.labels[chosen.category]
        assert chosen.score > 0 and chosen.box is not None


def test_gradient_of_a_stride8_anchor_stays_in_its_window(yolo: Any) -> None:
    """Known answer: the score of the stride-8 anchor at cell (r, c) reads layer 15 only through the head's two
    3x3 convolutions, so the element-wise map (HiResCAM: dS/dA * A) at layer 15 is zero outside the 5x5 cells
    around (r, c), and non-zero inside."""
    net = yolo.model.model
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    r, c = 1, 6
    anchor = r * 8 + c  # the stride-8 anchors come first, row-major over the 8x8 grid

    def score(out: torch.Tensor) -> torch.Tensor:
        return out[:, 4 + 17, anchor]  # class 17's score there

    expl = camkit.explain(net, x, "hirescam", layers="model.15", targets=score)
    raw = expl.raw["model.15"][0]
    assert raw.shape == (8, 8)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = True
    assert float(raw[~inside].abs().max()) == 0.0
    assert float(raw[inside].abs().max()) > 0.0


def test_detection_target_explains_the_box_asked(yolo: Any) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        det = yolo.model(x)[0]
    row = det[int(det[:, 4].argmax())]
    target = DetectionTarget(row[:4].clone(), label=int(row[5]))
    expl = camkit.explain(yolo.model, x, "gradcam", targets=target)
    assert float(expl.scores[0]) == pytest.approx(float(row[4]) + 1.0, abs=1e-5)  # its score + IoU 1
    assert float(expl.maps.std()) > 0.05


def test_segmentation_and_classification_configs() -> None:
    """(YOLO11 runs in the family matrix, tests/adapters/test_families.py.)"""
    image = camkit.sample_image("chelsea")
    seg = load_model("yolo:yolov8n-seg.yaml", input_size=64)
    set_score_threshold(seg.model, 0.0)
    expl = camkit.explain(seg.model, image, "gradcam", preprocess=seg.preprocess, labels=seg.labels)
    assert expl.chosen[0].task == "detection" and float(expl.maps.std()) > 0.05
    cls = load_model("yolo:yolov8n-cls.yaml", input_size=64)
    assert isinstance(cls.model, YOLOClassifier) and cls.task == "classification"
    x = cls.preprocess(image)
    with torch.no_grad():
        probs, logits = cls.model.model(x)
        assert torch.allclose(cls.model(x), logits) and torch.allclose(logits.softmax(1), probs)
    expl = camkit.explain(cls.model, image, "gradcam", preprocess=cls.preprocess)
    assert expl.layers == [cls.model.camkit_auto_layer] and float(expl.maps.std()) > 0.05


def test_checkpoint_roundtrip_and_refusals(tmp_path: Path, yolo: Any) -> None:
    pt = tmp_path / "tiny.pt"
    torch.save({"model": yolo.model.model}, pt)
    back = load_model(f"yolo:{pt}", input_size=64)
    for a, b in zip(
        back.model.model.state_dict().values(), yolo.model.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    with pytest.raises(CamkitError, match=r"not a local file.*needs a network"):
        load_model("yolo:yolov8n.pt")
    with pytest.raises(CamkitError, match="no such model config"):
        load_model("yolo:nothing-here.yaml")
    with pytest.raises(CamkitError, match=r"\.yaml .*\.pt"):
        load_model("yolo:yolov8n")


def test_cli_explain_yolo_end_to_end(tmp_path: Path) -> None:
    from camkit.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "explain",
            "--model",
            "yolo:yolov8n.yaml",
            "--input-size",
            "64",
            "--det-threshold",
            "0",
            "--methods",
            "gradcam,eigencam",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    entries = json.loads((out / "summary.json").read_text())
    rows = [e for e in entries if e.get("method") in ("gradcam", "eigencam")]
    assert len(rows) == 2 and all(e["task"] == "detection" and len(e["box"]) == 4 for e in rows)
    assert os.path.isfile(rows[0]["file"])


def test_cli_layers_names_the_yolo_auto_layer() -> None:
    from camkit.cli import app

    res = CliRunner().invoke(app, ["layers", "yolo:yolov8n-cls.yaml"])
    assert res.exit_code == 0, res.output
    assert "auto: model.model.8" in res.output  # the input of the Classify head


def test_pil_open_is_left_as_it_was(yolo: Any, tmp_path: Path) -> None:
    """ultralytics' import swaps PIL.Image.open for a wrapper that pip-installs pi-heif when a file is not an
    image; camkit puts the original back, so a bad file stays a plain UnidentifiedImageError, never an install."""
    from PIL import Image, UnidentifiedImageError

    from camkit.io.images import open_image

    assert Image.open.__module__ == "PIL.Image"
    assert os.environ.get("YOLO_AUTOINSTALL") == "false"
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"plain text, not an image")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
    with pytest.raises(UnidentifiedImageError):
        open_image(bad)


@pytest.mark.parametrize("method", ["reciprocam", "groupcam(groups=4)", "unioncam"])
def test_masking_methods_score_the_chosen_detection(yolo: Any, method: str) -> None:
    """Methods that score masked copies of one image in a batch score each copy for that image's detection (was:
    'targets were chosen for 1 images, but the output has 9 rows'; Recipro-CAM's replay broke on the neck's
    concatenation of a batch of masked maps with the one image's earlier features)."""
    image = camkit.sample_image("chelsea").resize((64, 64))
    before = snapshot(yolo.model)
    expl = camkit.explain(yolo.model, image, method, preprocess=yolo.preprocess, labels=yolo.labels)
    assert_unchanged(before, yolo.model)
    assert expl.maps.shape == (1, 64, 64) and torch.isfinite(expl.maps).all()
    assert expl.chosen[0].task == "detection"
