"""The ``camkit run`` store under hostile use: what camkit deletes (only its own files of a store it recognises by
its marker), the store's lock (two runs at once), finished stores left untouched (read-only), verified
done-markers (a deleted chunk, a corrupt shard, replaced weights) and target layers compared as resolved."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run import MODEL, MODEL_ARGS, assert_same_store, make_images
from typer.testing import CliRunner

from camkit.cli import app
from camkit.io.files import file_lock
from camkit.run import ModelSpec, RunOptions, open_store, run
from camkit.run import runner as run_module
from camkit.run import store as store_module

SRC = Path(__file__).resolve().parents[2] / "src"
OPTS = RunOptions(image_size=64, shard_size=4, batch_size=2)
cli = CliRunner()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli_args(data: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "run",
        str(data),
        "--out",
        str(out),
        *MODEL_ARGS,
        "--shard-size",
        "4",
        "--batch-size",
        "2",
        *extra,
    ]


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``: kind, size, mtime, inode and (files) content digest."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail the test if any model is loaded (a refusal or a finished store must come before that)."""
    calls: list[str] = []

    def load(self: ModelSpec) -> None:
        calls.append(self.name)
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_module.ModelSpec, "load", load)
    yield calls


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("photos") / "d", 10, bad=(6,))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """A finished store of ``photos`` made in one uninterrupted run (never modified by the tests)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    run([photos], out, model=MODEL, options=OPTS, workers=0)
    return out


# ------------------------------------------------------------------------------- 1: what camkit may delete


def test_folder_with_only_hidden_entries_is_refused_before_any_work(
    tmp_path: Path, photos: Path, no_model: list[str]
) -> None:
    """``mkdir -p v/.git; echo x > v/.env; camkit run photos --out v`` deleted both; now it is refused, before
    the model is loaded, and nothing is touched."""
    v = tmp_path / "v"
    (v / ".git").mkdir(parents=True)
    (v / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (v / ".env").write_text("x\n")
    before = snapshot(v)
    with pytest.raises(ValueError, match=r"holds other files \('\.env', '\.git'\), not a camkit run store"):
        run([photos], v, model=MODEL, options=OPTS, workers=0)
    assert snapshot(v) == before and no_model == []


def test_run_into_the_current_git_repository_deletes_nothing(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, no_model: list[str]
) -> None:
    """``cd repo && camkit run ../photos --out .``: one error line, exit 2, the repository as it was."""
    repo = tmp_path / "repo"
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / "README.md").write_text("mine\n")
    before = snapshot(repo)
    monkeypatch.chdir(repo)
    res = cli.invoke(app, cli_args(photos, "."))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --out '.' is a folder that holds other files")
    assert snapshot(repo) == before and no_model == []


def test_half_created_store_is_known_by_its_marker_not_by_names(
    tmp_path: Path, photos: Path, no_model: list[str]
) -> None:
    """Files named like a store's (items.parquet, maps.zarr) without camkit's marker are not camkit's: refused,
    kept. A temporary file of another pattern is not camkit's either."""
    half = tmp_path / "half"
    (half / "maps.zarr").mkdir(parents=True)
    (half / "items.parquet").write_bytes(b"the user's")
    before = snapshot(half)
    with pytest.raises(ValueError, match="not a camkit run store"):
        run([photos], half, model=MODEL, options=OPTS, workers=0)
    assert snapshot(half) == before
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / ".run.json.tmp").write_text("{}")
    with pytest.raises(ValueError, match="holds other files"):
        run([photos], odd, model=MODEL, options=OPTS, workers=0)
    assert (odd / ".run.json.tmp").read_text() == "{}"


def test_a_run_json_camkit_did_not_write_is_not_a_store(
    tmp_path: Path, photos: Path, no_model: list[str]
) -> None:
    """``mkdir -p p/src; echo '{}' > p/run.json; camkit run photos --out p --overwrite`` deleted ``p/src``."""
    p = tmp_path / "p"
    (p / "src").mkdir(parents=True)
    (p / "src" / "main.py").write_text("print('mine')\n")
    (p / "run.json").write_text("{}\n")
    before = snapshot(p)
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r"holds a run\.json that camkit did not write"):
            run([photos], p, model=MODEL, options=OPTS, workers=0, overwrite=overwrite)
    res = cli.invoke(app, [*cli_args(photos, p), "--overwrite"])
    assert (
        res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    )
    assert snapshot(p) == before and no_model == []
    with pytest.raises(ValueError, match="not write"):
        open_store(p)


