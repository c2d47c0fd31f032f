"""The metrics of ``POST /api/explain``: computed by the metric registry for the map the request made.

* Deletion and insertion equal :func:`camkit.metrics.deletion` / :func:`camkit.metrics.insertion` on the same
  image, map and class, at the registry's default steps.
* The box metrics take the request's boxes (clipped to the image as annotation files are) and equal the library's
  own functions; without boxes they are refused (422) in one line naming the missing boxes.
* An unknown metric is refused (422) with the message of ``camkit evaluate --metrics``; ``/api/config`` lists the
  registry's metrics; a model that is not a classifier gets no metric.
* The metrics' model calls run on the request's watch: counted, and stopped once the client has gone.
* The page offers the registry's metrics and shows their values (Chromium).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import _browser
import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.app import AppConfig, BackgroundServer, create_app
from camkit.app.metrics import STEPS, MetricJob, score_metrics
from camkit.cli import app as cli
from camkit.errors import CamkitError
from camkit.evaluate import joint_scores
from camkit.metrics import METRICS, Forward, box_accuracy, deletion, insertion, pointing_game
from camkit.metrics.registry import DEFAULT_STEPS

SIDE = 32
LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]
SIZE = (48, 40)  # the test photo's size
BOX = [6.0, 4.0, 30.0, 26.0]


class TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(self.stem(x)).mean(dim=(2, 3)))


def _photo() -> Image.Image:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 120, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    arr[6:24, 8:28] = 230  # a bright patch
    return Image.fromarray(arr)


def _png(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loaded() -> Iterator[LoadedModel]:
    """The app's models are this tiny CNN (the same weights on every load)."""
    torch.manual_seed(0)
    model = TinyCnn().eval()
    result = LoadedModel(model, Preprocess(size=(SIDE, SIDE)), list(LABELS), "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(camkit, "load_model", lambda name, *a, **k: result)
        yield result


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from _browser.one_thread()


@pytest.fixture(scope="module")
def client(loaded: LoadedModel) -> Iterator[TestClient]:
    app = create_app(AppConfig(model="tiny", models=("tiny",), pretrained=False, metrics=("all",)))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def explain(client: TestClient, **form: Any) -> Any:
    data = {"model": "tiny", "layer": "stage", **form}
    return client.post("/api/explain", data=data, files={"file": ("p.png", _png(_photo()), "image/png")})


def _map(answer: dict[str, Any]) -> torch.Tensor:
    arr = np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4").reshape(answer["map_shape"])
    return torch.from_numpy(arr.copy())


def _values(answer: dict[str, Any]) -> dict[str, float | None]:
    return {col: v for m in answer["metrics"] for col, v in m["values"].items()}


def test_deletion_and_insertion_equal_the_librarys_functions(client: TestClient, loaded: LoadedModel) -> None:
    res = explain(client, method="gradcam", metrics=["deletion", "insertion"])
    assert res.status_code == 200, res.text
    ans = res.json()
    assert [m["name"] for m in ans["metrics"]] == ["deletion", "insertion"]
    assert [m["lower_is_better"] for m in ans["metrics"]] == [True, False]
    x = loaded.preprocess([_photo()])
    maps, classes = _map(ans)[None], torch.tensor([ans["class"]])
    assert STEPS == DEFAULT_STEPS == 50
    want = {
        "deletion": float(deletion(loaded.model, x, maps, classes, steps=DEFAULT_STEPS).auc[0]),
        "insertion": float(insertion(loaded.model, x, maps, classes, steps=DEFAULT_STEPS).auc[0]),
    }
    got = _values(ans)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.0 < want["deletion"] < 1.0 and want["deletion"] != want["insertion"]


def test_box_metrics_take_the_requests_boxes(client: TestClient) -> None:
    boxes = f"[{BOX}, [40, 30, 60, 55]]"  # the second reaches past the image: clipped to (40, 30, 48, 40)
    res = explain(client, method="layercam", metrics="box,pointing", boxes=boxes)
    assert res.status_code == 200, res.text
    ans = res.json()
    maps, gt = _map(ans)[None], [[BOX, [40.0, 30.0, 48.0, 40.0]]]
    acc = box_accuracy(maps, gt, threshold=0.2, image_sizes=[SIZE])
    want = {
        "box_iou": float(acc.iou[0]),
        "box_acc": float(acc.correct[0]),
        "pointing": float(pointing_game(maps, gt, image_sizes=[SIZE])[0]),
    }
    assert _values(ans) == pytest.approx(want, abs=1e-6)
    assert 0.0 < want["box_iou"] <= 1.0


def test_a_box_metric_without_boxes_is_a_422_naming_them(client: TestClient) -> None:
    res = explain(client, metrics=["deletion", "maxboxacc"])
    assert res.status_code == 422
    detail = res.json()["detail"]
    assert detail.startswith("metric 'maxboxacc' needs ground-truth boxes: give them in the boxes field")
    assert "\n" not in detail
    # all without boxes: the metrics that need none, as camkit evaluate chooses them
    res = explain(client, metrics="all", boxes="[[50, 2, 60, 9]]")  # wholly right of the 48 px wide image
    assert res.status_code == 422 and "lies outside the image of 48x40 pixels" in res.json()["detail"]
    res = explain(client, metrics="sparseness", boxes="[[3, 3, 2, 9]]")
    assert res.status_code == 422 and "empty or inverted" in res.json()["detail"]


def test_an_unknown_metric_is_a_422_with_the_commands_message(
    client: TestClient, loaded: LoadedModel, tmp_path: Path
) -> None:
    res = explain(client, metrics=["deletion", "nope"])
    assert res.status_code == 422
    detail = res.json()["detail"]
    _photo().save(tmp_path / "p.png")
    cli_run = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "p.png"), "--model", "tiny", "--metrics", "nope",
                                       "--out", str(tmp_path / "out")])  # fmt: skip
    assert cli_run.exit_code == 2
    assert " ".join(cli_run.output.split()) == f"error: {detail}"
    assert detail.startswith("unknown metric 'nope'; choose from deletion, insertion,") and "\n" not in detail


