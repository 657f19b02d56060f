"""The archive's file as the daemon holds it: the lock that keeps a second daemon out, the
store open on it, and the watch on its path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from archiver.archive import changelog
from archiver.archive.quarantine import Limits
from archiver.archive.store import DaemonLock, Store, StoreError
from archiver.config import Settings
from archiver.log import get_logger

log = get_logger("archiver.daemon.archive_file")

# The archive only grows, and desto's random ids spread every insert over its indexes: once those
# outgrow SQLite's page cache, each insert reads pages back from the OS. A cache that holds the
# indexes of a few hundred thousand records keeps the writer well ahead of desto.
DAEMON_CACHE_MB = 64


def log_created(path: Path) -> None:
    """A new archive is never made silently: a mistyped path shows in the log at once."""
    log.info(
        "archive.created",
        db=str(path.absolute()),
        detail="there was no archive at this path: a new, empty one was created",
    )


class ArchiveFile:
    """The file, open, locked and watched. ``store`` is None before :meth:`open`, after
    :meth:`close`, and when a file put at the path was refused."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self._lock: DaemonLock | None = None

    def open(self) -> Store:
        """Take the daemon's lock and open the store; raises StoreError when the file cannot be used
        (and then holds nothing)."""
        settings = self.settings
        lock = DaemonLock(settings.db_path)
        lock.acquire()
        existed = settings.db_path.exists()
        try:
            store = Store.open(
                settings.db_path,
                settings.sqlite_busy_timeout,
                cache_mb=settings.sqlite_cache_mb or DAEMON_CACHE_MB,
                quarantine=Limits.of(settings),
            )
        except BaseException:
            lock.release(failed_start=True)
            raise
        try:
            # the change log's triggers exist while shipping is configured, and only then
            changelog.set_enabled(store.conn, settings.postgres_url is not None, settings.sqlite_busy_timeout)
        except sqlite3.Error as exc:
            store.close()
            lock.release(failed_start=True)
            raise StoreError(f"cannot set up the change log in {settings.db_path}: {exc}") from None
        if not existed:
            log_created(settings.db_path)
        self.store, self._lock = store, lock
        return store

    def lost(self) -> bool:
        """Whether the path no longer names the file held open (see :meth:`reopened`)."""
        return self.store is not None and self.store.file_lost() is not None

    def reopened(self) -> bool:
        """The archive's file removed or replaced under the daemon (rm, mv, a restore moved into
        place) would go on taking every write, unseen by desto and by every other reader of the
        path. Open the path again instead: True when it did (what was written since the lost file
        was opened stays in it; the caller reconciles, Redis still holds the last 7 days).
        Raises StoreError when the file now at the path cannot be used."""
        store = self.store
        assert store is not None
        reason = store.file_lost()
        if reason is None:
            return False
        removed = store.release_lost_file()
        self.store = None
        self._release_lock()
        log.error(
            "archive.file_lost",
            db=str(self.settings.db_path),
            reason=reason,
            removed=removed,
            detail="what the daemon wrote since the file was opened stays in that file, wherever it went; "
            "opening the path again and reconciling from Redis",
        )
        store = self.open()
        log.info("archive.reopened", db=str(self.settings.db_path), schema_found=store.schema_found)
        return True

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
