"""Reading a file a user names: only a regular file, and never more than a size bound.

    data = read_input(path, limit=64 * 2**20)      # bytes, or InputError saying why not

Every file cocoshard reads on a user's word goes through `read_input`: images and `.cls` files
(pack, predict, evaluate), a submission, a thresholds file, a `--config` file. A symlink to a
regular file is fine. The file is opened without blocking, so that a named pipe cannot stall the
run, and checked with `fstat` before a byte is read, so that a link to /dev/zero or a huge file
cannot fill the memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class InputError(ValueError):
    """An input file that cannot be read; the message is the reason recorded for it."""


def shown_path(path: str | os.PathLike) -> str:
    """A path as text that survives printing and JSON: bytes that are not UTF-8 appear as \\xNN."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_input(path: Path, limit: int) -> bytes:
    """The bytes of a regular input file of at most `limit` bytes; InputError says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("not a regular file (a pipe, device, socket or folder is never an input)")
        if info.st_size > limit:
            raise InputError(f"{info.st_size:,} bytes, more than the {limit:,} an input may have")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise InputError(f"more than the {limit:,} bytes an input may have")
    return data
