"""Changes the notifications missed, measured by the reconciles that found them.

A reconcile re-reads every desto key. A record it writes (new, changed, or gone from Redis) is a
change the archive did not have; when no notification named that record, neither before the
reconcile read it (its key was then dirty, and the read took it along) nor up to the end of the
pass, the notifications missed it: a dropped subscription, Redis' flags turned off, a client-output
buffer that overflowed. The end of the pass is a barrier: a PING on the subscription, answered by
Redis after every notification it sent before (listener.py), so a notification still on its way
for a change the reconcile read is never taken for a missed one.

Only the reconciles that could find such changes measure: those on the timer and after a
reconnect, while Redis' notifications are on. The first after a start or after the file was
opened again finds what the daemon could not have been told; one after the dirty set overflowed,
what the daemon itself forgot; with notifications off, every change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from archiver.keys import record_key
from archiver.kinds import Kind

MEASURED_REASONS = frozenset({"timer", "reconnect"})


class Notified(Protocol):
    """The keys notifications named, and the barrier on the subscription (inbox.Inbox)."""

    def watch(self) -> None: ...
    def watched(self) -> set[bytes] | None: ...
    def ask_barrier(self) -> int: ...
    def barrier_passed(self, number: int) -> bool: ...


class Measure:
    """One reconcile's count, in three steps: the records its pages wrote and no notification had
    brought (suspects), the barrier once its last page is written, then the count."""

    def __init__(self, notified: Notified) -> None:
        self.notified = notified
        self.suspects: dict[bytes, Kind] = {}
        self.barrier: int | None = None
        self.missed: dict[str, int] | None = None  # by kind, once settled
        self.settled = False
        notified.watch()

    def page_written(self, taken: Iterable[bytes], changed: Iterable[tuple[Kind, str]]) -> None:
        """A page of the pass is written: ``taken``, the dirty keys its read took along (their
        notifications came first); ``changed``, the records the write inserted, changed or
        tombstoned."""
        notified = set(taken)
        for kind, record_id in changed:
            key = record_key(kind, record_id)
            if key not in notified:
                self.suspects[key] = kind

    def waiting(self) -> bool:
        """The barrier is asked for and not yet reached."""
        return self.barrier is not None and not self.settled and not self.notified.barrier_passed(self.barrier)

    def settle(self) -> bool:
        """At the end of the pass: ask for the barrier, then (once it is reached) count. True
        once counted (``missed`` is None when the notified keys were too many to keep)."""
        if self.settled:
            return True
        if self.barrier is None:
            self.barrier = self.notified.ask_barrier()
        if not self.notified.barrier_passed(self.barrier):
            return False
        seen = self.notified.watched()
        if seen is not None:
            counted = Counter(kind.value for key, kind in self.suspects.items() if key not in seen)
            self.missed = {kind.value: counted.get(kind.value, 0) for kind in Kind}
        self.suspects.clear()
        self.settled = True
        return True
