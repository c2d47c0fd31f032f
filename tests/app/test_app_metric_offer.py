"""The metrics the app offers: ``camkit serve --metrics`` (``AppConfig.metrics``), an operator's allow-list.

* By default every metric of the registry but those that explain the image many times again (``mprt``,
  ``max_sensitivity``, ``avg_sensitivity``); ``/api/config`` lists only the offered ones.
* A metric outside the list is refused (422) in one line naming the list, before any work; ``all`` means the
  offered ones.
* ``camkit serve --metrics`` fills the list; an unknown name is a usage error (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from typer.testing import CliRunner

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.app import AppConfig, create_app
from camkit.app.metrics import DEFAULT_OFFERED, EXPLAIN_MANY
from camkit.cli import app as cli
from camkit.errors import CamkitError
from camkit.metrics import METRICS

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
