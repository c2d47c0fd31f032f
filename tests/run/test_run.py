"""``camkit run``: inputs, the store, resumption after SIGKILL, refusal of changed options, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app
from camkit.run import ModelSpec, RunOptions, collect_items, open_store, run

SRC = Path(__file__).resolve().parents[2] / "src"
MODEL = ModelSpec("resnet18", pretrained=False, seed=3, threads=1)
MODEL_ARGS = ["--model", "resnet18", "--no-pretrained", "--seed", "3", "--threads", "1", "--image-size", "64"]
runner = CliRunner()


def make_images(root: Path, n: int, classes: int = 3, bad: tuple[int, ...] = ()) -> Path:
    """``n`` small random images in an ImageFolder tree ``root/c<k>/<i>.png`` (sizes vary); ``bad`` indices
    are files that are not images."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        if i in bad:
            (d / f"{i:04d}.png").write_bytes(b"\x89PNG truncated")
            continue
        arr = rng.integers(0, 255, (32 + i % 17, 40 + i % 13, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(data),
        "--out",
        str(out),
        *MODEL_ARGS,
        "--shard-size",
        "8",
        "--batch-size",
        "4",
        *extra,
    ]


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.complete and sb.complete
    ta, tb = sa.table(), sb.table()
    assert ta.column_names == tb.column_names
    assert ta.to_pylist() == tb.to_pylist() or _nan_equal(ta.to_pylist(), tb.to_pylist())
    for m in sa.methods:
        np.testing.assert_array_equal(sa.maps(m)[:], sb.maps(m)[:])  # NaN rows compare equal


def _nan_equal(x: object, y: object) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return (np.isnan(x) and np.isnan(y)) or x == y
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_nan_equal(p, q) for p, q in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_nan_equal(x[k], y[k]) for k in x)
    return x == y


# ------------------------------------------------------------------------------------------------ inputs


def test_layouts(tmp_path: Path) -> None:
    root = make_images(tmp_path / "tree", 6, classes=2)
    folder = collect_items([root])
    assert [Path(it.path).name for it in folder] == [
        "0000.png",
        "0002.png",
        "0004.png",
        "0001.png",
        "0003.png",
        "0005.png",
    ]
    assert all(it.cls is None for it in folder)
    tree = collect_items([root], layout="imagefolder")
    assert [it.cls for it in tree] == ["c0"] * 3 + ["c1"] * 3
    # manifest CSV and JSONL, paths relative to the manifest
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "boxes"])
        w.writerow(["tree/c0/0000.png", "7", "[[1, 2, 10, 20]]"])
        w.writerow(["tree/c1/0001.png", "", ""])
    man = collect_items([tmp_path / "m.csv"])
    assert man[0].cls == "7" and man[0].boxes == ((1.0, 2.0, 10.0, 20.0),) and man[1].cls is None
    assert Path(man[0].file).is_file()
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "tree/c0/0002.png", "class": 3, "boxes": [[0, 0, 5, 5]]}) + "\n\n"
    )
    assert collect_items([tmp_path / "m.jsonl"])[0].cls == "3"
    # WebDataset-style tar: key.png + key.cls + key.json
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i, src in enumerate(sorted((root / "c0").iterdir())):
            for ext, data in (
                (".png", src.read_bytes()),
                (".cls", str(i).encode()),
                (".json", json.dumps({"boxes": [[0, 0, 4, 4]]}).encode()),
            ):
                info = tarfile.TarInfo(f"sample{i:03d}{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tar = collect_items([tmp_path / "shard-000.tar"])
    assert [it.cls for it in tar] == ["0", "1", "2"] and tar[2].member == "sample002.png"
    assert tar[0].boxes == ((0.0, 0.0, 4.0, 4.0),)
    with pytest.raises(ValueError, match="'path' column"):
        (tmp_path / "bad.csv").write_text("file,class\nx.png,1\n")
        collect_items([tmp_path / "bad.csv"])
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "bad2.jsonl").write_text(json.dumps({"path": "x.png", "boxes": [[5, 5, 1, 1]]}) + "\n")
        collect_items([tmp_path / "bad2.jsonl"])
    with pytest.raises(FileNotFoundError):
        collect_items([tmp_path / "missing"])
    with pytest.raises(ValueError, match="ImageFolder"):
        (root / "loose.png").write_bytes((root / "c0" / "0000.png").read_bytes())
        collect_items([root], layout="imagefolder")


