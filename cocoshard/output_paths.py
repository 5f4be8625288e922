"""Where a command may write, checked before it reads, creates or removes anything.

    check_output_folder(cfg.out, "--out")                    # a folder, or a path that can become one
    check_output_file(cfg.out, "--out")                      # a file, not a folder, not a link
    check_apart([("--out", cfg.out)], [("--predictions", cfg.predictions), ("--scores", cfg.scores)])

An output path that is a file where a folder is wanted (`pack --out FILE`, `FILE/sub`), a folder
where a file is wanted, or a symbolic link, is refused with one line naming the flag: cocoshard
never writes through a link (the file it points to would change behind the user's back) nor over
one (the link would silently become a file). An output that is one of the same command's inputs,
by name, through a link or as a hard link, is refused: writing it would destroy the input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cocoshard.errors import UserError


class BadOutput(UserError):
    """An output path a command must not write."""


def _file_on_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (FILE in FILE/sub), else None."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def check_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """BadOutput unless `folder` is a folder or can be created as one."""
    path = Path(folder)
    if path.is_symlink() and not path.exists():
        raise BadOutput(f"{flag} {path} is a symbolic link to nothing ({os.readlink(path)}): give a folder")
    if path.exists() and not path.is_dir():
        raise BadOutput(f"{flag} {path} is a file, not a folder: give a folder (it is made when missing)")
    blocking = _file_on_the_way(path)
    if blocking is not None:
        raise BadOutput(f"{flag} {path} cannot be made: {blocking} is a file, not a folder")


def check_output_file(file: str | os.PathLike, flag: str) -> None:
    """BadOutput unless `file` can be written as a regular file: not a folder, not a link, no file
    among the folders above it."""
    path = Path(file)
    if path.is_symlink():
        raise BadOutput(
            f"{flag} {path} is a symbolic link (to {os.readlink(path)}): cocoshard never writes "
            f"through or over a link; give the file's real path or remove the link"
        )
    if path.is_dir():
        raise BadOutput(f"{flag} {path} is a folder: give the path of a file to write")
    if path.exists() and not path.is_file():
        raise BadOutput(f"{flag} {path} is not a regular file (a pipe, device or socket)")
    blocking = _file_on_the_way(path)
    if blocking is not None:
        raise BadOutput(f"{flag} {path} cannot be written: {blocking} is a file, not a folder")


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """True when two paths name one file: the same path once links are resolved, or a hard link."""
    a, b = Path(first), Path(second)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


Named = Sequence[tuple[str, str | os.PathLike | None]]  # (flag, path or None when not given)


def check_apart(outputs: Named, inputs: Named) -> None:
    """BadOutput when an output is an input of the same command, or two outputs are one file
    (paths given as None are left out)."""
    given = [(flag, path) for flag, path in outputs if path is not None]
    for index, (flag, path) in enumerate(given):
        for other_flag, other in given[index + 1 :]:
            if same_file(path, other):
                raise BadOutput(f"{flag} and {other_flag} are the same file {path}: give each its own")
        for input_flag, source in inputs:
            if source is not None and same_file(path, source):
                raise BadOutput(
                    f"{flag} {path} is {input_flag} {source}, an input of this command: writing there "
                    f"would replace it; choose another file"
                )
