"""``desto-archiver backfill``: one full pass over Redis into the file, then exit.

It is a reconcile run to completion on the daemon's own path (SCAN pages, atomic pipelined
reads, one transaction per page), so it is safe beside a running daemon: both write through
the same version guard. It needs no keyspace notifications.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from archiver.config import Settings
from archiver.reconcile import Reconcile, archive, now_us, records_of
from archiver.source import Source
from archiver.store import Store


@dataclass(frozen=True)
class BackfillReport:
    keys_scanned: int
    keys_read: int
    written: dict[str, int]
    unchanged: int
    tombstoned: int
    quarantined: int
    still_quarantined: int
    elapsed_s: float

    @property
    def keys_per_s(self) -> float:
        return self.keys_read / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "keys_scanned": self.keys_scanned,
            "keys_read": self.keys_read,
            "written": self.written,
            "unchanged": self.unchanged,
            "tombstoned": self.tombstoned,
            "quarantined": self.quarantined,
            "still_quarantined": self.still_quarantined,
            "elapsed_s": round(self.elapsed_s, 3),
            "keys_per_s": round(self.keys_per_s, 1),
        }


def backfill(settings: Settings, progress: Callable[[Reconcile, int], None] | None = None) -> BackfillReport:
    """Run one full pass; ``progress`` is called after each page with the keys read so far."""
    store = Store.open(settings.db_path, settings.sqlite_busy_timeout)
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
            rec.result.merge(archive(source, store, wanted))
            keys_read += len(wanted)
            if progress is not None:
                progress(rec, keys_read)
        result = rec.result
        report = BackfillReport(
            keys_scanned=rec.keys_scanned,
            keys_read=keys_read,
            written=dict(result.written),
            unchanged=result.unchanged,
            tombstoned=result.tombstoned,
            quarantined=len(result.quarantined),
            still_quarantined=result.quarantine_repeats,
            elapsed_s=time.monotonic() - started,
        )
        store.set_state({"last_backfill": json.dumps(report.as_dict())}, now_us())
        return report
    finally:
        source.close()
        store.close()