def test_tar_manifest_true_class_and_metrics(tmp_path: Path) -> None:
    """Tar shards and a manifest with classes and boxes: explained class = the given one, per-image metrics."""
    root = make_images(tmp_path / "tree", 5, classes=1)
    files = sorted((root / "c0").iterdir())
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for i, src in enumerate(files):
            for ext, data in ((".png", src.read_bytes()), (".cls", str(10 + i).encode())):
                info = tarfile.TarInfo(f"k{i}{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    res = run(
        [tmp_path / "a.tar"],
        tmp_path / "st",
        model=MODEL,
        options=RunOptions(
            methods=("gradcam", "layercam"),
            target="true",
            image_size=64,
            shard_size=4,
            batch_size=2,
            metrics=("deletion", "insertion"),
            steps=4,
            thumbnails=32,
        ),
        workers=0,
    )
    t = res.store.table().to_pylist()
    assert [r["class"] for r in t] == [10, 11, 12, 13, 14]
    assert all(0.0 <= r["gradcam.deletion"] <= 1.0 and 0.0 <= r["layercam.insertion"] <= 1.0 for r in t)
    assert res.store.thumbnail("layercam", 4) is not None
    assert res.summary["ok"] == 5 and set(res.summary["metrics"]["gradcam"]) == {"deletion", "insertion"}
    # manifest with boxes: pointing and box metrics, NaN without boxes
    lines = [{"path": str(files[0]), "boxes": [[0, 0, 20, 20]], "class": "tench"}, {"path": str(files[1])}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.warns(UserWarning, match="1 without ground-truth boxes are left out"):
        res = run(
            [tmp_path / "m.jsonl"],
            tmp_path / "st2",
            model=MODEL,
            options=RunOptions(image_size=64, metrics=("pointing", "box"), resolution="input", batch_size=2),
            workers=0,
        )
    rows = res.store.table().to_pylist()
    assert rows[0]["gradcam.pointing"] in (0.0, 1.0) and np.isnan(rows[1]["gradcam.pointing"])
    assert rows[0]["gt_boxes"] == [[0.0, 0.0, 20.0, 20.0]] and rows[0]["true_class"] == "tench"
    assert res.store.maps("gradcam").shape == (2, 64, 64)
    with pytest.raises(ValueError, match="has no class"):
        run(
            [tmp_path / "m.jsonl"],
            tmp_path / "st3",
            model=MODEL,
            options=RunOptions(image_size=64, target="true"),
            workers=0,
        )


# ------------------------------------------------------------------------------------------------ store


def test_store_rows_errors_and_reader(tmp_path: Path) -> None:
    data = make_images(tmp_path / "d", 10, bad=(3,))
    res = run(
        [data],
        tmp_path / "st",
        model=MODEL,
        options=RunOptions(image_size=64, shard_size=4, batch_size=3, topk=3),
        workers=1,
    )
    store = open_store(tmp_path / "st")
    t = store.table().to_pylist()
    assert [r["index"] for r in t] == list(range(10))
    bad = [r for r in t if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["path"].endswith("0003.png") and "cannot read" in bad[0]["error"]
    assert bad[0]["class"] is None and bad[0]["gradcam.box"] is None
    ok = [r for r in t if r["status"] == "ok"]
    assert all(len(r["topk_classes"]) == 3 and r["topk_classes"][0] == r["class"] for r in ok)
    assert all(abs(r["topk_probs"][0] - r["prob"]) < 1e-6 for r in ok)
    num = [int(Path(r["path"]).stem) for r in ok]
    assert [(r["width"], r["height"]) for r in ok] == [(40 + k % 13, 32 + k % 17) for k in num]
    maps = store.maps("gradcam")
    assert maps.dtype == np.float16 and maps.shape == (10, 2, 2)  # resnet18 layer4 at 64 px
    bad_row = next(i for i, r in enumerate(t) if r["status"] == "error")
    assert np.isnan(maps[bad_row]).all() and np.isfinite(maps[0]).all()
    assert float(np.nanmax(maps[:])) <= 1.0 and float(np.nanmin(maps[:])) >= 0.0
    assert store.config["options"]["methods"] == ["gradcam"] and store.config["map_shapes"] == {
        "gradcam": [2, 2]
    }
    assert store.summary()["errors"] == 1 and res.summary["ok"] == 9
    with pytest.raises(ValueError, match="no maps of 'layercam'"):
        store.maps("layercam")
    with pytest.raises(ValueError, match="not a camkit run store"):
        open_store(tmp_path / "d")
    # changed options: refused with the difference named; --overwrite starts again
    with pytest.raises(ValueError, match=r"methods: \['gradcam'\] then, \['gradcam', 'hirescam'\] now"):
        run(
            [data],
            tmp_path / "st",
            model=MODEL,
            options=RunOptions(
                methods=("gradcam", "hirescam"), image_size=64, shard_size=4, batch_size=3, topk=3
            ),
        )
    with pytest.raises(ValueError, match="inputs"):
        run(
            [data / "c0"],
            tmp_path / "st",
            model=MODEL,
            options=RunOptions(image_size=64, shard_size=4, batch_size=3, topk=3),
        )
    res = run(
        [data / "c0"],
        tmp_path / "st",
        model=MODEL,
        overwrite=True,
        options=RunOptions(image_size=64, shard_size=4, batch_size=3),
        workers=0,
    )
    assert res.store.n == 4 and res.store.table().num_rows == 4
    # the same command again: nothing to compute
    again = run(
        [data / "c0"],
        tmp_path / "st",
        model=MODEL,
        options=RunOptions(image_size=64, shard_size=4, batch_size=3),
        workers=0,
    )
    assert again.computed == 0 and again.store.table().num_rows == 4
    # a creation killed half-way (its run.json marker still says "creating"): started again, not refused
    half = tmp_path / "half"
    half.mkdir()
    marker = {"format": "camkit-run-store", "version": 2, "state": "creating", "methods": ["gradcam"]}
    (half / "run.json").write_text(json.dumps(marker))
    (half / "items.parquet").write_bytes(b"partial")
    assert run([data / "c0"], half, model=MODEL, options=RunOptions(image_size=64), workers=0).store.complete
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a camkit run store"):
        run([data], tmp_path / "other", model=MODEL, options=RunOptions(image_size=64))


def test_model_comes_back_unchanged(tmp_path: Path) -> None:
    """The Explainer uses camkit.compare: no hooks left, same mode and requires_grad."""
    import torch

    from camkit.run import Explainer
    from camkit.run.sources import ImageDataset

    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items = collect_items([make_images(tmp_path / "d", 3)])
    from camkit.adapters import Preprocess

    ex = Explainer(model, Preprocess(size=(64, 64)), None, RunOptions(methods=("gradcam", "xgradcam")), items)
    rows, maps, _ = ex([ImageDataset(items, ex.preprocess)[i] for i in range(3)])
    assert len(rows) == 3 and maps["xgradcam"].shape == (3, 2, 2) and rows[0]["label"] is None
    assert not model.training and model.fc.weight.requires_grad is False and model.fc.bias.requires_grad
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ resume


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_resume_deletes_the_temporary_files_a_killed_run_left(tmp_path: Path) -> None:
    """A run killed while writing leaves the temporary files of its atomic writes (a shard's Parquet file,
    run.json) and zarr's; the run that resumes deletes them, and nothing of the user's, even a name that looks
    like a temporary file of a file camkit does not write."""
    data = make_images(tmp_path / "d", 24)
    out = tmp_path / "s"
    args = ("--methods", "gradcam", "--shard-size", "8")
    assert runner.invoke(app, run_args(data, out, *args)).exit_code == 0
    (out / "shards" / "000001.done").unlink()  # the run "died" in shard 1
    (out / "table.parquet").unlink()
    planted = [
        out / "shards" / ".000001.parquet.ab12cd34.part",
        out / ".run.json.zz99yy88.part",
        out / "maps.zarr" / "gradcam" / ("zarr." + "0" * 32 + ".partial"),
    ]
    for f in planted:
        f.write_bytes(b"half")
    mine = out / "shards" / ".mine.ab12cd34.part"
    mine.write_text("mine")
    res = runner.invoke(app, run_args(data, out, *args))
    assert res.exit_code == 0, res.output
    assert [f for f in planted if f.exists()] == []
    assert mine.read_text() == "mine"
    assert open_store(out).is_finished()


def test_sigkill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """A run over 120 images (2 unreadable) killed with SIGKILL three times at random points and restarted with
    the same command ends with the same table and maps as an uninterrupted run; no row lost or duplicated."""
    data = make_images(tmp_path / "d", 120, bad=(17, 90))
    ref = tmp_path / "ref"
    args = ("--workers", "1", "--methods", "gradcam,gradcam++")
    res = runner.invoke(app, run_args(data, ref, *args))
    assert res.exit_code == 1, res.output  # some images unreadable
    assert open_store(ref).summary()["errors"] == 2
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "camkit", *run_args(data, out, *args)]
    rnd = random.Random(7)
    n_shards = open_store(ref).n_shards  # 15

    def done() -> int:
        return len(list((out / "shards").glob("*.done"))) if (out / "shards").is_dir() else 0

    killed_at = []
    for target in sorted(rnd.sample(range(1, n_shards - 4), 3)):
        proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while proc.poll() is None and done() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.1))  # somewhere in the next shard: mid-batch, mid-write
        assert proc.poll() is None, proc.communicate()[1].decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(done())
        assert not (out / "table.parquet").exists()
    assert killed_at[-1] < n_shards
    proc = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert not list(out.rglob("*.part"))  # no temporary file left behind
    assert_same_store(ref, out)
    assert open_store(out).table().column("index").to_pylist() == list(range(120))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_run_and_evaluate_store(tmp_path: Path) -> None:
    data = make_images(tmp_path / "d", 6)
    out = tmp_path / "st"
    res = runner.invoke(
        app, run_args(data, out, "--workers", "0", "--metrics", "deletion", "--steps", "3", "--progress")
    )
    assert res.exit_code == 0, res.output
    assert "6 of 6 images explained" in res.output and "deletion" in res.output
    res = runner.invoke(app, ["evaluate", str(out)])
    assert res.exit_code == 0, res.output
    assert "6 of 6 images explained" in res.output and "gradcam" in res.output
    res = runner.invoke(app, ["evaluate", str(out), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] == 6
    # the same command again resumes nothing and says so
    res = runner.invoke(app, run_args(data, out, "--workers", "0", "--metrics", "deletion", "--steps", "3"))
    assert res.exit_code == 0 and "this run computed 0" in res.output
    res = runner.invoke(app, run_args(data, out, "--workers", "0", "--methods", "layercam"))
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = runner.invoke(app, run_args(data, tmp_path / "x", "--target", "best"))
    assert res.exit_code == 2 and "--target must be one of" in res.output
    res = runner.invoke(app, run_args(data, tmp_path / "x", "--metrics", "speed"))
    assert res.exit_code == 2 and "unknown metric 'speed'" in res.output
    res = runner.invoke(app, run_args(data, tmp_path / "x", "--layers", "layer3,layer4"))
    assert res.exit_code == 2 and "--resolution input" in res.output
