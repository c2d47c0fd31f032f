"""Process settings that make CPU inference faster: :func:`tune_allocator`."""

from __future__ import annotations

import ctypes
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(keep_bytes: int = 1 << 30) -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse instead of giving it back to the OS after each tensor.

    By default glibc serves every large block (a batch of feature maps: tens of MB) with a fresh ``mmap`` and
    unmaps it when the tensor is freed, so the next forward pass page-faults its way through new, zeroed memory
    again; on a small CPU that can cost as much as the convolutions themselves. Raising the mmap and trim
    thresholds to ``keep_bytes`` keeps the blocks in the process.

    The price: memory freed by this process stays mapped to it (its resident size stays near its peak) until it
    exits. It changes the whole process, so camkit never calls it behind a library user's back; the ``camkit``
    command does, at start. Calling it again is harmless.

    Returns:
        True when the setting took effect (Linux with glibc), else False (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    keep = int(min(max(keep_bytes, 0), 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, keep)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
