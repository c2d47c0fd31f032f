"""The app's answer to a bug and the forward passes of a request.

* A :class:`camkit.errors.CamkitError` (camkit's own refusal: an unknown layer) is a 422 with its message; any other
  exception, here raised from inside the model's forward, is a bug: a 500 saying so (its traceback in the server's
  log), never a 422 that would blame the request.
* ``POST /api/explain`` runs exactly the forwards its method needs: one for Grad-CAM on named layers; the top-5 are
  read from that forward's output (``Explanation.output``), not from a forward of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.app import AppConfig, create_app
from camkit.errors import CamkitError

SIDE = 32
LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]


class TinyCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fail: type[Exception] | None = None
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail is not None:
            raise self.fail("boom inside the model's forward")
        return self.fc(self.stage(self.stem(x)).mean(dim=(2, 3)))


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TinyCnn, list[int]]]:
    """The app's models are this tiny CNN; the list counts its forwards."""
    torch.manual_seed(0)
    model = TinyCnn().eval()
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(
        camkit,
        "load_model",
        lambda name, *a, **k: LoadedModel(model, Preprocess(size=(SIDE, SIDE)), list(LABELS), name),
    )
    yield model, calls
    handle.remove()


@pytest.fixture
def client(tiny: tuple[TinyCnn, list[int]]) -> Iterator[TestClient]:
    app = create_app(AppConfig(model="tiny", models=("tiny",), pretrained=False))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def explain(client: TestClient, **form: str):
    return client.post("/api/explain", data={"sample": "chelsea", "model": "tiny", **form})


@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError, ValueError])
def test_an_exception_from_the_models_forward_is_a_500(
    client: TestClient,
    tiny: tuple[TinyCnn, list[int]],
    error: type[Exception],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tiny[0].fail = error
    with caplog.at_level(logging.ERROR, logger="camkit.app"):
        res = explain(client, layer="stage")
    assert res.status_code == 500, res.text
    detail = res.json()["detail"]
    assert f"internal error ({error.__name__})" in detail and "bug" in detail and "report it" in detail
    assert any("boom inside the model's forward" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_a_camkit_error_is_a_422(client: TestClient, tiny: tuple[TinyCnn, list[int]]) -> None:
    res = explain(client, layer="no_such_layer")
    assert res.status_code == 422 and "unknown layer 'no_such_layer'" in res.json()["detail"]
    tiny[0].fail = CamkitError
    res = explain(client, layer="stage")
    assert res.status_code == 422 and res.json()["detail"] == "boom inside the model's forward"


def test_explain_runs_one_forward_and_reads_the_top5_from_it(
    client: TestClient, tiny: tuple[TinyCnn, list[int]]
) -> None:
    _, calls = tiny
    res = explain(client, layer="stage", method="gradcam")
    assert res.status_code == 200, res.text
    assert len(calls) == 1
    answer = res.json()
    top5 = answer["top5"]
    assert (
        len(top5) == 5 and top5[0]["class"] == answer["class"] and top5[0]["label"] == LABELS[answer["class"]]
    )
    assert top5[0]["prob"] == pytest.approx(answer["prob"], abs=1e-6)
    assert [p["prob"] for p in top5] == sorted((p["prob"] for p in top5), reverse=True)
