"""``POST /api/explain`` with hostile method specs, metric settings and boxes: a 422 with one line, never a 500."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from _browser import SMALL_SIZE
from camkit.app import AppConfig, create_app
from camkit.app.metrics import offered_metrics
from camkit.errors import CamkitError

HUGE = "99999999999999999999"


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    config = AppConfig(model="resnet18", pretrained=False, seed=0, workers=1, queue=2, input_size=SMALL_SIZE)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as c:
        yield c


@pytest.mark.parametrize(
    ("form", "needle"),
    [
        ({"method": f"sscam(seed={HUGE})"}, "out of range"),
        ({"method": "finercam(alpha=" + "[" * 3000 + "]" * 3000 + ")"}, "nested too deeply"),
        ({"metrics": f"infidelity(seed={HUGE})"}, "out of range"),
        ({"metrics": "road(noise=-1)"}, "noise must be a finite number >= 0"),
        ({"metrics": "pointing(tolerance=-5)", "boxes": "[[0, 0, 10, 10]]"}, "tolerance"),
        ({"metrics": "pointing", "boxes": "[" * 5000}, "boxes must be a JSON list"),
    ],
)
def test_a_hostile_field_is_a_422(client: TestClient, form: dict[str, str], needle: str) -> None:
    res = client.post("/api/explain", data={"sample": "chelsea", "method": "gradcam", **form})
    assert res.status_code == 422, res.text
    detail = res.json()["detail"]
    assert needle in detail and "\n" not in detail


@pytest.mark.parametrize("names", [("road(noise=0.05)",), ("deletion", "infidelity(perturbation=gaussian)")])
def test_serve_metrics_with_settings_is_refused(names: tuple[str, ...]) -> None:
    """The operator's list names metrics; a request gives the settings. A spec there offered no metric at all."""
    with pytest.raises(CamkitError, match="takes metric names"):
        offered_metrics(names)
