"""Input discovery: the image files named by paths and found in folders, in one order for every command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from camkit.errors import CamkitError

__all__ = ["IMAGE_SUFFIXES", "discover_images"]

#: File name suffixes read as images when a folder is given (case-insensitive).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def discover_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named or found in folders, in the order the paths are given.

    A folder contributes the image files (by suffix, :data:`IMAGE_SUFFIXES`) of its whole tree, sorted by path
    (``a/x.png`` before ``b.png``); hidden files and folders (``.name``) are skipped and symbolic links to folders
    are not followed. A named file is taken as it is.

    Raises:
        FileNotFoundError: a path does not exist.
        CamkitError: a folder holds no image file.
    """
    found: list[Path] = []
    for item in paths:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"image file not found: {str(p)!r}")
        if not p.is_dir():
            found.append(p)
            continue
        files = sorted(
            f
            for f in p.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f, p) and f.is_file()
        )
        if not files:
            raise CamkitError(
                f"the folder {str(p)!r} holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        found += files
    return found
