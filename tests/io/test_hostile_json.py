"""JSON nested deeper than Python's parser recurses (an annotation file, the app's boxes field, a run's manifest
line or a tar shard's label): one CamkitError naming the file, never a RecursionError."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camkit.errors import CamkitError
from camkit.io.annotations import read_annotations, read_boxes
from camkit.run.sources import collect_items

DEEP = "[" * 5000


def test_a_deep_annotation_file_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text('{"x.png": {"boxes": ' + DEEP + "}}", encoding="utf-8")
    with pytest.raises(CamkitError, match="not valid JSON"):
        read_annotations(path)


def test_deep_boxes_are_one_error() -> None:
    with pytest.raises(CamkitError, match="the boxes field: boxes must be a JSON list"):
        read_boxes(DEEP, "the boxes field")


def test_a_deep_manifest_line_is_one_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "x.png", "boxes": ' + DEEP + "}\n", encoding="utf-8")
    with pytest.raises(CamkitError, match="line 1 is not JSON"):
        collect_items([manifest])


def test_a_deep_tar_label_is_one_error(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    with tarfile.open(shard, "w") as tf:
        for name, data in (("a.png", png.getvalue()), ("a.json", DEEP.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(CamkitError, match="not valid JSON"):
        collect_items([shard])
