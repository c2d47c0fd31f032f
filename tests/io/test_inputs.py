"""Input discovery (:mod:`camkit.io.inputs`): one walk and one order for every command.

A nested tree whose sorted order differs from a top-down walk's (a folder's own files first): ``camkit explain``,
``camkit run`` and ``camkit evaluate`` list its images in the same order, through the commands themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app
from camkit.cli.common import collect_inputs
from camkit.evaluate import collect_images
from camkit.io.inputs import IMAGE_SUFFIXES, discover_images, folder_images
from camkit.run import collect_items, open_store

runner = CliRunner()

#: relative paths of the tree, in the order every command lists them: folder name by folder name, so ``b/``'s
#: files come before ``b.png`` (``"b" < "b.png"``) and ``a/`` before ``top.png``; a walk that lists a folder's
#: own files first would give ``b.png, top.png, a/...``
ORDER = ["a/deep/x.png", "a/y.jpg", "b/z.PNG", "b.png", "top.png"]


def _tree(root: Path) -> Path:
    for i, rel in enumerate(reversed(ORDER)):  # created in another order than the expected one
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i, 16), (40 * i, 90, 160)).save(
            p, format="PNG" if "png" in rel.lower() else "JPEG"
        )
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "c.png")
    Image.new("RGB", (8, 8)).save(root / "a" / ".dot.png")
    return root


def _rel(paths: list[Path] | list[str], root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def test_one_order_for_every_discovery(tmp_path: Path) -> None:
    root = _tree(tmp_path / "img")
    assert _rel(discover_images([root]), root) == ORDER
    assert _rel(folder_images(root), root) == ORDER
    assert _rel(collect_inputs([root]), root) == ORDER  # explain, localize, report
    assert _rel(collect_images([root]), root) == ORDER  # evaluate
    assert _rel([it.path for it in collect_items([root])], root) == ORDER  # run


def test_files_keep_the_order_given_and_missing_or_empty_inputs_are_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "img")
    files = [root / "top.png", root / "notes.txt", root / "a"]
    assert _rel(discover_images(files), root) == ["top.png", "notes.txt", "a/deep/x.png", "a/y.jpg"]
    with pytest.raises(FileNotFoundError, match="image file not found"):
        discover_images([root / "missing.png"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image file"):
        discover_images([tmp_path / "empty"])


def test_symbolic_links_to_folders_are_not_followed(tmp_path: Path) -> None:
    root = _tree(tmp_path / "img")
    os.symlink(root / "a", root / "link")
    os.symlink(root / "top.png", root / "alias.png")
    assert _rel(discover_images([root]), root) == [*ORDER[:2], "alias.png", *ORDER[2:]]


def test_the_suffixes_are_compared_in_lower_case() -> None:
    assert ".png" in IMAGE_SUFFIXES and ".PNG" not in IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """``camkit.load_model`` builds :class:`_Small` (the commands' one way to a model)."""
    import camkit
    from camkit.adapters import LoadedModel, Preprocess

    def fake(name: str, *args: object, **kwargs: object) -> LoadedModel:
        torch.manual_seed(0)
        return LoadedModel(_Small().eval(), Preprocess(size=(32, 32)), None, name)

    monkeypatch.setattr(camkit, "load_model", fake)


def test_explain_run_and_evaluate_list_a_nested_folder_in_one_order(tmp_path: Path, small: None) -> None:
    root = _tree(tmp_path / "img")
    names = [Path(rel).stem for rel in ORDER]
    model = ["--model", "small", "--no-pretrained", "--threads", "1"]

    res = runner.invoke(app, ["explain", str(root), "--out", str(tmp_path / "ex"), "--no-progress", *model])
    assert res.exit_code == 0, res.output
    explained = json.loads((tmp_path / "ex" / "summary.json").read_text())
    entries = explained if isinstance(explained, list) else explained["entries"]
    assert [e["image"] for e in entries] == names

    res = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "st"), "--workers", "0", *model])
    assert res.exit_code == 0, res.output
    assert _rel(open_store(tmp_path / "st").table().column("path").to_pylist(), root) == ORDER

    ev_args = [
        "--out",
        str(tmp_path / "ev"),
        "--metrics",
        "avg_drop",
        "--methods",
        "gradcam",
        "--format",
        "json",
    ]
    res = runner.invoke(app, ["evaluate", str(root), *ev_args, "--no-progress", *model])
    assert res.exit_code == 0, res.output
    evaluated = json.loads(res.stdout[res.stdout.index("{") :])
    assert [r["image"] for r in evaluated["rows"]] == [Path(rel).name for rel in ORDER]
