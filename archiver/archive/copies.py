"""The files the commands write from the archive (backups, exports) and the folders made for them:
never easier to read than the archive itself, whatever the umask of the shell they run from.

A copy gets the archive's read and write bits, less the process' umask (``ARCHIVER_UMASK``);
0600 where there is no archive to go by (an export of the central database). A folder made for a
copy may be searched by whoever may read the copy.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TextIO

UNSURE = 0o600  # a copy's mode with no archive to go by: its owner's alone


def _umask() -> int:
    current = os.umask(0o077)
    os.umask(current)
    return current


def file_mode(archive: Path | None) -> int:
    """The mode of a copy of ``archive`` (its owner may always read and write it)."""
    try:
        bits = stat.S_IMODE(archive.stat().st_mode) & 0o666 if archive is not None else UNSURE
    except OSError:
        bits = UNSURE
    return (bits & ~_umask()) | 0o600


def folder_mode(mode: int) -> int:
    """A folder made for a copy of ``mode``: searchable by whoever may read the copy."""
    return mode | ((mode & 0o444) >> 2) | 0o700


def make_folders(folder: Path, mode: int) -> None:
    """``folder`` and the folders above it that do not exist yet, each made with ``mode``."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:  # made meanwhile, by another process
            continue
        os.chmod(path, mode)  # exactly: its owner keeps the access it needs to write the copy there


def open_copy(path: Path, mode: int) -> TextIO:
    """``path`` opened to be written (created, or emptied), with ``mode`` at most: a file that was
    there and others could read is narrowed before anything is written into it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode) and stat.S_IMODE(found.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(found.st_mode) & mode)
        return os.fdopen(fd, "w", newline="", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