def test_store_of_an_older_camkit_is_refused_with_the_way_out(tmp_path: Path, photos: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"options": {}, "n": 10, "map_shape": [2, 2], "version": 1}))
    (old / "table.parquet").write_bytes(b"...")
    before = snapshot(old)
    for attempt in (
        lambda: open_store(old),
        lambda: run([photos], old, model=MODEL, options=OPTS, workers=0, overwrite=True),
    ):
        with pytest.raises(ValueError, match=r"made by an older camkit.*new --out"):
            attempt()
    assert snapshot(old) == before


def test_overwrite_deletes_only_the_stores_own_files(tmp_path: Path, photos: Path, reference: Path) -> None:
    """--overwrite replaces a verified store; a store holding anything camkit did not write is refused (before
    the model is loaded), at the top or deep inside its folders; ``lock`` is kept."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    for extra in (
        Path("notes.txt"),
        Path("shards") / "mine.csv",
        Path("maps.zarr") / "gradcam" / "c" / "mine",
    ):
        (out / extra).write_text("the user's")
        before = snapshot(out)
        with pytest.raises(ValueError, match=rf"--overwrite deletes only camkit's own files.*{extra.name}"):
            run([photos], out, model=MODEL, options=OPTS, workers=0, overwrite=True)
        assert snapshot(out) == before
        (out / extra).unlink()
    (out / "thumbs").symlink_to(tmp_path)  # a link camkit never makes: not followed, not deleted
    with pytest.raises(ValueError, match="'thumbs'"):
        run([photos], out, model=MODEL, options=OPTS, workers=0, overwrite=True)
    (out / "thumbs").unlink()
    lock_inode = (out / "lock").stat().st_ino
    res = run([photos], out, model=MODEL, options=RunOptions(image_size=64, shard_size=5), overwrite=True)
    assert res.computed == 10 and res.store.n_shards == 2 and (out / "lock").stat().st_ino == lock_inode
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        f"{s:06d}.{ext}" for s in range(2) for ext in ("done", "parquet")
    ]


def test_half_created_store_is_started_again_only_by_the_lock_holder(
    tmp_path: Path, photos: Path, reference: Path
) -> None:
    """A store whose creation was killed (marker ``creating``) is started again; while another process holds
    its lock (it is being created right now), it is refused and left alone."""
    out = tmp_path / "st"
    out.mkdir()
    marker = {"format": "camkit-run-store", "version": 2, "state": "creating", "methods": ["gradcam"]}
    (out / "run.json").write_text(json.dumps(marker))
    (out / "items.parquet").write_bytes(b"half")
    (out / "maps.zarr" / "gradcam").mkdir(parents=True)
    before = snapshot(out)
    with file_lock(out / "lock"), pytest.raises(ValueError, match="in use by another camkit process"):
        run([photos], out, model=MODEL, options=OPTS, workers=0)
    assert {k: v for k, v in snapshot(out).items() if k != "lock"} == before
    with pytest.raises(ValueError, match="is being created"):
        open_store(out)
    assert run([photos], out, model=MODEL, options=OPTS, workers=0).computed == 10
    assert_same_store(reference, out)


# ------------------------------------------------------------------------------- 3: two runs at once


#: ``python -c`` program: import camkit (the slow part), say so (``argv[1].<pid>``), wait for the file
#: ``argv[1]``, then ``camkit ARGV[2:]``: processes started apart reach the store within milliseconds. Creating
#: the maps' zarr group takes 0.5 s longer, so that two creations overlap.
_STARTER = """
import os, sys, time
import zarr
import camkit.run.runner
from camkit._entry import main
_open = zarr.open_group
def slow_open(*args, **kwargs):
    group = _open(*args, **kwargs)
    if kwargs.get("mode") == "w":
        time.sleep(0.5)
    return group
