"""The command line's inputs and outputs: bombs, --out checks, atomic writes, name collisions, symlinks,
summary.json, shared model options, folders, progress, --sample help (issue 14).

Runs use a random-weight SqueezeNet (``--model squeezenet1_0 --no-pretrained``: built in a tenth of a second) on
small photos; what the weights are does not matter here.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camkit.cli import app, common
from camkit.errors import CamkitError

runner = CliRunner()
FAST = ["--model", "squeezenet1_0", "--no-pretrained"]


def photo(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A few bytes that claim a side x side PNG (a decompression bomb's header; nothing to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def clean_error(res, status: int = 2) -> str:
    assert res.exit_code == status, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert "error:" in res.output
    return res.output


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded (checks that must come before any model work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common, "load_model", refuse)
    for module in ("explain", "localize", "layers"):
        monkeypatch.setattr(f"camkit.cli.{module}.load_model", refuse)


# ------------------------------------------------------------------------------------------ 4: bombs


def test_a_decompression_bomb_is_one_error_line(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    for command in ("explain", "localize"):
        out = clean_error(invoke(command, bomb, *FAST, "--out", tmp_path / "o"))
        assert "900000000 pixels" in out and "--max-pixels" in out


def test_max_pixels_is_an_option_of_every_image_command(tmp_path):
    small = photo(tmp_path / "p.png")
    for command in ("explain", "localize"):
        out = clean_error(invoke(command, small, *FAST, "--max-pixels", "100", "--out", tmp_path / "o"))
        assert "3072 pixels" in out and "limit of 100" in out


def test_max_pixels_zero_lifts_the_limit(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    out = clean_error(invoke("explain", bomb, *FAST, "--max-pixels", "0", "--out", tmp_path / "o"))
    assert "limit" not in out and "cannot read" in out  # past the size check, then the empty data


def test_a_negative_max_pixels_is_refused_before_model_work(tmp_path, no_model):
    msg = clean_error(
        invoke("explain", photo(tmp_path / "p.png"), "--max-pixels", "-1", "--out", tmp_path / "o")
    )
    assert "--max-pixels" in msg


def test_the_default_limit_is_pils():
    from camkit.io import images

    assert common.DEFAULT_MAX_PIXELS == images.DEFAULT_MAX_PIXELS == (1024 * 1024 * 1024 // 4 // 3)


# ------------------------------------------------------------------------------------------- 6: --out


def test_out_that_is_a_file_is_refused_before_model_work(tmp_path, no_model):
    file = tmp_path / "taken"
    file.write_text("x")
    for out in (file, file / "sub"):
        for command in ("explain", "localize"):
            msg = clean_error(invoke(command, photo(tmp_path / "p.png"), "--out", out))
            assert "a file, not a folder" in msg or "has a file on its path" in msg
    assert file.read_text() == "x"


def test_missing_input_is_refused_before_model_work(tmp_path, no_model):
    msg = clean_error(invoke("explain", tmp_path / "nope.png", photo(tmp_path / "p.png"), "--out", tmp_path))
    assert "not found" in msg and "nope.png" in msg


def test_a_very_long_input_name_gives_bounded_output_names(tmp_path):
    src = photo(tmp_path / ("x" * 250 + ".png"))
    res = invoke("explain", src, *FAST, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    pngs = list((tmp_path / "o").glob("*.png"))
    assert len(pngs) == 1 and len(pngs[0].name.encode()) <= 200


# ------------------------------------------------------------------------------------ 8: atomic writes


def test_an_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    src = photo(tmp_path / "p.png")

    def broken_save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, Path)):
            fp = open(fp, "wb")
        fp.write(b"\x89PNG half")  # the first bytes, then the disk fills up
        fp.flush()
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "o"
    res = invoke("explain", src, *FAST, "--out", out)
    assert res.exit_code != 0
    assert list(out.iterdir()) == []  # no truncated PNG under its name, no temporary file left


# ---------------------------------------------------------------------------------------- 9: collisions


def test_inputs_with_the_same_name_get_distinct_outputs(tmp_path):
    a, b = photo(tmp_path / "d1" / "x.png", seed=1), photo(tmp_path / "d2" / "x.png", seed=2)
    out = tmp_path / "o"
    res = invoke("explain", a, b, *FAST, "--out", out)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    files = [Path(e["file"]).name for e in summary]
    assert len(set(files)) == 2 and all((out / f).is_file() for f in files)
    assert [e["source"] for e in summary] == [str(a), str(b)]


def test_the_model_name_is_in_the_file_name_unless_default():
    assert common.ModelOptions().file_tag() == ""
    assert common.ModelOptions(name="resnet50").file_tag() == "_resnet50"
    assert common.ModelOptions(name="timm/convnext_tiny").file_tag() == "_timm-convnext_tiny"


def test_a_second_model_does_not_overwrite_the_first(tmp_path):
    src, out = photo(tmp_path / "cat.png"), tmp_path / "o"
    assert invoke("explain", src, *FAST, "--out", out).exit_code == 0
    assert (
        invoke("explain", src, "--model", "mobilenet_v3_small", "--no-pretrained", "--out", out).exit_code
        == 0
    )
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["cat_mobilenet_v3_small_gradcam.png", "cat_squeezenet1_0_gradcam.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(Path(e["file"]).name for e in summary) == names  # both runs' entries are kept


def test_summary_merge_rule(tmp_path):
    src, out = photo(tmp_path / "cat.png"), tmp_path / "o"
    assert invoke("explain", src, *FAST, "--methods", "gradcam", "--out", out).exit_code == 0
    assert invoke("explain", src, *FAST, "--methods", "gradcam,layercam", "--out", out).exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    files = [Path(e["file"]).name for e in summary]
    assert sorted(files) == sorted(set(files))  # the file written again is replaced, not listed twice
    assert {
        "cat_squeezenet1_0_gradcam.png",
        "cat_squeezenet1_0_layercam.png",
        "cat_squeezenet1_0_grid.png",
    } == set(files)
    (out / "cat_squeezenet1_0_grid.png").unlink()  # an earlier file deleted: its entry goes at the next run
    assert invoke("explain", src, *FAST, "--methods", "layercam", "--out", out).exit_code == 0
    files = {Path(e["file"]).name for e in json.loads((out / "summary.json").read_text())}
    assert files == {"cat_squeezenet1_0_gradcam.png", "cat_squeezenet1_0_layercam.png"}


def test_a_foreign_summary_is_not_overwritten(tmp_path, no_model):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text("my notes")
    msg = clean_error(invoke("explain", photo(tmp_path / "p.png"), "--out", out))
    assert "not a camkit summary" in msg and (out / "summary.json").read_text() == "my notes"


# ------------------------------------------------------------------------------------------ 10: symlinks


def test_a_symlink_in_out_is_replaced_not_written_through(tmp_path):
    out, outside = tmp_path / "o", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("keep me")
    link = out / "cat_squeezenet1_0_gradcam.png"
    link.symlink_to(outside)
    other = tmp_path / "other.json"
    other.write_text("[]")
    (out / "summary.json").symlink_to(other)
    res = invoke("explain", photo(tmp_path / "cat.png"), *FAST, "--out", out)
    assert res.exit_code == 0, res.output
    assert outside.read_text() == "keep me" and other.read_text() == "[]"
    assert not link.is_symlink() and Image.open(link).format == "PNG"
    assert not (out / "summary.json").is_symlink() and json.loads((out / "summary.json").read_text())


# ---------------------------------------------------------------------------------------- 11: summary


def test_summary_records_the_run(tmp_path):
    src, out = photo(tmp_path / "chat_été.png"), tmp_path / "o"
    res = invoke("explain", src, *FAST, "--seed", "7", "--methods", "gradcam,layercam", "--out", out)
    assert res.exit_code == 0, res.output
    text = (out / "summary.json").read_text(encoding="utf-8")
    assert "chat_été" in text  # ensure_ascii=False
    summary = json.loads(text)
    grid = [e for e in summary if e["method"] == "grid"]
    assert len(grid) == 1 and (out / Path(grid[0]["file"]).name).is_file()
    for entry in summary:
        assert (
            list(entry)[:7] == ["image", "class", "label", "prob", "method", "layers", "file"]
            or entry is grid[0]
        )
        assert entry["model"] == "squeezenet1_0" and entry["pretrained"] is False and entry["weights"] is None
        assert entry["seed"] == 7 and entry["source"] == str(src)
        assert entry["camkit"] and entry["torch"]
        assert entry["options"]["methods"] == ["gradcam", "layercam"] and entry["options"]["layers"] == "auto"


def test_boxes_json_records_the_run(tmp_path):
    src, out = photo(tmp_path / "cat.png"), tmp_path / "o"
    res = invoke("localize", src, *FAST, "--out", out)
    assert res.exit_code == 0, res.output
    (entry,) = json.loads((out / "boxes.json").read_text())
    assert entry["model"] == "squeezenet1_0" and entry["source"] == str(src) and "boxes" in entry
    assert (out / Path(entry["file"]).name).is_file()


# ------------------------------------------------------------------------------------------- 12: flags


@pytest.mark.parametrize("command", ["explain", "localize", "layers"])
def test_every_model_command_takes_the_model_options(command):
    res = invoke(command, "--help")
    for flag in ("--model", "--weights", "--no-pretrained", "--seed", "--threads", "--device"):
        assert flag in res.output, (command, flag)


def test_seed_makes_random_weights_reproducible(tmp_path):
    src = photo(tmp_path / "cat.png")

    def prob(seed: str, out: str) -> float:
        res = invoke("explain", src, *FAST, "--seed", seed, "--out", tmp_path / out)
        assert res.exit_code == 0, res.output
        return json.loads((tmp_path / out / "summary.json").read_text())[0]["prob"]

    assert prob("3", "a") == prob("3", "b") != prob("4", "c")


def test_threads_sets_torchs_threads(tmp_path, monkeypatch):
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    res = invoke("layers", "squeezenet1_0", "--threads", "1")
    assert res.exit_code == 0 and calls == [1] and "auto:" in res.output
    assert clean_error(invoke("layers", "squeezenet1_0", "--threads", "0"))


def test_localize_and_layers_work_offline_with_no_pretrained(tmp_path):
    res = invoke("localize", photo(tmp_path / "p.png"), *FAST, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    res = invoke("layers", "--model", "squeezenet1_0", "--no-pretrained")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------ 13: folders


def test_folders_recursive_sorted_hidden_skipped_bad_reported(tmp_path):
    root = tmp_path / "photos"
    photo(root / "b.png")
    photo(root / "a.jpg")
    photo(root / "sub" / "c.png")
    photo(root / ".hidden" / "d.png")
    photo(root / ".e.png")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "o"
    res = invoke("explain", root, *FAST, "--out", out)
    assert res.exit_code == 1, res.output  # some inputs failed
    assert "error:" in res.output and "broken.png" in res.output and "cannot read" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [e["image"] for e in summary] == ["a", "b", "c"]
    res = invoke("localize", root, *FAST, "--out", out)
    assert res.exit_code == 1 and "broken.png" in res.output
    assert [e["image"] for e in json.loads((out / "boxes.json").read_text())] == ["a", "b", "c"]


def test_a_folder_without_images_is_an_error(tmp_path, no_model):
    (tmp_path / "empty").mkdir()
    assert "no image file" in clean_error(invoke("explain", tmp_path / "empty", "--out", tmp_path / "o"))


def test_one_bad_file_alone_still_exits_2(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    assert "cannot read" in clean_error(invoke("localize", bad, *FAST, "--out", tmp_path / "o"))


# ----------------------------------------------------------------------------------------- 14: progress


class FakeBar:
    """Records what a rich Progress would show."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, str]] = []
        self.total = 0.0
        self.completed = 0.0
        self.forwards = ""

    def add_task(self, description: str, total: float, **fields: str) -> int:
        self.total = total
        return 0

    def update(self, task: int, completed=None, total=None, description=None, forwards=None) -> None:
        assert total is None  # the total is set once
        self.completed = completed if completed is not None else self.completed
        self.forwards = forwards if forwards is not None else self.forwards
        self.history.append((self.completed, self.total, self.forwards))


