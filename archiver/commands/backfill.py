"""``desto-archiver backfill``: one full pass over Redis into the file, then exit.

It is a reconcile run to completion on the daemon's own path (SCAN pages, atomic pipelined
reads, one transaction per page), so it is safe beside a running daemon: both write through
the same version guard. It needs no keyspace notifications, and its memory does not grow with
the keyspace: one page of keys at a time.

``dry_run`` applies every page in a transaction that is rolled back, so the counts are exactly
what a real run would do. A file that does not exist yet (or needs migrating) is not touched:
the dry run works on a copy in memory.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.archive.quarantine import Limits
from archiver.archive.schema import SCHEMA_VERSION
from archiver.archive.sql import read_only
from archiver.archive.store import Store
from archiver.config import Settings
from archiver.daemon.reconcile import Reconcile, archive, read_batch, records_of, write_batch
from archiver.models import Outcome
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.source import Source


@dataclass
class Progress:
    phase: str  # "scan": reading every desto key; "sweep": archived rows whose keys are gone;
    # "index": building the indexes a first backfill left for the end
    keys_scanned: int
    keys_read: int
    written: int
    quarantined: int
    elapsed_s: float

    @property
    def keys_per_s(self) -> float:
        return self.keys_read / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class BackfillReport:
    keys_scanned: int
    keys_read: int
    records: dict[str, int]
    written: dict[str, int]
    unchanged: int
    tombstoned: int
    quarantined: int
    still_quarantined: int
    elapsed_s: float
    erased: int = 0  # records in Redis that were erased on purpose: not written
    not_kept: int = 0  # rejected records not kept: the quarantine had reached its total cap
    dry_run: bool = False

    @property
    def keys_per_s(self) -> float:
        return self.keys_read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "keys_scanned": self.keys_scanned,
            "keys_read": self.keys_read,
            "records": self.records,
            "written": self.written,
            "unchanged": self.unchanged,
            "tombstoned": self.tombstoned,
            "quarantined": self.quarantined,
            "still_quarantined": self.still_quarantined,
            "not_kept": self.not_kept,
            "erased": self.erased,
            "elapsed_s": round(self.elapsed_s, 3),
            "keys_per_s": round(self.keys_per_s, 1),
        }


# A first backfill builds its indexes at the end, so a small page cache costs it little, and
# keeps its memory low at any keyspace size.
BACKFILL_CACHE_MB = 8


def _open(settings: Settings, dry_run: bool) -> Store:
    path = settings.db_path
    cache_mb = settings.sqlite_cache_mb or BACKFILL_CACHE_MB
    limits = Limits.of(settings)
    if not dry_run:
        return Store.open(path, settings.sqlite_busy_timeout, cache_mb=cache_mb, quarantine=limits)
    if path.exists():
        probe = read_only(path)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version == SCHEMA_VERSION:
            # every batch rolls back
            return Store.open(
                path, settings.sqlite_busy_timeout, cache_mb=cache_mb, build_deferred=False, quarantine=limits
            )
    # Nothing may be written: work on a copy in memory (migrated there, if it needs to be).
    memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    if path.exists():
        source = read_only(path)
        source.backup(memory)
        source.close()
    from archiver.archive.schema import migrate

    found, _ = migrate(memory)
    return Store(memory, Path(":memory:"), found, quarantine=limits)


def backfill(
    settings: Settings, progress: Callable[[Progress], None] | None = None, dry_run: bool = False
) -> BackfillReport:
    """Run one full pass; ``progress`` is called after each page.

    The scan is read in a thread of its own (SCAN, the atomic reads, normalizing) while this
    one writes: the socket and SQLite both release the GIL, so reading the next page overlaps
    writing this one. A few pages at most wait between them, so memory stays flat.
    """
    store = _open(settings, dry_run)
    source = Source(settings)
    deferred = False
    try:
        source.clock.note_file(store.newest_version())
        started = time.monotonic()
        # Into an empty archive, the secondary indexes are built once at the end (a sort each)
        # rather than row by row; a run killed half-way leaves them to the next Store.open.
        deferred = not dry_run and store.is_empty() and store.defer_indexes() > 0
        rec = Reconcile(source, settings.batch_size, "backfill")
        keys_read = 0

        def report_progress(phase: str) -> None:
            if progress is not None:
                r = rec.result
                elapsed = time.monotonic() - started
                written = sum(r.written.values())
                progress(Progress(phase, rec.keys_scanned, keys_read, written, r.new_quarantined, elapsed))

        for outcomes in _read_scan(rec, source):
            rec.result.merge(write_batch(store, outcomes, dry_run=dry_run))
            keys_read += len(outcomes)
            report_progress("scan")
        # The sweep: archived rows the scan did not meet. In a dry run nothing recorded what the
        # scan read, so the sweep meets every row again: only its missing keys are news.
        while keys := rec.next_keys(store):
            wanted = records_of(keys)
            rec.result.merge(archive(source, store, wanted, dry_run=dry_run, gone_only=dry_run))
            keys_read += 0 if dry_run else len(wanted)
            report_progress("sweep")
        if deferred:
            report_progress("index")
            store.restore_indexes()
            deferred = False
        result = rec.result
        report = BackfillReport(
            keys_scanned=rec.keys_scanned,
            keys_read=keys_read,
            records=dict(result.records),
            written=dict(result.written),
            unchanged=result.unchanged,
            tombstoned=result.tombstoned,
            quarantined=result.new_quarantined,
            still_quarantined=result.quarantine_repeats,
            erased=result.erased,
            not_kept=result.quarantine_not_kept,
            elapsed_s=time.monotonic() - started,
            dry_run=dry_run,
        )
        if not dry_run:
            store.set_state({"last_backfill": json.dumps(report.as_dict())}, now_us())
        return report
    finally:
        if deferred:  # failed or interrupted: the indexes must not stay missing
            with contextlib.suppress(sqlite3.Error):
                store.restore_indexes()
        source.close()
        store.close()


_DONE = object()
_JOIN = 10  # pages per transaction at most


def _read_scan(rec: Reconcile, source: Source) -> Iterator[list[Outcome]]:
    """The scan's pages, read and normalized in a thread, handed over through a short queue."""
    pages: queue.Queue[Any] = queue.Queue(maxsize=_JOIN)
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set() and (keys := rec.next_scan_keys()):
                wanted = records_of(keys)
                if wanted:
                    pages.put(read_batch(source, wanted))
        except BaseException as exc:  # handed to the writing thread, which raises it
            pages.put(exc)
        finally:
            pages.put(_DONE)

    thread = threading.Thread(target=reader, name="backfill-reader", daemon=True)
    thread.start()
    try:
        item = pages.get()
        while item is not _DONE:
            batch: list[Outcome] = []
            # pages already waiting join this one in a single transaction (up to _JOIN of them)
            while item is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                batch.extend(item)
                if len(batch) >= _JOIN * rec.page or pages.empty():
                    item = None
                    break
                item = pages.get_nowait()  # this thread alone takes: what is there stays there
            yield batch
            if item is None:
                item = pages.get()
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                pages.get(timeout=0.05)
        thread.join()
