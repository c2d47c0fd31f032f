"""One batch of ``camkit run`` (:class:`camkit.run.Explainer`): one forward of the model per batch, the rows'
predictions (top-k, class, probability) read from that forward's output; ``camkit.run`` has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import camkit.run
from camkit.adapters import Preprocess
from camkit.core.accel import CHECK_ROWS
from camkit.run import Explainer, Item, RunOptions
from camkit.run.sources import ImageDataset


class Counted(nn.Module):
    """A small classifier that counts its forward calls (on the class: a prepared copy counts too)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return self.head(self.act(self.features(x)))


def _items(folder: Path, n: int) -> list[Item]:
    folder.mkdir()
    items = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.new("RGB", (30 + 3 * i, 24), (30 * i, 200 - 20 * i, 90)).save(p)
        items.append(Item(path=str(p), cls=str(i % 7), file=str(p)))
    return items


@pytest.mark.parametrize("target", ["top1", "true"])
@pytest.mark.parametrize("resolution", ["feature", "input"])
def test_one_forward_per_batch(tmp_path: Path, target: str, resolution: str) -> None:
    torch.manual_seed(0)
    model = Counted().eval()
    items = _items(tmp_path / "img", 4)
    labels = [f"class {i}" for i in range(7)]
    options = RunOptions(
        methods=("gradcam", "layercam", "gradcam++"), target=target, resolution=resolution, topk=3
    )
    explainer = Explainer(model, Preprocess(size=(32, 32)), labels, options, items)
    explainer.map_shapes()  # once per process, on a blank image
    samples = [ImageDataset(items, explainer.preprocess)[i] for i in range(4)]
    # the first batch of a shape also checks the prepared copy against the model as given, which runs the batch
    # CHECK_ROWS images at a time (more forwards, each of fewer images)
    before = Counted.calls
    explainer(samples)
    assert Counted.calls - before == 1 + -(-4 // CHECK_ROWS)
    before = Counted.calls
    rows, maps, _ = explainer(samples)
    assert Counted.calls - before == 1  # the three methods, the top-k and the target: one forward
    assert {m: a.shape[0] for m, a in maps.items()} == {"gradcam": 4, "layercam": 4, "gradcam++": 4}

    x = torch.stack([s.x for s in samples if s.x is not None]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)
    top = probs.topk(3, dim=1)
    for j, row in enumerate(rows):
        assert row["topk_classes"] == top.indices[j].tolist()
        assert row["topk_probs"] == pytest.approx(top.values[j].tolist(), abs=1e-5)
        assert row["topk_labels"] == [labels[c] for c in row["topk_classes"]]
        expected = j % 7 if target == "true" else int(top.indices[j, 0])
        assert row["class"] == expected and row["label"] == labels[expected]
        assert row["prob"] == pytest.approx(float(probs[j, expected]), abs=1e-5)


def test_unreadable_images_make_no_forward(tmp_path: Path) -> None:
    model = Counted().eval()
    items = _items(tmp_path / "img", 2)
    explainer = Explainer(model, Preprocess(size=(32, 32)), None, RunOptions(), items)
    explainer.map_shapes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image")
    samples = [
        ImageDataset([Item(path=str(bad), file=str(bad))] * 2, explainer.preprocess)[i] for i in range(2)
    ]
    for k, s in enumerate(samples):
        s.index = k
    before = Counted.calls
    rows, _, _ = explainer(samples)
    assert Counted.calls == before and [r["status"] for r in rows] == ["error", "error"]


def _imports(path: Path) -> set[str]:
    """The camkit modules a file imports, at its top and inside its functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("camkit"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("camkit")}
    return found


def test_the_run_package_has_no_import_cycle() -> None:
    """Within ``camkit.run`` (imports inside functions included): the driver imports the engines, the engines
    the runner, never the other way."""
    folder = Path(camkit.run.__file__).parent
    modules = {p.stem: p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {
            m.split(".")[2]
            for m in _imports(path)
            if m.startswith("camkit.run.") and m.split(".")[2] in modules
        }
        for name, path in modules.items()
    }

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name))
    assert not cycles, graph
    assert "runner" in graph["raydata"] and "raydata" in graph["driver"]
