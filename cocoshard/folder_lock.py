"""One writer per folder: an OS file lock that every command writing a folder takes first.

    with folder_lock(out, "cocoshard pack"):
        ...   # a second pack (or train, synth, demo) into `out` is refused at once

The lock is `flock` on `FOLDER/.cocoshard.lock`, held for as long as the command runs; the
kernel drops it when the process ends however it ends, kill -9 included, so a lock is never left
behind. The lock file is opened without following a link and only as a regular file, and a folder
path that is a file is refused with one line (`cocoshard.output_paths`). The file also says who
holds it (pid, command, since when), so that the second writer's message can name the holder.
Readers (train reading shards, predict reading a checkpoint) take no lock: every file they read
was written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from cocoshard.errors import UserError
from cocoshard.output_paths import check_output_folder

LOCK_FILE = ".cocoshard.lock"


class FolderBusy(UserError):
    """Another process is writing the folder."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return (
            os.read(fd, 512).decode("utf-8", "replace").strip() or "a process that has not said who it is yet"
        )
    except OSError:
        return "another process"


def _open_lock_file(lock: Path) -> int:
    """The lock file, opened (made when missing) without following a link and only if it is a
    regular file: a link planted as FOLDER/.cocoshard.lock would make the writer truncate the file
    it points to, or create one outside the folder."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(
                f"{lock} is a symbolic link: cocoshard never writes through a link; remove it "
                f"(it is only a lock file)"
            ) from None
        raise UserError(f"cannot open the lock file {lock}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{lock} is not a regular file: remove it (it is only a lock file)")
    return fd


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the folder's write lock (creating the folder); FolderBusy names the holder if another has it."""
    path = Path(folder)
    check_output_folder(path, "the output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {path}: {exc.strerror or exc}") from None
    fd = _open_lock_file(path / LOCK_FILE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"{path} is being written by another cocoshard command ({_holder(fd)}): "
                f"wait for it to end, or choose another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()}, {command}, since {since}\n".encode())
        yield path
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
