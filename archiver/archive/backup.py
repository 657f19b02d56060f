"""``desto-archiver backup DEST``: a consistent copy of the live file while the daemon writes.

SQLite's online backup API copies the file in one read transaction: in WAL mode that is a
snapshot that never blocks the writer. The copy is verified with ``PRAGMA integrity_check``,
made a single self-contained file (rollback journal mode), and only then moved into place. It is
never easier to read than the archive (archiver/archive/copies.py): its owner's alone while it is written.
It holds nothing of a record erased before it was taken, even one whose erasure the live file has
not finished (erase.clean_copy).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from archiver.archive.copies import file_mode, folder_mode, make_folders
from archiver.archive.erase import clean_copy
from archiver.archive.sql import read_only
from archiver.archive.store import StoreError


class BackupError(StoreError):
    pass


@dataclass(frozen=True)
class BackupReport:
    source: str
    destination: str
    bytes: int
    pages: int
    integrity: str
    elapsed_s: float
    # erasures the live file had not finished were finished in the copy, which was rebuilt
    erasures_finished: bool = False


def backup(source: Path, destination: Path, force: bool = False) -> BackupReport:
    if not source.exists():
        raise BackupError(f"no archive at {source}: check SQLITE_DB_PATH (--db)")
    if destination.exists() and destination.is_dir():
        destination = destination / source.name
    if destination.resolve() == source.resolve():
        raise BackupError("the backup cannot overwrite the archive itself: choose another destination")
    if destination.exists() and not force:
        raise BackupError(f"{destination} already exists: choose another name, or add --force to replace it")
    mode = file_mode(source)
    try:
        make_folders(destination.parent, folder_mode(mode))
    except OSError as exc:
        raise BackupError(f"cannot create {destination.parent}: {exc.strerror}") from None
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    try:
        # created here, so a folder that may not be written names the destination, not SQLite's
        # "unable to open database file" taken for the source's
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise BackupError(f"cannot write {destination}: {exc.strerror} (in {destination.parent.absolute()})") from None
    started = time.monotonic()
    try:
        src = read_only(source, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one consistent snapshot
                rebuilt = clean_copy(dst)
                integrity = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if integrity != "ok":
                    raise BackupError(f"the copy failed its integrity check: {integrity}")
                dst.execute("PRAGMA journal_mode=DELETE")
                pages = dst.execute("PRAGMA page_count").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
        with open(partial, "rb+") as handle:
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(partial, destination)
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {source} failed: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot write {destination}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    return BackupReport(
        source=str(source),
        destination=str(destination),
        bytes=destination.stat().st_size,
        pages=pages,
        integrity=integrity,
        elapsed_s=round(time.monotonic() - started, 3),
        erasures_finished=rebuilt,
    )
