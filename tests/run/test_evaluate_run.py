"""``camkit evaluate IMAGES`` and ``camkit run`` + ``camkit evaluate STORE`` compute their per-image metrics with
one function (:class:`camkit.evaluate.MetricScorer`): for the same images and options they print the same
summary numbers, every metric of evaluate included (ROAD, pointing_strict, MaxBoxAccV2 over the data set).

Both commands load a small random convolutional network at 48 px (the weights do not matter, only that both paths
see the same ones; ``camkit.load_model`` is swapped for it) on four small generated images, one of them without a
ground-truth box.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app
from camkit.evaluate import IOU_THRESHOLDS, MetricScorer
from camkit.metrics import max_box_acc_v2
from camkit.metrics._common import Forward
from camkit.run import open_store
from camkit.run.runner import METRIC_COLUMNS
from camkit.run.store import summarize

runner = CliRunner()
MODEL_ARGS = [
    "--model",
    "resnet18",
    "--no-pretrained",
    "--seed",
    "3",
    "--threads",
    "1",
]  # swapped: see _small
METRICS = "deletion,insertion,avg_drop,increase,road,pointing,pointing_strict,box,maxboxacc"
#: file -> its box (None: no ground truth: left out of the box metrics by both paths)
BOXES: dict[str, list[float] | None] = {
    "a.png": [8, 8, 40, 40],
    "b.png": [30, 10, 70, 50],
    "c.png": [0, 20, 120, 60],  # past the right edge (80 px): clipped by both paths
    "d.png": None,
}


def _images(root: Path) -> Path:
    """Noise with a bright square where the box is; sizes vary."""
    rng = np.random.default_rng(1)
    root.mkdir()
    for i, (name, box) in enumerate(BOXES.items()):
        arr = rng.integers(0, 120, (64 + 4 * i, 80, 3), dtype=np.uint8)
        if box is not None:
            x0, y0, x1, y1 = (int(v) for v in box)
            arr[y0:y1, x0:x1] = 230
        Image.fromarray(arr).save(root / name)
    return root


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
        )
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.features(x)))


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``camkit.load_model`` (used by both commands) builds :class:`_Small` from seed 3; returns the names asked."""
    import camkit
    from camkit.adapters import Preprocess
    from camkit.adapters.zoo import LoadedModel

    asked: list[str] = []

    def fake(name: str, *args: object, **kwargs: object) -> LoadedModel:
        asked.append(name)
        torch.manual_seed(3)
        return LoadedModel(_Small().eval(), Preprocess(size=(48, 48)), None, name)

    monkeypatch.setattr(camkit, "load_model", fake)
    return asked


def _strict(text: str) -> dict[str, object]:
    out = json.loads(text[text.index("{") :])
    assert isinstance(out, dict)
    return out


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == b  # bit for bit: the same batches, the same input layout, the same metric code


