"""One writer per folder: an OS file lock that every command writing a folder takes first.

    with folder_lock(out, "cocoshard pack"):
        ...   # a second pack (or train, synth, demo) into `out` is refused at once

The lock is `flock` on `FOLDER/.cocoshard.lock`, held for as long as the command runs; the
kernel drops it when the process ends however it ends, kill -9 included, so a lock is never left
behind. The file also says who holds it (pid, command, since when), so that the second writer's
message can name the holder. Readers (train reading shards, predict reading a checkpoint) take no
lock: every file they read was written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from cocoshard.errors import UserError

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


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the folder's write lock (creating the folder); FolderBusy names the holder if another has it."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
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