def test_config_lists_the_registrys_metrics(client: TestClient) -> None:
    cfg = client.get("/api/config").json()
    assert [m["name"] for m in cfg["metrics"]] == list(METRICS)
    rows = {m["name"]: m for m in cfg["metrics"]}
    assert rows["road"]["columns"] == ["road_morf", "road_lerf"] and rows["maxboxacc"]["columns"] == [
        "maxboxacc"
    ]
    assert rows["box"]["needs_boxes"] and not rows["deletion"]["needs_boxes"]
    assert rows["road"]["columns_lower_is_better"] == {"road_morf": True, "road_lerf": False}
    assert rows["insertion"]["columns_lower_is_better"] == {"insertion": False}
    assert cfg["metric_steps"] == STEPS


def test_a_model_that_is_not_a_classifier_gets_no_metric(loaded: LoadedModel) -> None:
    detector = LoadedModel(loaded.model, loaded.preprocess, loaded.labels, "det", task="detection")
    expl = camkit.explain(loaded.model, [_photo()], "gradcam", preprocess=loaded.preprocess)
    job = MetricJob(("sparseness",), (), "gradcam", "auto")
    with pytest.raises(CamkitError, match="computes them for classifiers; 'det' is a detection model"):
        score_metrics(detector, _photo(), expl, job, _Watch())


class _Gone(Exception):
    pass


class _Watch:
    """A request's watch whose client leaves after ``checks`` checks."""

    def __init__(self, checks: int = 10**9) -> None:
        self.checks, self.counted = checks, 0

    def check(self) -> None:
        self.checks -= 1
        if self.checks < 0:
            raise _Gone

    def progress(self, done: int, total: int) -> None:
        self.check()

    def count(self, n: int) -> None:
        self.counted += n

    def again(self) -> _Watch:
        return self


def test_metric_forwards_are_counted_and_stop_when_the_client_leaves(loaded: LoadedModel) -> None:
    expl = camkit.explain(loaded.model, [_photo()], "gradcam", preprocess=loaded.preprocess)
    job = MetricJob(("deletion", "insertion"), (), "gradcam", "auto", batch_size=8)
    watch = _Watch()
    score_metrics(loaded, _photo(), expl, job, watch)
    plain = Forward(loaded.model, 8)
    x, names = loaded.preprocess([_photo()]), ["deletion", "insertion"]
    joint_scores(loaded.model, plain, x, {"m": expl.maps}, expl.classes, names, STEPS)  # as camkit evaluate
    assert watch.counted == plain.images == 2 + 1 + 2 * (STEPS - 1)  # the ends, the image, the steps between
    gone = _Watch(checks=3)
    with pytest.raises(_Gone):
        score_metrics(loaded, _photo(), expl, job, gone)
    assert gone.counted == 2 + 1 + 8  # the client left after the ends, the image and one chunk of 8


def _error(message: Any) -> bool:
    """A console error of the page (the browser's own request for a favicon, 404, aside)."""
    return bool(message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"))


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    yield from _browser.launch_chromium()


def test_the_page_offers_the_metrics_and_shows_their_values(chromium: object, client: TestClient) -> None:
    app = client.app
    with BackgroundServer(app) as srv:  # type: ignore[arg-type]
        page = chromium.new_page()  # type: ignore[attr-defined]
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text) if _error(m) else None)  # a CSP refusal, say
        try:
            page.goto(srv.url)
            page.wait_for_function("() => document.body.dataset.state === 'ready'", timeout=60_000)
            assert page.locator("#metrics option").count() == len(METRICS)
            page.fill("#gtboxes", "[[100, 50, 300, 250]]")  # on the sample photo, 451 x 300
            page.select_option("#metrics", ["sparseness", "box"])
            page.wait_for_function("() => document.querySelectorAll('#metricvalues tr').length === 4",
                                   timeout=60_000)  # fmt: skip
            text = page.inner_text("#metricvalues")
            assert "sparseness" in text and "box_iou" in text and "box_acc" in text
            assert page.inner_text("#error") == ""
        finally:
            page.close()
    assert problems == []


def test_each_column_says_which_way_is_better(client: TestClient) -> None:
    res = explain(client, method="gradcam", metrics=["road"])
    assert res.status_code == 200, res.text
    (road,) = res.json()["metrics"]
    assert road["columns_lower_is_better"] == {"road_morf": True, "road_lerf": False}
