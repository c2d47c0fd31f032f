"""Safe writes: atomic renames, no writing through symlinks, strict JSON, distinct bounded output names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from camkit.io.files import (
    MAX_NAME_BYTES,
    atomic_write,
    output_stems,
    prepare_out_dir,
    save_image,
    write_json,
)


def test_atomic_write_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(outside)
    save_image(Image.new("RGB", (4, 3), "red"), out / "x.png")
    assert outside.read_bytes() == b"precious"
    assert not (out / "x.png").is_symlink()
    with Image.open(out / "x.png") as im:
        assert im.size == (4, 3)


def test_json_is_strict_and_utf8(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_json(path, {"p": float("nan"), "q": [1.5, float("inf")], "label": "café"})
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text and "café" in text
    assert json.loads(text) == {"p": None, "q": [1.5, None], "label": "café"}


def test_out_dir_checks(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_out_dir(f)
    with pytest.raises(ValueError, match="has a file on its path"):
        prepare_out_dir(f / "sub")
    assert prepare_out_dir(tmp_path / "new" / "deeper").is_dir()


def test_output_stems_are_distinct_and_bounded() -> None:
    stems = output_stems(["d1/x.jpg", "d2/x.jpg", "y.png", "d1/y.jpg"])
    assert len(set(stems)) == 4
    assert stems[0] == "d1_x" and stems[1] == "d2_x"
    long = "n" * 250
    (s,) = output_stems([f"{long}.jpg"])
    assert len(s.encode()) + 40 <= MAX_NAME_BYTES
    same = output_stems(["a/x.jpg", "a/x.jpg"])
    assert len(set(same)) == 2
    assert all(os.sep not in s for s in stems)
