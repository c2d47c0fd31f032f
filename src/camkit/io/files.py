"""Writing results safely: every file is written to a temporary file beside it and renamed into place.

* :func:`atomic_write` / :func:`save_image` / :func:`write_json`: a reader (or a run killed mid-way) never sees a
  half-written file under its final name. ``os.replace`` swaps the directory entry, so a symbolic link already
  at the destination is replaced by the new file, never written through.
* :func:`write_json` writes strict JSON (RFC 8259): NaN and infinities become ``null``, text stays UTF-8
  (``ensure_ascii=False``).
* Files get the mode a plain ``open()`` would give them under the process's umask (``0o666 & ~umask``), not
  the ``0o600`` of the temporary file they were written to, so a colleague (or another user of a shared file
  system) can read them as they could any file the user writes.
* :func:`file_lock` takes an OS lock on a lock file, for read-merge-write updates and store creation that two
  processes may do at once.
* :func:`prepare_out_dir` checks an output folder before any model work; :func:`output_stems` gives inputs that
  share a file name distinct, bounded output names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout
from PIL import Image

from camkit.errors import CamkitError

__all__ = [
    "atomic_write",
    "file_lock",
    "output_stems",
    "prepare_out_dir",
    "save_image",
    "strict_json",
    "write_json",
]

MAX_NAME_BYTES = 200
"""Longest output file name camkit makes (most file systems allow 255 bytes)."""


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, synced and renamed to ``path``.

    On an exception (or an interrupt) the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:40]}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        stream = os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")
        with stream as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (read by setting it and setting it back, under a lock so threads see one value)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def file_lock(path: str | Path, timeout: float = -1, what: str = "") -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``, through the ``filelock`` package) on the file ``path``.

    Another process (or thread) asking for the same lock waits; with ``timeout >= 0`` it gives up after that
    many seconds with a :class:`ValueError` naming ``what`` (or the lock file). The lock file itself is left in
    place: removing it while another process waits on it would let two holders in.
    """
    lock = FileLock(str(path), timeout=timeout, mode=0o666 & ~_umask())
    try:
        lock.acquire()
    except Timeout as err:
        raise CamkitError(
            f"{what or str(path)!r} is in use by another camkit process (lock {str(path)!r}); "
            "wait for it to finish and try again"
        ) from err
    try:
        yield
    finally:
        lock.release()


def save_image(image: Image.Image, path: str | Path, format: str | None = None, **options: Any) -> None:
    """``image.save(path)``, atomically; the format comes from the suffix unless given."""
    target = Path(path)
    fmt = format or Image.registered_extensions().get(target.suffix.lower())
    if fmt is None:
        raise CamkitError(f"cannot tell the image format of {str(target)!r}; use a .png, .jpg or .webp name")
    with atomic_write(target) as f:
        image.save(f, format=fmt, **options)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON ``null``), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as strict, indented UTF-8 JSON, atomically."""
    text = json.dumps(strict_json(value), indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


def prepare_out_dir(out: str | Path) -> Path:
    """Create the output folder (and its parents) or explain why it cannot be used; call before model work."""
    p = Path(out)
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == p else f"has a file on its path ({str(parent)!r})"
            raise CamkitError(f"--out {str(p)!r} {what}, not a folder; choose a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CamkitError(f"cannot create the output folder {str(p)!r}: {err.strerror or err}") from err
    if not os.access(p, os.W_OK | os.X_OK):
        raise CamkitError(f"the output folder {str(p)!r} is not writable")
    return p


def _bounded(stem: str, room: int) -> str:
    raw = stem.encode("utf-8")
    if len(raw) <= room:
        return stem
    digest = hashlib.sha1(raw).hexdigest()[:8]
    cut = raw[: max(1, room - 9)].decode("utf-8", errors="ignore")
    return f"{cut}-{digest}"


def output_stems(paths: Sequence[str | Path], suffix_room: int = 40) -> list[str]:
    """A distinct output name stem per input: its file stem, with its parent folders prepended (``d1_x``,
    ``d2_x``) where two inputs share a stem, and a number as the last resort; each stem leaves ``suffix_room``
    bytes for ``_<method>.png`` within :data:`MAX_NAME_BYTES`."""
    room = MAX_NAME_BYTES - suffix_room
    items = [Path(p) for p in paths]
    stems = [p.stem for p in items]
    depth = 0
    while len(set(stems)) < len(stems) and depth < 8:
        depth += 1
        counts: dict[str, int] = {}
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
        stems = [
            "_".join([*p.parent.parts[-depth:], p.stem]).replace(os.sep, "_").lstrip("_")
            if counts[s] > 1
            else s
            for p, s in zip(items, stems, strict=True)
        ]
    seen: dict[str, int] = {}
    result = []
    for s in stems:
        s = _bounded(s, room)
        n = seen.get(s, 0)
        seen[s] = n + 1
        result.append(s if n == 0 else f"{s}_{n + 1}")
    return result