def test_progress_has_one_total_that_never_restarts():
    bar = FakeBar()
    progress = common.RunProgress(bar, n_images=2, steps=2)
    for _ in range(2):  # two images, each with Score-CAM then Ablation-CAM, counted by the engine as it goes
        report = progress.forwards()
        assert report is not None
        for done, total in [
            (10, 469),
            (469, 469),
            (500, 988),
            (988, 988),
        ]:  # the total grows at the 2nd method
            report(done, total)
        progress.image_done("x")
    completed = [c for c, _, _ in bar.history]
    assert all(t == 2 for _, t, _ in bar.history)
    assert completed == sorted(completed) and completed[-1] == 2  # never back, never restarted
    assert 0.45 < completed[1] < 0.55  # the first method done: half of the first image
    assert bar.history[-2][2] == "1976 forwards"  # forward passes of the whole command


def test_progress_is_off_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    made: list[bool] = []
    monkeypatch.setattr(
        common.RunProgress, "__init__", lambda self, bar, n, steps: made.append(bar is not None)
    )
    with common.run_progress(3, steps=0, enabled=None):
        pass
    with common.run_progress(3, steps=0, enabled=True):
        pass
    assert made == [False, True]


def test_progress_reaches_stderr_when_forced(tmp_path):
    src = photo(tmp_path / "p.png")
    res = invoke(
        "explain",
        src,
        src,
        *FAST,
        "--methods",
        "scorecam",
        "--top-channels",
        "4",
        "--progress",
        "--out",
        tmp_path / "o",
    )
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------- 16: samples


