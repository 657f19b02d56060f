"""The one path from Redis to the file, and the full pass built on it.

``archive`` reads keys atomically, normalizes them and applies them in one transaction: the
daemon's flushes, its reconciles and the backfill all go through it. ``Reconcile`` is a full
pass in steps, so the daemon can interleave live flushes with a long scan.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from archiver.archive.store import Batch, BatchResult, Store
from archiver.daemon.dirty import Hints
from archiver.keys import KeyClass, ParsedKey, classify, record_key
from archiver.kinds import Kind
from archiver.log import get_logger
from archiver.models import Gone, Outcome, Row, normalize
from archiver.redis_side.source import Source

log = get_logger("archiver.daemon.reconcile")


class Reconcile:
    """One full pass, in steps: SCAN desto's keys page by page, then re-read the live rows the
    scan did not meet (their keys left Redis while nobody listened) so they get tombstones."""

    def __init__(self, source: Source, page: int, reason: str) -> None:
        self.source = source
        self.page = page
        self.reason = reason
        self.started_us = source.version_now()  # rows read from now on have read_at_us >= this
        self.started_mono = time.monotonic()
        self.cursor = 0
        self.scanning = True
        self.sweeping = False
        self.kinds = list(Kind)
        self.after_rowid = 0
        self.done = False
        self.keys_scanned = 0
        self.result = BatchResult()

    def next_scan_keys(self) -> list[bytes]:
        """The next page of the scan; empty once the scan is over (``scanning`` is then False).
        Needs no store: a backfill calls it from its reading thread."""
        while self.scanning:
            self.cursor, keys = self.source.scan_page(self.cursor, self.page)
            if self.cursor == 0:
                self.scanning = False
            self.keys_scanned += len(keys)
            if keys:
                return keys
        return []

    def next_keys(self, store: Store) -> list[bytes]:
        """The keys of the next step; empty with ``done`` set when the pass is over.
        ``sweeping`` tells which phase the returned keys belong to."""
        while not self.done:
            self.sweeping = not self.scanning
            if self.scanning:
                keys = self.next_scan_keys()
                if keys:
                    return keys
                continue
            if not self.kinds:
                self.done = True
                break
            kind = self.kinds[0]
            rows = store.live_not_read_since(kind, self.started_us, self.after_rowid, self.page)
            if not rows:
                self.kinds.pop(0)
                self.after_rowid = 0
                continue
            self.after_rowid = rows[-1][0]
            return [record_key(kind, record_id) for _, record_id in rows]
        return []

    def summary(self) -> dict[str, object]:
        r = self.result
        return {
            "reason": self.reason,
            "keys_scanned": self.keys_scanned,
            "written": dict(r.written),
            "unchanged": r.unchanged,
            "tombstoned": r.tombstoned,
            "quarantined": r.new_quarantined,
            "still_quarantined": r.quarantine_repeats,
            "erased": r.erased,
            "duration_s": round(time.monotonic() - self.started_mono, 3),
        }


def records_of(keys: Iterable[bytes]) -> list[tuple[bytes, ParsedKey]]:
    """The keys worth reading: records and unknown keys (to quarantine), not desto's indexes."""
    out = []
    for key in keys:
        parsed = classify(key)
        if parsed is not None and parsed.cls is not KeyClass.INDEX:
            out.append((key, parsed))
    return out


def read_batch(source: Source, keys: Sequence[tuple[bytes, ParsedKey]]) -> list[Outcome]:
    fetched = source.fetch([key for key, _ in keys])
    return [normalize(parsed, f) for (_, parsed), f in zip(keys, fetched, strict=True)]


def archive(
    source: Source,
    store: Store,
    keys: Sequence[tuple[bytes, ParsedKey]],
    gone_events: dict[bytes, bytes] | None = None,
    hints: Hints | None = None,
    *,
    dry_run: bool = False,
    gone_only: bool = False,
) -> BatchResult:
    """The one path from Redis to the file: read the keys atomically, normalize, apply in one
    transaction. Used by the daemon's flushes, its reconciles and the backfill. ``dry_run``
    works the result out and rolls back; ``gone_only`` applies only the keys found missing."""
    return write_batch(store, read_batch(source, keys), gone_events, hints, dry_run=dry_run, gone_only=gone_only)


def write_batch(
    store: Store,
    outcomes: list[Outcome],
    gone_events: dict[bytes, bytes] | None = None,
    hints: Hints | None = None,
    *,
    dry_run: bool = False,
    gone_only: bool = False,
) -> BatchResult:
    """The store's half of :func:`archive`, for callers that read in another thread."""
    if gone_only:
        outcomes = [o for o in outcomes if isinstance(o, Gone)]
    taken = hints.take(o for o in outcomes if isinstance(o, Row)) if hints is not None else {}
    read_at = max((o.read_at_us for o in outcomes), default=0)
    state = {"last_event_at": str(read_at)} if gone_events is not None else {}
    try:
        result = store.apply(Batch(outcomes, gone_events or {}, taken, state, dry_run))
    except BaseException:
        if hints is not None:
            hints.restore(taken)
        raise
    for rejected in [] if dry_run else result.quarantined:
        log.warning(
            "record.quarantined",
            key=rejected.key.decode("utf-8", "backslashreplace")[:200],
            kind=rejected.kind.value if rejected.kind else None,
            reason=rejected.reason,
        )
    if result.quarantine_full:  # once when the cap begins to bite, not once per record it keeps out
        limits = store.quarantine.limits
        log.warning(
            "quarantine.full",
            max_bytes=limits.total_bytes,
            not_kept=result.quarantine_not_kept,
            detail="the quarantine holds ARCHIVER_QUARANTINE_MAX_BYTES: rejected records not in it yet are "
            "counted, not stored, until erasures make room or the cap is raised; 'desto-archiver stats' and "
            "'check' say how many",
        )
    return result
