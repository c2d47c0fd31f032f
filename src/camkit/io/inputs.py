"""Input discovery: which files of the paths given are the images, in which order (every command).

``camkit explain``, ``localize``, ``report``, ``evaluate`` (:func:`discover_images`) and ``camkit run``'s ``folder``
and ``imagefolder`` layouts (:func:`folder_images`) find images the same way, so a run's store and an evaluation
of the same folder list the same images in the same order:

* a file given by name is taken as it is (whatever its suffix: it is read as an image later);
* a folder contributes the files of its whole tree whose suffix (case-insensitive) is one of
  :data:`IMAGE_SUFFIXES`; hidden files and folders (a name starting with ``.``) are skipped, symbolic links to
  folders are not followed (a symbolic link to a file counts as that file);
* the order is the order of the paths given; within a folder, the files sorted by their path relative to it,
  compared folder name by folder name (``a/b/x.png`` before ``a/c.png``: ``b`` sorts before ``c.png``), so
  the order depends neither on the file system nor on the machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from camkit.errors import CamkitError

__all__ = ["IMAGE_SUFFIXES", "discover_images", "folder_images"]

#: File name suffixes read as images when a folder is searched (compared in lower case).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def folder_images(root: str | Path) -> list[Path]:
    """The image files of the folder ``root``'s tree, in the order of the module's docstring.

    Raises:
        ValueError: the folder holds no image file (nor do its subfolders).
    """
    base = Path(root)
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(base).parts
        for name in names:
            path = Path(folder) / name
            if _is_image_name(name) and path.is_file():
                found.append(((*rel, name), path))
    if not found:
        raise CamkitError(
            f"the folder {str(base)!r} holds no image file, nor do its subfolders "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images"
        )
    return [path for _, path in sorted(found, key=lambda pair: pair[0])]


def discover_images(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named or found in ``paths`` (files and folders), in the order of the module's
    docstring.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder holds no image file.
    """
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files += folder_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"image file not found: {str(p)!r}")
    return files
