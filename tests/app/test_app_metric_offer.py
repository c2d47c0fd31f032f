"""The metrics the app offers: ``camkit serve --metrics`` (``AppConfig.metrics``), an operator's allow-list.

* By default every metric of the registry but those that explain the image many times again (``mprt``,
  ``max_sensitivity``, ``avg_sensitivity``); ``/api/config`` lists only the offered ones.
* A metric outside the list is refused (422) in one line naming the list, before any work; ``all`` means the
  offered ones.
* ``camkit serve --metrics`` fills the list; an unknown name is a usage error (exit 2).
* A request configures a metric as ``camkit evaluate --metrics`` does, except for the settings that set its cost.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from typer.testing import CliRunner

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.app import AppConfig, create_app
from camkit.app.metrics import DEFAULT_OFFERED, EXPLAIN_MANY, STEPS
from camkit.cli import app as cli
from camkit.errors import CamkitError
from camkit.io.images import sample_image
from camkit.metrics import METRICS, infidelity

LABELS = ["ant", "bee", "cat"]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def loaded() -> Iterator[LoadedModel]:
    torch.manual_seed(0)
    result = LoadedModel(_Tiny().eval(), Preprocess(size=(16, 16)), list(LABELS), "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(camkit, "load_model", lambda name, *a, **k: result)
        yield result


def _client(**config: Any) -> TestClient:
    return TestClient(create_app(AppConfig(model="tiny", models=("tiny",), pretrained=False, **config)),
                      base_url="http://127.0.0.1")  # fmt: skip


def _explain(client: TestClient, metrics: list[str]) -> Any:
    return client.post("/api/explain", data={"model": "tiny", "sample": "chelsea", "layer": "stage",
                                             "metrics": metrics})  # fmt: skip


def test_the_default_offer_leaves_out_the_metrics_that_explain_many_times(loaded: LoadedModel) -> None:
    assert set(EXPLAIN_MANY) == {"mprt", "max_sensitivity", "avg_sensitivity"}
    assert DEFAULT_OFFERED == tuple(n for n in METRICS if n not in EXPLAIN_MANY)
    with _client() as client:
        rows = client.get("/api/config").json()["metrics"]
        assert [r["name"] for r in rows] == list(DEFAULT_OFFERED)
        res = _explain(client, ["deletion", "mprt"])
        assert res.status_code == 422
        detail = res.json()["detail"]
        assert (
            "\n" not in detail and "'mprt' is not offered" in detail and ", ".join(DEFAULT_OFFERED) in detail
        )


def test_an_allow_list_limits_the_config_the_requests_and_all(loaded: LoadedModel) -> None:
    with _client(metrics=("sparseness", "entropy", "box")) as client:
        rows = client.get("/api/config").json()["metrics"]
        assert [r["name"] for r in rows] == ["box", "sparseness", "entropy"]  # the registry's order
        res = _explain(client, ["deletion"])
        assert res.status_code == 422 and "offers box, sparseness, entropy" in res.json()["detail"]
        res = _explain(client, ["all"])  # no boxes: the offered metrics without the box ones
        assert res.status_code == 200, res.text
        assert [m["name"] for m in res.json()["metrics"]] == ["sparseness", "entropy"]
    with _client(metrics=("all",)) as client:
        assert [r["name"] for r in client.get("/api/config").json()["metrics"]] == list(METRICS)
    with pytest.raises(CamkitError, match="unknown metric 'nope'"):
        AppConfig(metrics=("nope",))


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    calls: list[Any] = []
    monkeypatch.setattr("camkit.app.serve", lambda config, host, port: calls.append(config))
    yield calls


def test_cli_serve_metrics_fills_the_allow_list(fake_serve: list[Any]) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["serve", "--metrics", "deletion, mprt"])
    assert res.exit_code == 0, res.output
    assert fake_serve[-1].served_metrics == ("deletion", "mprt")
    assert runner.invoke(cli, ["serve"]).exit_code == 0 and fake_serve[-1].served_metrics == DEFAULT_OFFERED
    for value, message in [("nope", "unknown metric 'nope'"), (" , ", "--metrics needs at least one metric")]:
        res = runner.invoke(cli, ["serve", "--metrics", value])
        assert res.exit_code == 2 and message in res.output, res.output
    assert len(fake_serve) == 2


def test_a_request_configures_a_metric_as_evaluate_does(loaded: LoadedModel) -> None:
    """``metrics=infidelity(perturbation=gaussian)``: its own key and column, the function's value with that
    setting, next to the default; bad or costly settings are one-line 422s."""
    with _client() as client:
        res = _explain(client, ["infidelity(perturbation=gaussian, noise_std=0.1),infidelity", "sparseness"])
        assert res.status_code == 200, res.text
        answer = res.json()
        key = "infidelity(perturbation=gaussian,noise_std=0.1)"
        assert [m["name"] for m in answer["metrics"]] == [key, "infidelity", "sparseness"]
        got = {col: v for m in answer["metrics"] for col, v in m["values"].items()}
        raw = np.frombuffer(base64.b64decode(answer["map"]), dtype="<f4").reshape(answer["map_shape"])
        maps, classes = torch.from_numpy(raw.copy())[None], torch.tensor([answer["class"]])
        x = loaded.preprocess([sample_image("chelsea")])
        side = math.ceil(math.sqrt(16 * 16 / STEPS))  # the registry's squares: about STEPS of them
        want = infidelity(loaded.model, x, maps, classes, (side,), perturbation="gaussian", noise_std=0.1)
        assert got[key] == pytest.approx(float(want[0]), rel=1e-5)
        assert got[key] != got["infidelity"]
        for spec, message in [("infidelity(perturbaton=gaussian)", "did you mean 'perturbation'"),
                              ("irof(segmentation=quick)", "unknown segmentation 'quick'"),
                              ("infidelity(samples=500)", "does not take the setting 'samples'"),
                              ("mprt(seed=1)", "'mprt' is not offered")]:  # fmt: skip
            res = _explain(client, [spec])
            assert res.status_code == 422 and message in res.json()["detail"], res.text
            assert "\n" not in res.json()["detail"]


def test_cli_serve_list_options_given_twice_add_up(fake_serve: list[Any]) -> None:
    args = ["serve", "--metrics", "deletion", "--metrics", "mprt", "--models", "resnet18"]
    args += ["--models", "squeezenet1_1", "--allowed-hosts", "a.example", "--allowed-hosts", "b.example"]
    res = CliRunner().invoke(cli, [*args, "--no-pretrained"])
    assert res.exit_code == 0, res.output
    config = fake_serve[-1]
    assert config.served_metrics == ("deletion", "mprt")
    assert config.models == ("resnet18", "squeezenet1_1")
    assert config.allowed_hosts == ("a.example", "b.example")