zarr.open_group = slow_open
open(f"{sys.argv[1]}.{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.002)
sys.argv = ["camkit", *sys.argv[2:]]
main()
"""


def test_two_processes_creating_the_same_store(tmp_path: Path, photos: Path, reference: Path) -> None:
    """Two ``camkit run`` processes on one new store, released together, several times: each exits as a run
    does (1: one photo is unreadable: it made the store or found it finished) or 2 with one ``error:`` line
    (in use); the store is whole and equal to an uninterrupted run's; nothing temporary is left."""
    outcomes = []
    for trial in range(4):
        out, go = tmp_path / f"st{trial}", tmp_path / f"go{trial}"
        cmd = [sys.executable, "-c", _STARTER, str(go), *cli_args(photos, out, "--workers", "0")]
        procs = [
            subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(
            Path(f"{go}.{proc.pid}").exists() or proc.poll() is not None for proc in procs
        ):
            time.sleep(0.02)
        go.touch()
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=600)
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            assert proc.returncode in (1, 2), (proc.returncode, stderr)
            if proc.returncode == 2:
                assert len(lines) == 1 and "is in use by another camkit process" in lines[0], stderr
                assert lines[0].startswith("error: ")
            else:
                assert "Traceback" not in stderr and "of 10 images explained" in stdout, stderr
            outcomes.append(proc.returncode)
        assert_same_store(reference, out)
        assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".partial"))]
    assert 1 in outcomes


# ------------------------------------------------------------------------------- 10: a finished store


def test_finished_store_loads_nothing_and_writes_nothing(
    tmp_path: Path, photos: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, no_model: list[str]
) -> None:
    """A rerun of a finished store with the same settings: no model, no lock, no write (every writer of the
    store made to fail, the tree read-only), the stored summary back; also with ``--layers`` naming the layer
    ``auto`` chose."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    (out / "lock").unlink()  # a store copied to a read-only medium without its lock file

    def no_write(*args: object, **kwargs: object) -> None:
        raise AssertionError("a write into a finished store")

    for name in ("atomic_write", "write_json", "file_lock"):
        monkeypatch.setattr(store_module, name, no_write)
    monkeypatch.setattr(run_module, "save_image", no_write)
    before = snapshot(out)
    modes = {p: p.stat().st_mode for p in [out, *out.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        for layers in ("auto", open_store(out).config["layers"][0]):
            res = run([photos], out, model=MODEL, options=replace(OPTS, layers=layers))
            assert res.computed == 0 and res.summary["ok"] == 9 and res.summary["this_run"]["computed"] == 0
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(out) == before and no_model == []


def _read_only_cli(store: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m camkit ARGS`` with ``store`` really read-only: a read-only bind mount in a private mount
    namespace (``unshare``) when running as root (whom permissions do not stop), else permission bits."""
    cmd = [sys.executable, "-m", "camkit", *args]
    if os.geteuid() != 0:
        for p in [store, *store.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    script = (
        'mount --bind -o ro "$1" "$1" && shift && touch "$1/probe" 2>/dev/null && exit 99; shift; exec "$@"'
    )
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(store), str(store), *cmd],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_finished_store_reruns_on_a_read_only_file_system(
    tmp_path: Path, photos: Path, reference: Path
) -> None:
    """``camkit run`` on a finished store mounted read-only: exit as the run did (1: one unreadable photo), the
    summary printed, no traceback; an unfinished one is refused with one line."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    before = snapshot(out)
    t0 = time.perf_counter()
    proc = _read_only_cli(out, cli_args(photos, out, "--workers", "0"))
    seconds = time.perf_counter() - t0
    assert proc.returncode != 99, "the bind mount is not read-only"
    assert proc.returncode == 1, proc.stderr
    assert "9 of 10 images explained" in proc.stdout and "this run computed 0" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr
    assert snapshot(out) == before
    print(f"rerun of a finished store on a read-only mount: {seconds:.2f} s (CLI, whole process)")
    # unfinished: one line, naming the folder
    (out / "shards" / "000001.done").unlink()
    proc = _read_only_cli(out, cli_args(photos, out, "--workers", "0"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(out) in proc.stderr


# ------------------------------------------------------------------------------- 17: what a resume verifies


def test_replaced_weights_under_the_same_path_are_another_setting(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other weights saved under the same --weights path were accepted and one store mixed two models: the
    weights are identified by their SHA-256, and other ones are refused before the model is loaded."""
    import torchvision

    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    spec = ModelSpec("resnet18", weights=str(weights), pretrained=False, threads=1)
    res = run([photos], tmp_path / "st", model=spec, options=OPTS, workers=0)
    assert res.store.config["options"]["weights"].startswith("sha256:")
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    calls: list[str] = []
    monkeypatch.setattr(run_module.ModelSpec, "load", lambda self: calls.append("load"))
    with pytest.raises(ValueError, match=r"other settings \(weights: 'sha256:[0-9a-f]{64}' then, 'sha256:"):
        run([photos], tmp_path / "st", model=spec, options=OPTS, workers=0)
    assert calls == []


