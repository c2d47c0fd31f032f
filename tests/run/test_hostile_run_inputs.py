"""``camkit run`` under hostile or unusual inputs: methods of different map grids in one store, where a manifest's
relative paths resolve, annotation files, box metrics without boxes, oversized tar members, boxes that break the
box rules, and DataLoader workers whose parent is killed."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from camkit.adapters.preprocess import Preprocess
from camkit.cli import app
from camkit.io.annotations import read_annotations
from camkit.run import ModelSpec, RunOptions, collect_items, open_store, run
from camkit.run.sources import MAX_IMAGE_MEMBER_BYTES, MAX_LABEL_MEMBER_BYTES, ImageDataset, read_item

SRC = Path(__file__).resolve().parents[2] / "src"
MODEL = ModelSpec("resnet18", pretrained=False, seed=3, threads=1)
MODEL_ARGS = ["--model", "resnet18", "--no-pretrained", "--seed", "3", "--threads", "1", "--image-size", "64"]
runner = CliRunner()
T = TypeVar("T")


def images(root: Path, n: int, prefix: str = "im") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        p = root / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def png_bytes(w: int = 24, h: int = 20) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sparse_tar(path: Path, members: list[tuple[str, bytes | int]], tail: bytes = b"") -> Path:
    """A tar written by hand; a member given as an int is that many zero bytes left as a hole in the file (a
    sparse file: big in its header, nothing on disk), or ``tail`` first and then the hole."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            f.write(info.tobuf())
            if isinstance(data, int):
                f.write(tail)
                f.seek(data - len(tail), os.SEEK_CUR)
            else:
                f.write(data)
            f.seek((-info.size) % 512, os.SEEK_CUR)
        f.write(b"\0" * 1024)
    return path


def invoke(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


# ------------------------------------------------------------------ methods whose maps have different grids


@pytest.mark.parametrize("resolution", ["feature", "input"])
def test_methods_of_different_grids_share_a_store(tmp_path: Path, resolution: str) -> None:
    """Grad-CAM (layer4, 2x2 at 64 px), Poly-CAM (its shallowest layer, 8x8) and FullGrad (input size) in one
    run: each method's maps are stored at its own grid (or all at the input size), and report and evaluate read
    the store."""
    images(tmp_path / "imgs", 5)
    code, out = invoke(
        "run",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "s"),
        *MODEL_ARGS,
        "--methods",
        "gradcam,polycam,fullgrad",
        "--resolution",
        resolution,
        "--metrics",
        "deletion",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--workers",
        "0",
    )
    assert code == 0, out
    store = open_store(tmp_path / "s")
    expected = (
        {"gradcam": (2, 2), "polycam": (8, 8), "fullgrad": (64, 64)}
        if resolution == "feature"
        else dict.fromkeys(("gradcam", "polycam", "fullgrad"), (64, 64))
    )
    assert {m: tuple(v) for m, v in store.config["map_shapes"].items()} == expected
    for m, shape in expected.items():
        assert store.map_shape(m) == shape
        maps = store.maps(m)[:]
        assert maps.shape == (5, *shape) and np.isfinite(maps).all()
    code, out = invoke("report", str(tmp_path / "s"), "--out", str(tmp_path / "r.html"))
    assert code == 0, out
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    if resolution == "feature":
        assert "gradcam 2×2, polycam 8×8, fullgrad 64×64" in html
    code, out = invoke("evaluate", str(tmp_path / "s"), "--format", "json")
    assert code == 0, out
    assert set(json.loads(out)["metrics"]) == set(expected)


# ----------------------------------------------------------------------------- where relative paths resolve