def test_evaluate_images_and_store_print_the_same_summary(tmp_path: Path, small: list[str]) -> None:
    images = _images(tmp_path / "img")
    anns = {name: {"boxes": [box]} for name, box in BOXES.items() if box is not None}
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    lines = ["path,boxes"] + [
        f'{name},"{json.dumps([box] if box is not None else [])}"' for name, box in BOXES.items()
    ]
    (images / "manifest.csv").write_text("\n".join(lines) + "\n")
    common = ["--methods", "gradcam,layercam", "--metrics", METRICS, "--steps", "5", *MODEL_ARGS]

    ann, ev_out, store = str(tmp_path / "ann.json"), str(tmp_path / "ev"), str(tmp_path / "store")
    direct = runner.invoke(
        app,
        [
            "evaluate",
            str(images),
            "--annotations",
            ann,
            "--out",
            ev_out,
            *common,
            "--format",
            "json",
            "--no-progress",
        ],
    )
    assert direct.exit_code == 0, direct.output
    made = runner.invoke(
        app,
        [
            "run",
            str(images / "manifest.csv"),
            "--out",
            store,
            "--resolution",
            "input",
            *common,
            "--workers",
            "0",
        ],
    )
    assert made.exit_code == 0, made.output
    assert small == ["resnet18", "resnet18"]
    stored = runner.invoke(app, ["evaluate", store, "--format", "json"])
    assert stored.exit_code == 0, stored.output

    ev = _strict(direct.stdout)
    st = _strict(stored.stdout)
    summary, store_metrics = ev["summary"], st["metrics"]
    assert isinstance(summary, dict) and isinstance(store_metrics, dict)
    assert set(summary) == set(store_metrics) == {"gradcam", "layercam"}
    expected_cols = {c for m in METRICS.split(",") for c in METRIC_COLUMNS[m] if c != "iou_curve"}
    for method, values in summary.items():
        assert set(values) == expected_cols | {"maxboxacc"}
        assert set(store_metrics[method]) == set(values)
        for col, v in values.items():
            assert _same(v, store_metrics[method][col]), (method, col, v, store_metrics[method][col])
        for col in ("deletion", "road_morf", "avg_drop", "pointing", "box_iou", "maxboxacc"):
            assert values[col] is not None and math.isfinite(values[col]), (method, col)
    # MaxBoxAccV2 per IoU threshold, in both
    assert isinstance(ev["maxboxacc"], dict) and isinstance(st["maxboxacc"], dict)
    for method, per in ev["maxboxacc"].items():
        assert set(per) == {"value", "iou_0.3", "iou_0.5", "iou_0.7"} == set(st["maxboxacc"][method])
        assert all(_same(v, st["maxboxacc"][method][k]) for k, v in per.items()), (per, st["maxboxacc"])
    # the image without a box is left out of the box metrics by both paths
    excluded = ev["excluded_from_box_metrics"]
    assert isinstance(excluded, dict) and excluded["images"] == ["d.png"]
    table = open_store(store).table()
    assert table.column("gradcam.iou_curve").to_pylist()[3] is None
    assert math.isnan(table.column("gradcam.pointing").to_pylist()[3])


def test_store_summary_maxboxacc_is_maxboxaccv2_of_the_curves(tmp_path: Path) -> None:
    """summarize computes MaxBoxAccV2 from the stored per-image IoU curves, NaN-free rows only."""
    import pyarrow as pa

    curves = torch.rand(5, IOU_THRESHOLDS.numel())
    rows: list[list[float] | None] = [c.tolist() for c in curves] + [None]
    table = pa.table(
        {
            "status": ["ok"] * 6,
            "g.iou_curve": pa.array(rows, type=pa.list_(pa.float32())),
            "g.box_iou": pa.array([0.5, 0.25, float("nan"), 1.0, 0.0, float("nan")], type=pa.float64()),
        }
    )
    out = summarize(table, ["g"], {"n": 6})
    expected = max_box_acc_v2(curves, IOU_THRESHOLDS)
    assert out["metrics"]["g"]["maxboxacc"] == pytest.approx(expected.value)
    assert out["maxboxacc"]["g"]["iou_0.5"] == pytest.approx(expected.per_iou[0.5])
    assert out["metrics"]["g"]["box_iou"] == pytest.approx(1.75 / 4)
    none = summarize(
        table.set_column(1, "g.iou_curve", pa.array([None] * 6, pa.list_(pa.float32()))), ["g"], {}
    )
    assert none["metrics"]["g"]["maxboxacc"] is None and "maxboxacc" not in none


def test_scorer_is_the_one_the_run_uses() -> None:
    """The run's Explainer scores with MetricScorer (no second copy of the metric code)."""
    from camkit.run.runner import Explainer, RunOptions

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()
    from camkit.adapters import Preprocess

    ex = Explainer(
        model, Preprocess(size=(32, 32)), None, RunOptions(metrics=("road", "avg_drop"), steps=3), []
    )
    scorer = ex.scorer()
    assert isinstance(scorer, MetricScorer)
    assert scorer.chosen == ["road", "avg_drop"] and scorer.steps == 3
    x = torch.rand(2, 3, 32, 32)
    maps = torch.rand(2, 32, 32)
    classes = torch.tensor([0, 2])
    values, curves = scorer(x, maps, classes, [[], []], [(32, 32), (32, 32)])
    again, _ = MetricScorer(model, Forward(model), ["road", "avg_drop"], 3, 0.2)(
        x, maps, classes, [[], []], [(32, 32), (32, 32)]
    )
    assert curves is None
    assert set(values) == {"road_morf", "road_lerf", "avg_drop", "increase"}
    for k in values:
        assert torch.equal(values[k], again[k])
