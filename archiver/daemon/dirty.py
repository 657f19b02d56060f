"""Coalescing: the keys waiting to be re-read, and desto's status messages waiting for their read.

Both are filled by the listener thread and drained by the main loop; both are bounded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from archiver.keys import GONE_EVENTS, is_index
from archiver.kinds import Kind
from archiver.models import Row, TimedHint

_HINTS_PER_RECORD = 32


class Dirty:
    """Keys waiting to be re-read, coalesced, in arrival order; bounded.

    Each key keeps the last removal event seen for it (del, expired, evicted), so a tombstone
    says why the key left. On overflow the keys are forgotten and a reconcile is scheduled
    instead: a reconcile re-reads everything, so nothing is lost, only coalesced harder.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._keys: dict[bytes, bytes | None] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()  # set when the set goes from empty to non-empty
        self.oldest_at: float | None = None
        self.overflows = 0
        self.events = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: bytes, event: bytes | None) -> None:
        self.add_many([(key, event)])

    def add_many(self, events: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Mark keys (a socket read's worth of notifications at once) under one lock; desto's
        indexes are not records and are left out."""
        gone_events = GONE_EVENTS
        with self._lock:
            self.events += len(events)
            keys = self._keys
            was_empty = not keys
            for key, event in events:
                if is_index(key):
                    continue
                if key not in keys and len(keys) >= self.limit:
                    keys.clear()
                    self.overflows += 1
                    continue
                keys[key] = event if event in gone_events else None
            if keys and (was_empty or self.oldest_at is None):
                self.oldest_at = time.monotonic()
                self.wake.set()
            elif not keys:
                self.oldest_at = None

    def take_overflow(self) -> int:
        with self._lock:
            count, self.overflows = self.overflows, 0
            return count

    def pop(self, n: int) -> list[tuple[bytes, bytes | None]]:
        with self._lock:
            keys = self._keys
            taken = []
            for key in keys:
                taken.append((key, keys[key]))
                if len(taken) >= n:
                    break
            for key, _ in taken:
                del keys[key]
            if not keys:
                self.oldest_at = None
            return taken

    def peek(self, n: int) -> list[bytes]:
        """The ``n`` keys waiting longest, left in place."""
        with self._lock:
            return list(itertools.islice(self._keys, n))

    def take(self, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        """Remove ``keys`` that are dirty (a reconcile is about to read them); their events."""
        with self._lock:
            found = {key: self._keys.pop(key) for key in keys if key in self._keys}
            if not self._keys:
                self.oldest_at = None
            return found

    def requeue(self, items: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Put back keys whose flush failed, without overwriting a newer event."""
        with self._lock:
            for key, event in items:
                if key not in self._keys and len(self._keys) < self.limit:
                    self._keys[key] = event
                elif key not in self._keys:
                    self.overflows += 1
            if self._keys and self.oldest_at is None:
                self.oldest_at = time.monotonic()
                self.wake.set()

    def ready(self, batch_size: int, max_age: float) -> bool:
        oldest = self.oldest_at
        return len(self._keys) >= batch_size or (oldest is not None and time.monotonic() - oldest >= max_age)


class Hints:
    """desto's status messages per record, held until the record's next read; bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_record: OrderedDict[tuple[Kind, str], list[TimedHint]] = OrderedDict()

    def add(self, kind: Kind, record_id: str, hint: TimedHint) -> None:
        hints = self._by_record.get((kind, record_id))
        if hints is None:
            if len(self._by_record) >= self.limit:
                self._by_record.popitem(last=False)  # only desto's timestamps are lost, never a record
            hints = self._by_record[(kind, record_id)] = []
        if len(hints) < _HINTS_PER_RECORD:
            hints.append(hint)

    def take(self, rows: Iterable[Row]) -> dict[tuple[Kind, str], list[TimedHint]]:
        taken = {}
        for row in rows:
            hints = self._by_record.pop((row.kind, row.record_id), None)
            if hints:
                taken[(row.kind, row.record_id)] = hints
        return taken

    def restore(self, taken: dict[tuple[Kind, str], list[TimedHint]]) -> None:
        for (kind, record_id), hints in taken.items():
            for hint in hints:
                self.add(kind, record_id, hint)