def test_manifest_paths_resolve_from_the_manifest_folder_for_every_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is made from one folder, the report from another: both find the photos in the manifest's
    folder, as run.json records it."""
    data = tmp_path / "data"
    images(data / "imgs", 3)
    with open(data / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        for i in range(3):
            w.writerow([f"imgs/im{i}.png"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "third").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = run(["../data/m.csv"], "../s", model=MODEL, options=RunOptions(image_size=64), workers=0)
    assert res.summary["ok"] == 3
    monkeypatch.chdir(tmp_path / "third")
    from camkit.report.store import report_store

    rep = report_store(tmp_path / "s", tmp_path / "r.html")
    assert rep.missing_photos == 0 and rep.stats.images == 3
    store = open_store(tmp_path / "s")
    assert store.path_root(0) == data.resolve() and store.path_root(2) == data.resolve()
    # a folder input given relatively: its paths resolve from the folder the run was started in
    monkeypatch.chdir(tmp_path / "data")
    run(["imgs"], "../s2", model=MODEL, options=RunOptions(image_size=64), workers=0)
    monkeypatch.chdir(tmp_path / "third")
    assert open_store(tmp_path / "s2").path_root(0) == data.resolve()
    assert report_store(tmp_path / "s2", tmp_path / "r2.html").missing_photos == 0


# ------------------------------------------------------------------------------------------ annotation files


def test_annotation_file_as_input_is_refused_with_the_way_out(tmp_path: Path) -> None:
    images(tmp_path / "imgs", 2)
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"im0.png": {"class": 1, "boxes": [[0, 0, 20, 20]]}}))
    code, out = invoke("run", str(ann), "--out", str(tmp_path / "s"), *MODEL_ARGS, "--workers", "0")
    assert code == 2, out
    assert "--annotations" in out and "manifest" in out and not (tmp_path / "s").exists()
    other = tmp_path / "notes.txt"
    other.write_text("not an image\n")
    code, out = invoke("run", str(other), "--out", str(tmp_path / "s"), *MODEL_ARGS, "--workers", "0")
    assert code == 2, out
    assert "a manifest is a .csv file with a 'path' column" in " ".join(out.split())


def test_run_reads_annotations_as_evaluate_does(tmp_path: Path) -> None:
    """camkit JSON and COCO JSON: boxes and classes of the images they name, then the box metrics have values."""
    images(tmp_path / "imgs", 3)
    camkit_json = tmp_path / "a.json"
    camkit_json.write_text(json.dumps({"im0.png": {"class": 2, "boxes": [[0, 0, 20, 20]]}, "im2.png": {}}))
    items = collect_items([tmp_path / "imgs"], annotations=camkit_json)
    assert [(it.cls, it.boxes) for it in items] == [("2", ((0.0, 0.0, 20.0, 20.0),)), (None, ()), (None, ())]
    coco = {
        "images": [{"id": 7, "file_name": "sub/im1.png"}],
        "annotations": [{"image_id": 7, "bbox": [2, 3, 10, 10], "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    code, out = invoke(
        "run",
        str(tmp_path / "imgs"),
        "--annotations",
        str(tmp_path / "coco.json"),
        "--out",
        str(tmp_path / "s"),
        *MODEL_ARGS,
        "--metrics",
        "pointing",
        "--workers",
        "0",
    )
    assert code == 0, out
    rows = open_store(tmp_path / "s").table().to_pylist()
    assert rows[1]["gt_boxes"] == [[2.0, 3.0, 12.0, 13.0]] and rows[1]["true_class"] == "thing"
    assert rows[1]["gradcam.pointing"] in (0.0, 1.0) and np.isnan(rows[0]["gradcam.pointing"])
    with pytest.raises(ValueError, match="none of the 3 image"):
        collect_items(
            [tmp_path / "imgs"], annotations={"other.png": read_annotations(camkit_json)["im0.png"]}
        )


# ----------------------------------------------------------------------------------- box metrics, no boxes


def test_box_metrics_without_any_box_are_refused_before_work(tmp_path: Path) -> None:
    images(tmp_path / "imgs", 2)
    code, out = invoke(
        "run", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), *MODEL_ARGS, "--metrics", "pointing"
    )
    assert code == 2, out
    assert "needs ground-truth boxes" in out and not (tmp_path / "s").exists()


def test_box_metrics_on_some_images_without_boxes_say_so(tmp_path: Path) -> None:
    images(tmp_path / "imgs", 2)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "imgs/im0.png", "boxes": [[0, 0, 10, 10]]})
        + "\n"
        + json.dumps({"path": "imgs/im1.png"})
    )
    args = [
        str(tmp_path / "m.jsonl"),
        "--out",
        str(tmp_path / "s"),
        *MODEL_ARGS,
        "--metrics",
        "box",
        "--workers",
        "0",
    ]
    code, out = invoke("run", *args)
    assert code == 0, out
    text = " ".join(out.split())
    assert "note: box metrics (box) over 1 image(s): 1 without ground-truth boxes are left out" in text
    code, out = invoke("evaluate", str(tmp_path / "s"))
    assert code == 0 and "1 image(s) without ground-truth boxes left out" in " ".join(out.split())


# ------------------------------------------------------------------------------------- tar shards, bounded


def _peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak of Python's allocations while it ran (bytes objects read from a file count)."""
    tracemalloc.start()
    try:
        value = fn()
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tar_label_member_over_the_limit_is_an_error_row_unread(tmp_path: Path) -> None:
    """A .cls member whose header says 200 MB (a hole on disk), and a 5 MB .json: never read; their images
    are error rows."""
    for label, size in (("a.cls", 200_000_000), ("a.json", 5_000_000)):
        shard = sparse_tar(
            tmp_path / "s.tar", [("a.png", png_bytes()), (label, size), ("b.png", png_bytes())]
        )
        items, peak = _peak(functools.partial(collect_items, [shard]))
        assert peak < 5_000_000, (label, peak)
        ds = ImageDataset(items, Preprocess(size=(16, 16)))
        assert ds[0].x is None and label in str(ds[0].error) and "not read" in str(ds[0].error)
        assert str(MAX_LABEL_MEMBER_BYTES) in str(ds[0].error)
        assert ds[1].x is not None and ds[1].error is None  # the next image of the shard is read


