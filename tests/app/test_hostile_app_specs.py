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
        (
            {"method": "sscam(samples=36)"},
            "samples=36 costs more than the app allows (at most the default, 35)",
        ),
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


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("smoothgradcam++(n=1000000000)", "n=1000000000"),
        ("cameras(scales=(1,2,3,4))", "scales"),
        ("cameras(scales=(1,8))", "scales"),
        ("groupcam(kernel_size=4001)", "kernel_size"),
        ("opticam(samples=101)", "samples"),
        ("reciprocam(batch_size=100000)", "batch_size"),
    ],
)
def test_a_method_setting_above_its_default_cost_is_refused(spec: str, key: str) -> None:
    from camkit.app.server import bound_method_cost

    with pytest.raises(CamkitError, match="costs more than the app allows") as err:
        bound_method_cost(spec)
    assert key in str(err.value) and "camkit explain" in str(err.value)


@pytest.mark.parametrize(
    "spec",
    ["smoothgradcam++(n=2)", "cameras(scales=(1,1.5))", "scorecam(top_channels=4)", "finercam(alpha=0.5)"],
)
def test_a_cheaper_or_cost_neutral_method_setting_is_served(spec: str) -> None:
    from camkit.app.server import bound_method_cost

    bound_method_cost(spec)  # no error: lowering a cost, or a setting that is not one
