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

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from archiver.config import Settings
from archiver.reconcile import Reconcile, archive, now_us, records_of
from archiver.schema import SCHEMA_VERSION
from archiver.source import Source
from archiver.store import Store


@dataclass
class Progress:
    phase: str  # "scan": reading every desto key; "sweep": archived rows whose keys are gone
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
            "elapsed_s": round(self.elapsed_s, 3),
            "keys_per_s": round(self.keys_per_s, 1),
        }


def _open(settings: Settings, dry_run: bool) -> Store:
    path = settings.db_path
    if not dry_run:
        return Store.open(path, settings.sqlite_busy_timeout)
    if path.exists():
        probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
        if version == SCHEMA_VERSION:
            return Store.open(path, settings.sqlite_busy_timeout)  # every batch rolls back
    # Nothing may be written: work on a copy in memory (migrated there, if it needs to be).
    memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    if path.exists():
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        source.backup(memory)
        source.close()
    from archiver.schema import migrate

    found, _ = migrate(memory)
    return Store(memory, Path(":memory:"), found)


def backfill(
    settings: Settings, progress: Callable[[Progress], None] | None = None, dry_run: bool = False
) -> BackfillReport:
    """Run one full pass; ``progress`` is called after each page."""
    store = _open(settings, dry_run)
    source = Source(settings)
    try:
        started = time.monotonic()
        rec = Reconcile(source, settings.batch_size, "backfill")
        keys_read = 0
        while True:
            keys = rec.next_keys(store)
            if not keys:
                break
            wanted = records_of(keys)
            # In a dry run nothing records what the scan read, so the sweep meets every row
            # again: only its missing keys (tombstones) are new information.
            sweep = rec.sweeping
            result = archive(source, store, wanted, dry_run=dry_run, gone_only=dry_run and sweep)
            rec.result.merge(result)
            if not (dry_run and sweep):
                keys_read += len(wanted)
            if progress is not None:
                r = rec.result
                progress(
                    Progress(
                        phase="sweep" if sweep else "scan",
                        keys_scanned=rec.keys_scanned,
                        keys_read=keys_read,
                        written=sum(r.written.values()),
                        quarantined=r.new_quarantined,
                        elapsed_s=time.monotonic() - started,
                    )
                )
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
            elapsed_s=time.monotonic() - started,
            dry_run=dry_run,
        )
        if not dry_run:
            store.set_state({"last_backfill": json.dumps(report.as_dict())}, now_us())
        return report
    finally:
        source.close()
        store.close()