def test_tar_image_member_over_the_byte_limit_is_an_error_row_unread(tmp_path: Path) -> None:
    big = MAX_IMAGE_MEMBER_BYTES + 1_000_000
    shard = sparse_tar(tmp_path / "s.tar", [("big.png", big), ("ok.png", png_bytes())], tail=png_bytes())
    items, peak = _peak(lambda: collect_items([shard]))
    assert peak < 5_000_000, peak
    ds = ImageDataset(items, Preprocess(size=(16, 16)))
    sample, peak = _peak(lambda: ds[0])
    assert peak < 5_000_000, peak
    assert sample.x is None and f"is {big} bytes, more than the limit" in str(sample.error)
    assert ds[1].x is not None
    # the limit is a parameter: lowered, a 20 MB member is refused too
    shard2 = sparse_tar(tmp_path / "s2.tar", [("mid.png", 20_000_000)], tail=png_bytes())
    (item,) = collect_items([shard2], max_member_bytes=10_000_000)
    with pytest.raises(ValueError, match="more than the limit of 10000000 bytes"):
        read_item(item)


def test_tar_image_member_is_decoded_as_a_stream_not_read_whole(tmp_path: Path) -> None:
    """A valid PNG followed by 200 MB of zeros inside its member (under the byte limit): decoded from the shard
    without the member ever being copied into memory."""
    shard = sparse_tar(tmp_path / "s.tar", [("pad.png", 200_000_000)], tail=png_bytes(24, 20))
    (item,) = collect_items([shard])
    im, peak = _peak(lambda: read_item(item))
    assert im.size == (24, 20) and peak < 20_000_000, peak


def test_tar_pixel_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    """A PNG whose header claims 60000 x 60000 pixels: refused before decoding, memory stays small."""
    data = bytearray(png_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 60000, 60000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    shard = sparse_tar(tmp_path / "s.tar", [("bomb.png", bytes(data))])
    (item,) = collect_items([shard])
    sample, peak = _peak(lambda: ImageDataset([item], Preprocess(size=(16, 16)))[0])
    assert sample.x is None and "60000x60000" in str(sample.error) and peak < 5_000_000


# ---------------------------------------------------------------------------------- one box reader, one rule


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ("[[0, 0, Infinity, Infinity]]", "non-finite"),
        ("[[0, NaN, 5, 5]]", "non-finite"),
        ("[[true, false, 5, 5]]", "four numbers"),
        ('[["0", 0, 5, 5]]', "four numbers"),
        ("[[5, 0, 1, 5]]", "empty or inverted"),
        ("[[-1, 0, 5, 5]]", "starts outside the image"),
        ("[[0, 0, 5]]", "four numbers"),
    ],
)
def test_manifest_and_tar_boxes_follow_evaluates_rules(tmp_path: Path, boxes: str, message: str) -> None:
    images(tmp_path / "imgs", 1)
    (tmp_path / "m.jsonl").write_text('{"path": "imgs/im0.png", "boxes": ' + boxes + "}\n")
    with pytest.raises(ValueError, match=message) as err:
        collect_items([tmp_path / "m.jsonl"])
    assert "row 1" in str(err.value)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "boxes"], ["imgs/im0.png", boxes]])
    with pytest.raises(ValueError, match=message):
        collect_items([tmp_path / "m.csv"])
    shard = sparse_tar(
        tmp_path / "s.tar", [("k.png", png_bytes()), ("k.json", ('{"boxes": ' + boxes + "}").encode())]
    )
    with pytest.raises(ValueError, match=message) as err:
        collect_items([shard])
    assert "k.json" in str(err.value)
    # and the annotation files of camkit evaluate, by the same reader
    (tmp_path / "a.json").write_text('{"im0.png": {"boxes": ' + boxes + "}}")
    with pytest.raises(ValueError, match=message):
        read_annotations(tmp_path / "a.json")


def test_coco_bbox_of_booleans_is_refused(tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "bbox": [True, 0, 5, 5]}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="four numbers"):
        read_annotations(tmp_path / "c.json")


# -------------------------------------------------------------------------- workers die with their parent


def _workers(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_dataloader_workers_exit_when_the_run_is_killed(tmp_path: Path) -> None:
    images(tmp_path / "imgs", 60)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "camkit", "run", str(tmp_path / "imgs"), "--out", str(tmp_path / "s")]
    cmd += [*MODEL_ARGS, "--methods", "scorecam", "--batch-size", "1", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _workers(proc.pid)
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len(workers) >= 2, (proc.poll(), proc.communicate()[1] if proc.poll() is not None else b"")
        time.sleep(1.0)  # the workers are decoding
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=5)
        for p in alive:  # leave nothing behind, then fail
            p.kill()
        assert not alive, f"{len(alive)} DataLoader worker(s) still alive 5 s after their parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
