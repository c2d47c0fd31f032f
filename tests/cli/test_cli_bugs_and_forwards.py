"""What a command does with a bug and how many forward passes it runs.

* Only camkit's own refusals (:class:`camkit.errors.CamkitError`), a missing input and operating-system errors end in
  one ``error:`` line (exit status 2). Any other exception, here raised from inside the model's forward, is a bug:
  its traceback is printed, then one line asking to report it, exit status 3 (docs/cli-errors.md).
* ``camkit explain`` runs exactly the forwards its method needs: one for Grad-CAM per image (the layers named, so no
  probe of ``--layers auto``), also for a segmentation model, whose target (the main class over its predicted mask)
  is read from that forward (``Explanation.chosen``).

The models are tiny random-weight stand-ins for :func:`camkit.load_model`, counted by a forward hook.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from typer.testing import CliRunner

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.cli import BUG_LINE, EXIT_BUG, app
from camkit.errors import CamkitError

runner = CliRunner()
SIDE = 32
LABELS = ["background", "ant", "bee", "cat", "dog"]


class TinyCnn(nn.Module):
    def __init__(self, fail: type[Exception] | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail is not None:
            raise self.fail("boom inside the model's forward")
        return self.fc(self.stage(self.stem(x)).mean(dim=(2, 3)))


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict(out=self.stage(self.stem(x)))


def tiny_segmenter() -> nn.Module:
    """A torchvision segmentation model (``_SimpleSegmentationModel``) of two convolutions."""
    return _SimpleSegmentationModel(_Backbone(), nn.Conv2d(8, len(LABELS), 1), None)


def _stand_in(build: Callable[[], nn.Module], task: str = "classification") -> Callable[..., LoadedModel]:
    torch.manual_seed(0)
    model = build().eval()

    def load(name: str = "tiny", *args: object, **kwargs: object) -> LoadedModel:
        return LoadedModel(model, Preprocess(size=(SIDE, SIDE)), list(LABELS), "tiny", task)

    return load


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., list[int]]]:
    """``use(build, task)``: commands load this model; the returned list counts its forwards."""
    handles = []

    def use(build: Callable[[], nn.Module], task: str = "classification") -> list[int]:
        load = _stand_in(build, task)
        model = load().model
        calls: list[int] = []
        handles.append(model.register_forward_hook(lambda *_: calls.append(1)))
        monkeypatch.setattr(camkit, "load_model", load)
        return calls

    yield use
    for h in handles:
        h.remove()


def photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def explain(tmp_path: Path, *extra: str, images: int = 1):
    files = [str(photo(tmp_path / f"p{i}.png", seed=i)) for i in range(images)]
    return runner.invoke(app, ["explain", *files, "--model", "tiny", "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError])
def test_an_exception_from_the_models_forward_is_a_bug_with_its_traceback(
    tmp_path: Path, forwards: Callable[..., list[int]], error: type[Exception]
) -> None:
    forwards(lambda: TinyCnn(fail=error))
    res = explain(tmp_path)
    assert res.exit_code == EXIT_BUG == 3, res.output
    assert "Traceback (most recent call last)" in res.stderr
    assert "boom inside the model's forward" in res.stderr and error.__name__ in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == f"error: {BUG_LINE}"


def test_a_camkit_error_is_one_line(tmp_path: Path, forwards: Callable[..., list[int]]) -> None:
    forwards(TinyCnn)
    res = explain(tmp_path, "--layers", "no_such_layer")
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and BUG_LINE not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no_such_layer" in lines[0]


def test_a_camkit_error_raised_by_the_model_is_one_line(
    tmp_path: Path, forwards: Callable[..., list[int]]
) -> None:
    forwards(lambda: TinyCnn(fail=CamkitError))
    res = explain(tmp_path)
    assert res.exit_code == 2 and res.stderr.strip() == "error: boom inside the model's forward", res.output


def test_explain_runs_one_forward_per_image_for_gradcam(
    tmp_path: Path, forwards: Callable[..., list[int]]
) -> None:
    calls = forwards(TinyCnn)
    res = explain(tmp_path, "--methods", "gradcam", "--layers", "stage", images=2)
    assert res.exit_code == 0, res.output
    assert len(calls) == 2


def test_explain_on_a_segmentation_model_runs_one_forward(
    tmp_path: Path, forwards: Callable[..., list[int]]
) -> None:
    calls = forwards(tiny_segmenter, "segmentation")
    res = explain(tmp_path, "--methods", "gradcam", "--layers", "backbone.stage")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1  # the target chosen on the explained forward's output, not on a forward of its own
    entry = json.loads((tmp_path / "out" / "summary.json").read_text())[0]
    assert entry["task"] == "segmentation" and entry["region"] in ("mask", "image")
    assert entry["class"] in range(1, len(LABELS)) and entry["label"] == LABELS[entry["class"]]
    assert "segmentation, explaining class" in res.stdout
