"""The product matrix: every method kind x every way to run methods, on tiny random-weight models.

Rows (:data:`ROWS`) are the method kinds of :mod:`camkit.methods.registry`, one or a few cheap representatives
each (LayerMethod, PerturbationMethod, PassMethod on a tiny CNN; AttentionMethod on a tiny timm ViT), plus two
rows that mix kinds in one call and one of configured methods (``finercam(alpha=0.5)``, ``sscam(samples=2)``). Columns are the entry points that take methods: the library's ``explain``,
``compare`` (and TopK) and ``augment=``; the ``explain`` command (several methods and layers, ``--target top2``,
``--augment``); ``localize``; ``run`` at both resolutions with every metric (a manifest with boxes); ``report``
from images and from those stores; ``evaluate`` on images and on the stores; and the web app's API (with a
metric).

Every cell checks what came out (files, map shapes, finite values, one ok row per image, a number per method and
metric), not only the exit status. The models are built by a stand-in for :func:`camkit.load_model` (the one
function every command and the app load a model through), by name: ``tinycnn`` and ``tinyvit``.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner, Result

import camkit
from camkit.adapters import LoadedModel, Preprocess
from camkit.cli import app as cli
from camkit.methods import METHODS, get_method
from camkit.methods.registry import AttentionMethod, LayerMethod, PassMethod, PerturbationMethod
from camkit.metrics.registry import METRICS

SIDE = 32  # the models' input size
LABELS = ["ant", "bee", "cat", "dog", "eel"]
N_IMAGES = 3
#: file -> its ground-truth box (original pixels); images are 48 x 40 noise with a bright square there
BOXES = {"a.png": [4, 4, 24, 20], "b.png": [20, 10, 44, 36], "c.png": [0, 16, 30, 40]}
ALL_METRICS = (
    "deletion,insertion,avg_drop,increase,road,arcc,pointing,pointing_strict,box,maxboxacc,"
    "energy_pointing,relevance_mass,relevance_rank,mask_auc,top_k,sparseness,entropy,effective_complexity,"
    "random_logit,mprt"
)
#: the ``run`` / ``evaluate`` columns of each metric (maxboxacc: a per-image IoU curve in the store)
STORE_COLUMNS = ("deletion", "insertion", "avg_drop", "increase", "road_morf", "road_lerf", "arcc", "pointing",
                 "pointing_strict", "box_iou", "box_acc", "iou_curve", "energy_pointing", "relevance_mass",
                 "relevance_rank", "mask_auc", "top_k", "sparseness", "entropy", "effective_complexity",
                 "random_logit", "mprt", "mprt_last")  # fmt: skip
SUMMARY_COLUMNS = (*(c for c in STORE_COLUMNS if c != "iou_curve"), "maxboxacc")
#: the summary columns of ``evaluate --metrics all``: every column of the metric registry
ALL_COLUMNS = (*(c for m in METRICS.values() for c in m.columns), "maxboxacc")
STEPS = "3"
runner = CliRunner()


# --------------------------------------------------------------------------------------------- the models


class TinyCnn(nn.Module):
    """stem (32 px) -> stage1 (16 px) -> stage2 (8 px) -> GAP -> Linear: every layer/pass/perturbation method."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, len(LABELS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


def tiny_vit() -> nn.Module:
    """A timm ViT with a 4 x 4 patch grid (32 px, patch 8), two blocks of self-attention."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=SIDE,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=len(LABELS),
    )


BUILDERS: dict[str, Callable[[], nn.Module]] = {"tinycnn": TinyCnn, "tinyvit": tiny_vit}
#: the layers of the several-layers cells, and the feature grid of the default layer
LAYERS = {"tinycnn": "stage1,stage2", "tinyvit": "blocks.0.norm1,blocks.1.norm1"}


@functools.cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def fake_load_model(name: str = "tinycnn", *args: object, **kwargs: object) -> LoadedModel:
    """:func:`camkit.load_model` for the tiny models (same weights on every load)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r} (this test knows {', '.join(BUILDERS)})")
    return LoadedModel(_built(name), Preprocess(size=(SIDE, SIDE)), list(LABELS), name)