def test_sample_help_lists_every_sample():
    from camkit.io import SAMPLES

    assert tuple(common.SAMPLE_NAMES) == tuple(SAMPLES)
    for command in ("explain", "localize"):
        res = invoke(command, "--help")
        for name in SAMPLES:
            assert name in res.output, (command, name)


def test_compile_reaches_the_perturbation_options(tmp_path, monkeypatch):
    seen: list[bool] = []

    def fake_compare(*args, perturbation, **kwargs):
        seen.append(perturbation.compile)
        raise CamkitError("stop here")  # a refusal by camkit's own checks: one error line

    monkeypatch.setattr("camkit.core.pipeline.compare", fake_compare)
    src = photo(tmp_path / "p.png")
    for flags in ([], ["--compile"]):
        res = invoke("explain", src, *FAST, "--methods", "scorecam", *flags, "--out", tmp_path / "o")
        assert res.exit_code == 2 and "stop here" in res.output
    assert seen == [False, True]


def test_max_side_and_caption(tmp_path):
    src = photo(tmp_path / "in" / "p.png", size=(200, 100))
    res = invoke("explain", src, *FAST, "--max-side", "80", "--out", tmp_path / "plain")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "plain" / "p_squeezenet1_0_gradcam.png") as im:
        assert im.size == (80, 40)  # the longer side is 80, the aspect ratio kept
    res = invoke("explain", src, *FAST, "--max-side", "80", "--caption", "--out", tmp_path / "cap")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "cap" / "p_squeezenet1_0_gradcam.png") as im:
        plain = Image.open(tmp_path / "plain" / "p_squeezenet1_0_gradcam.png").convert("RGB")
        assert im.size[0] > 80 and im.size[1] > 40  # a colour bar to the right, a caption below
        assert np.array_equal(np.asarray(im.convert("RGB"))[:40, :80], np.asarray(plain))
    entry = json.loads((tmp_path / "cap" / "summary.json").read_text())[0]
    assert entry["options"]["caption"] is True and entry["options"]["max_side"] == 80
    assert clean_error(invoke("explain", src, *FAST, "--max-side", "3", "--out", tmp_path / "bad"))
