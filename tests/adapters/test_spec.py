"""One model spec and loader (:class:`camkit.adapters.ModelSpec`) for the commands, ``camkit run`` and the app."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camkit
from camkit.adapters import LoadedModel, ModelSpec, Preprocess
from camkit.app.server import AppConfig
from camkit.cli import common
from camkit.run import ModelSpec as RunModelSpec


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, object]]]:
    """``camkit.load_model`` records what it is asked and builds a tiny model."""
    calls: list[tuple[str, dict[str, object]]] = []

    def fake(name: str, **kwargs: object) -> LoadedModel:
        calls.append((name, kwargs))
        with torch.random.fork_rng():  # building draws no number from torch's random state
            model = torch.nn.Linear(2, 2)
        return LoadedModel(model, Preprocess(size=(16, 16)), None, name)

    monkeypatch.setattr(camkit, "load_model", fake)
    return calls


def test_one_record_under_every_name() -> None:
    assert RunModelSpec is ModelSpec and common.ModelOptions is ModelSpec
    # the commands build it positionally in this order: model, weights, pretrained, seed, threads, device
    spec = ModelSpec("resnet18", Path("w.pt"), False, 4, 2, "cpu")
    assert (spec.name, spec.weights, spec.pretrained, spec.seed, spec.threads, spec.device) == (
        "resnet18",
        "w.pt",
        False,
        4,
        2,
        "cpu",
    )
    assert isinstance(spec.weights, str)  # a Path is kept as its text (run.json is JSON)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


def test_load_applies_threads_and_seed_then_the_one_loader(
    asked: list[tuple[str, dict[str, object]]],
) -> None:
    before = torch.get_num_threads()
    try:
        ModelSpec("m", seed=7, threads=1, device="cpu").load()
        assert torch.get_num_threads() == 1
        first = torch.rand(3)
        ModelSpec("m", seed=7).load()
        assert torch.equal(torch.rand(3), first)  # the seed was set before building
    finally:
        torch.set_num_threads(before)
    assert asked[0] == ("m", {"weights": None, "pretrained": True, "device": "cpu", "input_size": None})
    common.load_model(ModelSpec("seg"), input_size=96)
    assert asked[-1][1]["input_size"] == 96
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        ModelSpec("m", threads=0).load()


def test_seed_none_leaves_the_random_state(asked: list[tuple[str, dict[str, object]]]) -> None:
    torch.manual_seed(1)
    ModelSpec("m", seed=None).load()
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after)


def test_identity_records_the_weights_by_content(tmp_path: Path) -> None:
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    spec = ModelSpec("resnet18", weights=w, pretrained=False, seed=3, threads=1, device="cpu")
    assert spec.identity() == {
        "model": "resnet18",
        "weights": "sha256:" + hashlib.sha256(b"weights").hexdigest(),
        "pretrained": False,
        "seed": 3,
    }
    assert ModelSpec().identity()["weights"] is None
    assert ModelSpec(input_size=64).identity()["input_size"] == 64
    with pytest.raises(ValueError, match="cannot read the weights file"):
        ModelSpec(weights=tmp_path / "missing.pt").identity()


def test_summary_fields_and_file_tag() -> None:
    assert ModelSpec("r", weights=Path("a/w.pt"), pretrained=True).to_dict() == {
        "model": "r",
        "weights": "a/w.pt",
        "pretrained": False,
        "seed": 0,
        "threads": None,
        "device": "cpu",
    }
    assert ModelSpec().file_tag() == "" and ModelSpec("timm/x y").file_tag() == "_timm-x-y"


def test_the_app_builds_its_models_from_the_spec() -> None:
    assert AppConfig(model="m", pretrained=False, seed=5).spec("m") == ModelSpec(
        "m", pretrained=False, seed=5, device="cpu"
    )
    assert AppConfig(model="m").spec("m").seed is None  # pretrained weights: torch's random state untouched


def test_the_spec_imports_no_torch() -> None:
    code = "import sys; from camkit.adapters import ModelSpec; ModelSpec('x').identity(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