@pytest.fixture(scope="module", autouse=True)
def tiny_models() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(camkit, "load_model", fake_load_model)
        yield


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    """One row of the matrix: methods run together on one model."""

    model: str
    methods: tuple[str, ...]

    @property
    def arg(self) -> str:
        return ",".join(self.methods)


ROWS: dict[str, Row] = {
    "layer": Row("tinycnn", ("gradcam", "layercam")),
    "perturbation": Row("tinycnn", ("scorecam",)),
    "pass": Row("tinycnn", ("fullgrad", "reciprocam", "polycam", "unioncam")),
    "attention": Row("tinyvit", ("rollout", "legrad")),
    "mixed": Row("tinycnn", ("gradcam", "scorecam", "polycam")),
    "mixed-vit": Row("tinyvit", ("gradcam", "rollout")),
    "configured": Row("tinycnn", ("finercam(alpha=0.5)", "sscam(samples=2)")),  # methods with parameters
}
KIND_OF = {"layer": "LayerMethod", "perturbation": "PerturbationMethod", "pass": "PassMethod",
           "attention": "AttentionMethod"}  # fmt: skip
ROW_IDS = list(ROWS)
#: methods that explain one class per image and refuse a TopK target (a deliberate refusal naming the method)
ONE_TARGET = {"reciprocam", "polycam", "cameras", "opticam", "unioncam"}


def _kind(method: object) -> str:
    """The method's class, or the first of its bases that has a row (ClipPerturbationMethod: a
    PerturbationMethod that also takes clips, run through the same commands)."""
    names = [cls.__name__ for cls in type(method).__mro__]
    return next((n for n in names if n in KIND_OF.values()), names[0])


def test_the_rows_cover_every_method_kind() -> None:
    kinds = {_kind(m) for m in METHODS.values()}
    assert kinds == set(KIND_OF.values()), "a new method kind: add a row for it"
    for row_id, kind in KIND_OF.items():
        assert {_kind(get_method(m)) for m in ROWS[row_id].methods} == {kind}, row_id


# ----------------------------------------------------------------------------------------------- helpers


