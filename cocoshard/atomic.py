"""Atomic file writes: a reader (or a crash) sees the old file or the whole new one, never half.

Data goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed over the
final name with `os.replace` (atomic on POSIX); the folder is fsync'ed so the rename survives a
power cut. A temporary left by a killed process starts with `.tmp-` and is never a final name.
The temporary is created exclusively (never through a link someone planted); a final name that is
a symbolic link is refused rather than written through or replaced.

A write that fails (the disk is full, a quota, an I/O error) removes its temporary, leaves the
file it was replacing as it was, and raises `WriteFailed` naming the file and the cause, which the
CLI prints as one line. Writers that go through another library (`torch.save`, `tarfile`) write
into the handle `atomic_open` gives, which records the operating system's error, so the cause is
named even when the library reports its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cocoshard.errors import UserError

TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteFailed(UserError):
    """A file could not be written (disk full, quota, I/O error); the file it would replace is intact."""


class _RecordingFile:
    """A file handle that remembers the first OSError its writes raised (other libraries may
    replace it with an error of their own, `torch.save` does)."""

    def __init__(self, handle: IO) -> None:
        self._handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _cause(exc: BaseException, recorded: OSError | None) -> str:
    error = recorded or (exc if isinstance(exc, OSError) else None)
    if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (no space left on device)"
    if error is not None:
        return error.strerror or str(error)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    Raises WriteFailed (the temporary removed, `path` untouched) when the data cannot be written."""
    final = Path(path)
    if final.is_symlink():
        raise WriteFailed(
            f"cannot write {final}: it is a symbolic link (to {os.readlink(final)}); cocoshard never writes "
            f"through or over a link: remove it or write elsewhere"
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    except OSError as exc:
        raise WriteFailed(f"cannot write {final}: {_cause(exc, None)}") from exc
    handle = None
    try:
        with os.fdopen(fd, mode) as raw:
            handle = _RecordingFile(raw)
            yield handle  # type: ignore[misc]
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        recorded = handle.error if handle is not None else None
        if isinstance(exc, (OSError, RuntimeError)) or recorded is not None:
            raise WriteFailed(
                f"cannot write {final}: {_cause(exc, recorded)}; "
                f"{'the earlier file is left as it was' if final.exists() else 'nothing was written'}"
            ) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries a killed writer left in `folder`; returns how many."""
    count = 0
    for entry in Path(folder).glob(TMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            count += 1
    return count