def test_deleted_zarr_chunk_is_recomputed(tmp_path: Path, photos: Path, reference: Path) -> None:
    """A done shard whose zarr chunk was deleted gave NaN maps on rows marked ok, exit 0: now the shard does not
    verify, is named on a warning line, computed again, and the store equals an uninterrupted run's."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    chunk = out / "maps.zarr" / "gradcam" / "c" / "1" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    res = cli.invoke(app, cli_args(photos, out, "--workers", "0"))
    assert res.exit_code == 1, res.output  # one unreadable photo, as the reference
    assert (
        "warning: shard 1 of the store" in res.output and "maps.zarr/gradcam/c/1/0/0 is missing" in res.output
    )
    assert "this run computed 4" in res.output
    assert_same_store(reference, out)
    ok = np.array([s == "ok" for s in open_store(out).table().column("status").to_pylist()])
    assert np.isfinite(open_store(out).maps("gradcam")[:][ok]).all()


def test_corrupt_done_shard_is_recomputed_not_stuck(tmp_path: Path, photos: Path, reference: Path) -> None:
    """An unfinished store whose done shard's Parquet file was corrupted (same size) was stuck forever: now the
    resume finds it by its digest, says so, computes it again and finishes."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    for name in ("table.parquet", "summary.json", "shards/000002.done"):
        (out / name).unlink()  # killed before its last shard
    shard = out / "shards" / "000000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    warnings: list[str] = []
    res = run([photos], out, model=MODEL, options=OPTS, workers=0, warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("shard 0 of the store") and "SHA-256" in warnings[0]
    assert res.computed == 6  # shard 0 again (4 images), and shard 2 (2)
    assert_same_store(reference, out)


def test_marker_without_records_or_for_a_missing_shard_file(
    tmp_path: Path, photos: Path, reference: Path
) -> None:
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    (out / "shards" / "000001.done").write_text('{"rows": 4}\n')  # a marker that records nothing
    (out / "shards" / "000002.parquet").unlink()
    with pytest.warns(UserWarning) as caught:
        res = run([photos], out, model=MODEL, options=OPTS, workers=0)
    said = sorted(str(w.message).split(" of the store")[0] for w in caught)
    assert said == ["shard 1", "shard 2"] and res.computed == 6
    assert_same_store(reference, out)


# ------------------------------------------------------------------------------- 18: resolved layers


def test_layers_are_compared_as_resolved(tmp_path: Path, photos: Path, reference: Path) -> None:
    """A store made with ``--layers auto`` (which chose layer4): ``--layers layer4`` is the same setting (nothing
    to do), also as ``module.layer4`` (resolved once the model is loaded); ``--layers layer3`` is refused with
    both names."""
    out = tmp_path / "st"
    shutil.copytree(reference, out)
    chosen = open_store(out).config["layers"]
    assert open_store(out).config["options"]["layers"] == "auto" and chosen == ["layer4"]
    for given in ("layer4", "module.layer4"):
        res = cli.invoke(app, cli_args(photos, out, "--workers", "0", "--layers", given))
        assert res.exit_code == 1 and "this run computed 0" in res.output, res.output
    res = cli.invoke(app, cli_args(photos, out, "--workers", "0", "--layers", "layer3"))
    assert res.exit_code == 2, res.output
    assert "target layers: ['layer4'] then, ['layer3'] now" in res.output
    assert_same_store(reference, out)