def make_images(root: Path) -> Path:
    """Three 48 x 40 noise images with a bright square at their box, and the same boxes as a camkit JSON
    annotation file (``ann.json``) and a ``run`` manifest (``manifest.csv``) beside them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (x0, y0, x1, y1) in BOXES.items():
        arr = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
        arr[y0:y1, x0:x1] = 230
        Image.fromarray(arr).save(root / name)
    (root / "ann.json").write_text(json.dumps({n: {"boxes": [b]} for n, b in BOXES.items()}))
    lines = ["path,boxes"] + [f'{n},"{json.dumps([b])}"' for n, b in BOXES.items()]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


def pictures(root: Path) -> list[Image.Image]:
    return [Image.open(root / n).convert("RGB") for n in BOXES]


def invoke(*args: object) -> Result:
    return runner.invoke(cli, [str(a) for a in args])


def ok(res: Result) -> Result:
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{_trace(res)}"
    assert "Traceback" not in res.output
    return res


def refused(res: Result, *needles: str) -> str:
    """A deliberate refusal: exit 2, one ``error:`` line (no traceback) holding every needle; returns it."""
    assert res.exit_code == 2, f"exit {res.exit_code}, not a refusal\n{res.output}\n{_trace(res)}"
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _trace(res: Result) -> str:
    if res.exc_info is None or isinstance(res.exception, SystemExit):
        return ""
    import traceback

    return "".join(traceback.format_exception(*res.exc_info)[-6:])


def strict_json(text: str) -> Any:
    return json.loads(text[text.index("{") :])


def assert_map(m: torch.Tensor | np.ndarray, shape: tuple[int, ...], what: str) -> None:
    arr = m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float32)
    assert arr.shape == shape, f"{what}: shape {arr.shape}, expected {shape}"
    assert np.isfinite(arr).all(), f"{what}: non-finite values"
    assert arr.min() >= 0.0 and arr.max() <= 1.0 + 1e-3, f"{what}: outside [0, 1]: {arr.min()}..{arr.max()}"
    assert arr.max() > 0.0, f"{what}: all zero"


def number(v: object, what: str) -> float:
    assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{what}: {v!r} is not a number"
    assert math.isfinite(v), f"{what}: {v!r}"
    return float(v)


def report_data(page: str) -> dict[str, Any]:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert block is not None, "the report holds no data block"
    data: dict[str, Any] = json.loads(block.group(1))
    return data


# ------------------------------------------------------------------------------------------ library cells


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-lib-explain" for r in ROW_IDS])
def test_lib_explain(row_id: str, images: Path) -> None:
    row = ROWS[row_id]
    loaded = camkit.load_model(row.model)
    pics = pictures(images)
    for method in row.methods:
        e = camkit.explain(loaded.model, pics, method, preprocess=loaded.preprocess, labels=loaded.labels)
        assert e.method == method
        assert_map(e.maps, (N_IMAGES, SIDE, SIDE), f"{method} maps")
        assert e.raw, method
        for name, raw in e.raw.items():
            assert raw.shape[0] == N_IMAGES and raw.dim() == 3, (method, name, raw.shape)
            assert torch.isfinite(raw).all(), (method, name)
        assert e.labels is not None and all(lbl in LABELS for lbl in e.labels)
        assert e.overlay(0).size == pics[0].size


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-lib-compare" for r in ROW_IDS])
def test_lib_compare(row_id: str, images: Path) -> None:
    row = ROWS[row_id]
    loaded = camkit.load_model(row.model)
    pics = pictures(images)
    res = camkit.compare(loaded.model, pics, methods=list(row.methods), preprocess=loaded.preprocess)
    assert list(res) == list(row.methods)
    for method, e in res.items():
        assert_map(e.maps, (N_IMAGES, SIDE, SIDE), f"compare {method}")
        alone = camkit.explain(loaded.model, pics, method, preprocess=loaded.preprocess)
        torch.testing.assert_close(
            e.maps, alone.maps, rtol=1e-4, atol=1e-4, msg=f"compare != explain: {method}"
        )
    topk = [m for m in row.methods if m not in ONE_TARGET]
    if topk:
        res2 = camkit.compare(loaded.model, pics, methods=topk, targets=camkit.TopK(2),
                              preprocess=loaded.preprocess)  # fmt: skip
        assert list(res2) == topk
        for method, e in res2.items():
            assert_map(e.maps, (N_IMAGES, 2, SIDE, SIDE), f"compare top2 {method}")
    for method in set(row.methods) & ONE_TARGET:  # refused, by name
        with pytest.raises(ValueError, match=rf"^{re.escape(method)} explains one target per image"):
            camkit.compare(
                loaded.model, pics, methods=[method], targets=camkit.TopK(2), preprocess=loaded.preprocess
            )


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-lib-augment" for r in ROW_IDS])
def test_lib_augment(row_id: str, images: Path) -> None:
    """augment='flip' on each method: a map, or (attention methods; own-pass methods may be) a refusal saying so."""
    row = ROWS[row_id]
    loaded = camkit.load_model(row.model)
    pics = pictures(images)
    failures = []
    for method in row.methods:  # every method tried, the failures listed together
        try:
            e = camkit.explain(loaded.model, pics, method, preprocess=loaded.preprocess, augment="flip")
        except ValueError as err:
            if isinstance(get_method(method), AttentionMethod) and re.search("augment.*attention", str(err)):
                continue  # refused, and says why
            if isinstance(get_method(method), PassMethod) and "augment" in str(err) and method in str(err):
                continue  # an own-pass method may be refused too, by name
            failures.append(f"{method}: {type(err).__name__}: {err}")
            continue
        assert not isinstance(get_method(method), AttentionMethod), f"{method}: augment was not refused"
        assert_map(e.maps, (N_IMAGES, SIDE, SIDE), f"{method} augment=flip")
    assert not failures, "\n".join(failures)


# -------------------------------------------------------------------------------------------- explain CLI


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-cli-explain" for r in ROW_IDS])
def test_cli_explain_methods_and_layers(row_id: str, images: Path, tmp_path: Path) -> None:
    row = ROWS[row_id]
    out = tmp_path / "out"
    files = [images / n for n in BOXES]
    ok(invoke("explain", *files, "--model", row.model, "--methods", row.arg, "--layers", LAYERS[row.model],
              "--out", out, "--no-progress"))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    maps = [e for e in summary if e["method"] != "grid"]
    grids = [e for e in summary if e["method"] == "grid"]
    assert sorted((e["image"], e["method"]) for e in maps) == sorted(
        (Path(n).stem, m) for n in BOXES for m in row.methods
    )
    for entry in maps:
        with Image.open(entry["file"]) as im:  # the overlay, at the photo's size
            assert im.size == (48, 40), (entry, im.size)
        assert entry["label"] in LABELS and 0.0 <= entry["prob"] <= 1.0
        assert row.model in Path(entry["file"]).name and entry["method"] in Path(entry["file"]).name
        if isinstance(get_method(entry["method"]), LayerMethod | PerturbationMethod):
            assert entry["layers"] == LAYERS[row.model].split(","), entry  # both layers explained
    # several methods or layers: one grid per image (methods x layers), wider than one overlay
    assert sorted(e["image"] for e in grids) == sorted(Path(n).stem for n in BOXES)
    for entry in grids:
        with Image.open(entry["file"]) as im:
            assert im.width > 48 and im.height >= 40, (entry, im.size)


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-cli-explain-top2" for r in ROW_IDS])
def test_cli_explain_top2(row_id: str, images: Path, tmp_path: Path) -> None:
    """``--target top2``: an overlay per class, or for a method that explains one class, a refusal naming it."""
    row = ROWS[row_id]
    out = tmp_path / "out"
    res = invoke("explain", images / "a.png", "--model", row.model, "--methods", row.arg, "--target", "top2",
                 "--out", out, "--no-progress")  # fmt: skip
    single = [m for m in row.methods if m in ONE_TARGET]
    if single:
        line = refused(res, "explains one target per image")
        assert any(m in line for m in single), line
        assert not list(out.glob("*.png")) if out.exists() else True  # refused before any work
        return
    ok(res)
    summary = [e for e in json.loads((out / "summary.json").read_text()) if e["method"] != "grid"]
    assert sorted((e["method"], Path(e["file"]).stem.rsplit("_", 1)[-1]) for e in summary) == sorted(
        (m, k) for m in row.methods for k in ("top1", "top2")
    )
    for m in row.methods:
        classes = [e["class"] for e in summary if e["method"] == m]
        assert len(set(classes)) == 2, (m, classes)
    for e in summary:
        assert Path(e["file"]).is_file(), e


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-cli-augment" for r in ROW_IDS])
def test_cli_explain_augment(row_id: str, images: Path, tmp_path: Path) -> None:
    """``--augment flip``: overlays; attention methods are refused by name (own-pass methods may be too)."""
    row = ROWS[row_id]
    out = tmp_path / "out"
    res = invoke("explain", images / "a.png", images / "b.png", "--model", row.model, "--methods", row.arg,
                 "--augment", "flip", "--out", out, "--no-progress")  # fmt: skip
    attention = [m for m in row.methods if isinstance(get_method(m), AttentionMethod)]
    own_pass = [m for m in row.methods if isinstance(get_method(m), PassMethod)]
    if attention or (own_pass and res.exit_code == 2 and "--augment" in res.output):
        line = refused(res, "--augment")
        assert any(m in line for m in attention + own_pass), line
        return
    ok(res)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((e["image"], e["method"]) for e in summary if e["method"] != "grid") == sorted(
        (i, m) for i in ("a", "b") for m in row.methods
    )
    assert all(e["options"]["augment"] == "flip" for e in summary if "options" in e)


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-cli-localize" for r in ROW_IDS])
def test_cli_localize(row_id: str, images: Path, tmp_path: Path) -> None:
    """``localize`` (one method per call): a boxes picture per image, boxes.json with boxes inside the photo."""
    row = ROWS[row_id]
    out = tmp_path / "out"
    for method in row.methods:
        ok(invoke("localize", images / "a.png", images / "b.png", "--model", row.model, "--method", method,
                  "--out", out, "--no-progress"))  # fmt: skip
    entries = json.loads((out / "boxes.json").read_text())
    assert sorted((e["image"], e["method"]) for e in entries) == sorted(
        (i, m) for i in ("a", "b") for m in row.methods
    )
    for e in entries:
        assert e["size"] == [48, 40] and e["label"] in LABELS and Path(e["file"]).is_file(), e
        assert e["boxes"], e  # a random-weight model still looks somewhere
        for b in e["boxes"]:
            assert 0 <= b["x0"] < b["x1"] <= 48 and 0 <= b["y0"] < b["y1"] <= 40, (e["method"], b)


# ------------------------------------------------------------------------------------------------ run CLI


@functools.cache
def _run(row_id: str, resolution: str, root: Path) -> tuple[Result, Path]:
    """``camkit run`` of a row on the manifest with every metric, once per (row, resolution) in the session."""
    row = ROWS[row_id]
    store = root / f"store-{row_id}-{resolution}"
    res = invoke("run", root / "manifest.csv", "--out", store, "--model", row.model, "--methods", row.arg,
                 "--metrics", ALL_METRICS, "--steps", STEPS, "--resolution", resolution, "--workers", "0",
                 "--batch-size", "2", "--shard-size", "2", "--no-progress")  # fmt: skip
    return res, store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Result, Path]]:
    root = make_images(tmp_path_factory.mktemp("data"))
    return lambda row_id, resolution: _run(row_id, resolution, root)


def _store(stores: Callable[[str, str], tuple[Result, Path]], row_id: str, resolution: str) -> Path:
    res, store = stores(row_id, resolution)
    ok(res)
    return store


CELLS_RES = [(r, res) for r in ROW_IDS for res in ("feature", "input")]


@pytest.mark.parametrize(("row_id", "resolution"), CELLS_RES, ids=[f"{r}-run-{s}" for r, s in CELLS_RES])
def test_cli_run(row_id: str, resolution: str, stores: Callable[[str, str], tuple[Result, Path]]) -> None:
    from camkit.run import open_store

    row = ROWS[row_id]
    path = _store(stores, row_id, resolution)
    st = open_store(path)
    assert st.complete
    assert st.methods == list(row.methods)
    table = st.table()
    rows = table.to_pylist()
    loaded = camkit.load_model(row.model)
    x = torch.zeros(1, 3, SIDE, SIDE)
    feature = {
        m: tuple(next(iter(camkit.explain(loaded.model, x, m).raw.values())).shape[-2:]) for m in row.methods
    }
    assert len(rows) == N_IMAGES and [r["status"] for r in rows] == ["ok"] * N_IMAGES
    assert sorted(Path(r["path"]).name for r in rows) == sorted(BOXES)
    for method in row.methods:
        for col in (*STORE_COLUMNS, "box"):
            assert f"{method}.{col}" in table.column_names, (method, col, table.column_names)
        for col in ("deletion", "insertion", "avg_drop", "road_morf", "pointing", "box_iou"):
            for r in rows:
                number(r[f"{method}.{col}"], f"{method}.{col} of {r['path']}")
        maps = np.asarray(st.maps(method)[:], dtype=np.float32)
        assert maps.shape[0] == N_IMAGES and np.isfinite(maps).all(), (method, maps.shape)
        assert (
            maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-3 and (maps.reshape(N_IMAGES, -1).max(1) > 0).all()
        )
        if resolution == "input":  # the library's maps, stored as float16
            assert maps.shape[1:] == (SIDE, SIDE), (method, maps.shape)
            for i, r in enumerate(rows):
                with Image.open(path.parent / r["path"]) as im:  # manifest paths: from its folder
                    e = camkit.explain(
                        loaded.model, [im.convert("RGB")], method, preprocess=loaded.preprocess
                    )
                np.testing.assert_allclose(
                    maps[i], e.maps[0].numpy(), atol=2e-2, err_msg=f"{method} {r['path']}"
                )
        else:  # the method's own resolution (several shapes in one run: its own, or the largest of them)
            own = feature[method]
            allowed = {own} if len(set(feature.values())) == 1 else {own, max(feature.values())}
            assert maps.shape[1:] in allowed, (method, maps.shape, feature)
    summary = st.summary()
    for method in row.methods:
        assert set(SUMMARY_COLUMNS) <= set(summary["metrics"][method]), (method, summary["metrics"][method])
        number(summary["metrics"][method]["maxboxacc"], f"{method} maxboxacc")


# --------------------------------------------------------------------------------------------- report CLI


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-report-images" for r in ROW_IDS])
def test_cli_report_images(row_id: str, images: Path, tmp_path: Path) -> None:
    row = ROWS[row_id]
    out = tmp_path / "r.html"
    ok(invoke("report", *(images / n for n in BOXES), "--model", row.model, "--methods", row.arg,
              "--metrics", "deletion,insertion,avg_drop,increase", "--steps", STEPS, "--full-side", "0",
              "--thumb-side", "48", "-o", out))  # fmt: skip
    data = report_data(out.read_text(encoding="utf-8"))
    assert [im["name"] for im in data["images"]] == [Path(n).stem for n in BOXES]
    for im in data["images"]:
        assert {m["method"] for m in im["maps"]} == set(row.methods), im["name"]
        for method in row.methods:
            for metric in ("deletion", "insertion", "avg_drop", "increase"):
                number(im["metrics"][method][metric], f"{im['name']} {method} {metric}")


@pytest.mark.parametrize(
    ("row_id", "resolution"), CELLS_RES, ids=[f"{r}-report-store-{s}" for r, s in CELLS_RES]
)
def test_cli_report_store(
    row_id: str, resolution: str, stores: Callable[[str, str], tuple[Result, Path]], tmp_path: Path
) -> None:
    row = ROWS[row_id]
    store = _store(stores, row_id, resolution)
    out = tmp_path / "r.html"
    ok(invoke("report", store, "-o", out, "--image-root", store.parent))
    data = report_data(out.read_text(encoding="utf-8"))
    assert sorted(im["name"] for im in data["images"]) == sorted(BOXES)
    for im in data["images"]:
        assert {m["method"] for m in im["maps"]} == set(row.methods), im["name"]
        for method in row.methods:
            for metric in ("deletion", "insertion", "pointing", "box_iou"):
                number(im["metrics"][method][metric], f"{im['name']} {method} {metric}")


# ------------------------------------------------------------------------------------------- evaluate CLI


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-evaluate-images" for r in ROW_IDS])
def test_cli_evaluate_images(row_id: str, images: Path, tmp_path: Path) -> None:
    row = ROWS[row_id]
    res = ok(invoke("evaluate", *(images / n for n in BOXES), "--model", row.model, "-m", row.arg, "--metrics",
                    "all", "-a", images / "ann.json", "--steps", STEPS, "--batch-size", "2", "-o", tmp_path / "ev",
                    "--format", "json", "--no-progress"))  # fmt: skip
    data = strict_json(res.stdout)
    assert set(data["summary"]) == set(row.methods)
    for method in row.methods:
        assert set(data["summary"][method]) == set(ALL_COLUMNS), data["summary"][method]
        for col, v in data["summary"][method].items():
            number(v, f"{method} {col}")
    table = invoke("evaluate", *(images / n for n in BOXES), "--model", row.model, "-m", row.arg, "--metrics",
                   "deletion,pointing", "-a", images / "ann.json", "--steps", STEPS, "-o", tmp_path / "ev2",
                   "--format", "tsv", "--no-progress")  # fmt: skip
    lines = ok(table).stdout.splitlines()
    assert lines[0].split("\t") == ["method", "deletion", "pointing"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == list(row.methods)
    for ln in lines[1:]:
        for cell in ln.split("\t")[1:]:
            number(float(cell), f"tsv {ln}")


@pytest.mark.parametrize(
    ("row_id", "resolution"), CELLS_RES, ids=[f"{r}-evaluate-store-{s}" for r, s in CELLS_RES]
)
def test_cli_evaluate_store(
    row_id: str, resolution: str, stores: Callable[[str, str], tuple[Result, Path]]
) -> None:
    row = ROWS[row_id]
    store = _store(stores, row_id, resolution)
    data = strict_json(ok(invoke("evaluate", store, "--format", "json")).stdout)
    assert set(data["metrics"]) == set(row.methods)
    for method in row.methods:
        assert set(SUMMARY_COLUMNS) <= set(data["metrics"][method]), data["metrics"][method]
        for col in ("deletion", "insertion", "road_morf", "pointing", "box_iou", "maxboxacc"):
            number(data["metrics"][method][col], f"{method} {col}")
    # the table for people (on a terminal wide enough for every column): a column per metric, a row per method
    text = ok(runner.invoke(cli, ["evaluate", str(store)], env={"COLUMNS": "1000"})).stdout
    for col in SUMMARY_COLUMNS:
        assert re.search(rf"\W{col}\W", text), (col, text)
    for method in row.methods:
        assert re.search(rf"^\W*{re.escape(method)}\W.*\d\.\d", text, re.M), (method, text)


def test_evaluate_store_tsv_holds_only_the_data(stores: Callable[[str, str], tuple[Result, Path]]) -> None:
    """``--format tsv`` on a store: a header and a row of numbers per method on stdout, as for images."""
    row = ROWS["layer"]
    store = _store(stores, "layer", "input")
    lines = ok(invoke("evaluate", store, "--format", "tsv")).stdout.splitlines()
    header = lines[0].split("\t")
    assert header[0] == "method" and set(SUMMARY_COLUMNS) <= set(header[1:]), lines[:3]
    assert [ln.split("\t")[0] for ln in lines[1:]] == list(row.methods)
    for ln in lines[1:]:
        for col, cell in zip(header[1:], ln.split("\t")[1:], strict=True):
            number(float(cell), f"tsv {col} of {ln}")


# ------------------------------------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from camkit.app import AppConfig, create_app

    app = create_app(
        AppConfig(model="tinycnn", models=("tinycnn", "tinyvit"), pretrained=False, workers=1, queue=4)
    )
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


@pytest.mark.parametrize("row_id", ROW_IDS, ids=[f"{r}-app-api" for r in ROW_IDS])
def test_app_api(row_id: str, images: Path, client: Any) -> None:
    row = ROWS[row_id]
    config = client.get("/api/config").json()
    kinds = {m["name"]: m["kind"] for m in config["methods"]}
    layers = client.get("/api/layers", params={"model": row.model})
    assert layers.status_code == 200, layers.text
    assert layers.json()["auto"], layers.json()
    png = (images / "a.png").read_bytes()
    for method in row.methods:
        assert kinds[method.split("(")[0]] == type(get_method(method)).__name__  # a configured one: its base
        res = client.post("/api/explain", data={"model": row.model, "method": method, "alpha": "0.4",
                                                "metrics": "deletion"},
                          files={"file": ("a.png", png, "image/png")})  # fmt: skip
        assert res.status_code == 200, (method, res.status_code, res.text)
        ans = res.json()
        assert [m["name"] for m in ans["metrics"]] == ["deletion"], ans["metrics"]
        assert 0.0 <= ans["metrics"][0]["values"]["deletion"] <= 1.0, (method, ans["metrics"])
        assert ans["method"] == method and ans["model"] == row.model
        assert ans["size"] == [48, 40] and ans["label"] in LABELS and len(ans["top5"]) == 5
        arr = np.frombuffer(base64.b64decode(ans["map"]), dtype="<f4").reshape(ans["map_shape"])
        assert_map(arr, (SIDE, SIDE), f"app {method}")
        assert ans["overlay"].startswith("data:image/png;base64,")
        loaded = camkit.load_model(row.model)
        expl = camkit.explain(loaded.model, [Image.open(images / "a.png").convert("RGB")], method,
                              preprocess=loaded.preprocess)  # fmt: skip
        np.testing.assert_allclose(arr, expl.maps[0].numpy(), rtol=1e-4, atol=1e-5, err_msg=method)
