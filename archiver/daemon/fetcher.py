"""The daemon's reading thread: dirty keys and reconcile pages, read from Redis and normalized.

Every read from Redis the daemon makes, but the listener's subscription, is made here: dirty keys
first, then a page of a reconcile's sweep, then a page of its scan; before a reconcile on the
timer, a look at Redis' notification flags.

It hands each batch to the writing (main) thread through a bounded queue. Reading a batch (a
socket round trip, normalizing in Python) overlaps writing the previous one (SQLite, which
releases the GIL), and a writer that falls behind holds the reader back instead of letting
memory grow: the queue holds at most QUEUE_DEPTH batches, the dirty set is bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from archiver.config import Settings
from archiver.daemon.dirty import Dirty
from archiver.daemon.failures import Failures
from archiver.daemon.reconcile import read_batch, records_of
from archiver.daemon.reconcile_pass import ReconcilePass, State
from archiver.log import get_logger
from archiver.models import Outcome, Rejected, Row
from archiver.redis_side.redis_client import REDIS_ERRORS, retryable
from archiver.redis_side.source import NotifyState, Source

log = get_logger("archiver.daemon.fetcher")

_TICK = 0.25  # the longest the reader waits for room in the writer's queue between looks at the stop flag
# With nothing dirty the reader sleeps until woken (a change, a reconcile's page, a stop): this is
# only a safety net, long enough that an idle daemon does not feel it.
_IDLE_WAIT_S = 60.0
# Batches read ahead of the writer, at most. Under load the writer joins every batch waiting into
# one transaction: a commit's cost is mostly the index pages it rewrites, and with desto's random
# ids a big transaction rewrites far fewer pages per row than a small one.
QUEUE_DEPTH = 16
# ... and at most this many bytes of values, but for one batch: a read carries up to a record's
# worth (models.MAX_RECORD_BYTES), so sixteen such batches would hold up four times this.
QUEUE_BYTES = 32 * 1024 * 1024
LINGER_S = 0.25  # the longest the writer waits for a stream's batches to fill a transaction
_BUSY_RATE = 1000.0  # events/s beyond which batches may wait longer than the flush interval
_HOLD_S = 0.01  # how often the reader looks again while it holds back
_PEEK = 64  # dirty keys looked at to tell whether they were read a moment ago
_RECENT_S = 0.5  # "a moment ago": keys read within the last one or two of these


@dataclass
class Work:
    """One batch read from Redis, waiting to be written."""

    items: list[tuple[bytes, bytes | None]]  # the dirty entries taken (put back if writing fails)
    outcomes: list[Outcome]
    read_s: float
    reconcile: ReconcilePass | None = None  # a page of this reconcile's scan or sweep
    scan_done: bool = False  # the scan is over: its sweep may begin once this page is written
    sweep: bool = False  # a page of the sweep
    keys: int = field(init=False)
    size: int = field(init=False)  # bytes of the values read, about

    def __post_init__(self) -> None:
        self.keys = len(self.outcomes)
        self.size = sum(map(_size, self.outcomes))


class Fetcher(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        source: Source,
        dirty: Dirty,
        notified: Callable[[NotifyState], None] = lambda notify: None,
        handed_over: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="archiver-fetcher", daemon=True)
        self.settings = settings
        self.source = source
        self.dirty = dirty
        self._notified = notified  # told what each look at the notification flags found
        self._handed_over = handed_over  # told each time a batch waits for the writer (wakes it)
        self._rate = 0.0  # events/s: rises at once, falls halving each tenth of a second
        self._rate_at = 0.0
        self._rate_events = 0
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._held: Work | None = None  # a reconcile page taken while joining: the next to write
        self._taken_at = time.monotonic()  # when the writer last took a batch
        # keys read in this period and the one before (only this thread touches them)
        self._recent: set[bytes] = set()
        self._older: set[bytes] = set()
        self._recent_since = 0.0
        self._pass: ReconcilePass | None = None  # the reconcile whose pages this thread reads
        self._passes = 0  # how many were followed: a new one cuts a backoff short
        self._draining = False
        self._stop_now = False
        self._failures = Failures(settings.reconnect_max_backoff, jitter=True)
        self.error: BaseException | None = None

    # ─── asked by the main thread ─────────────────────────────────────────────────────────────

    def follow(self, rec: ReconcilePass | None) -> None:
        """Read the pages of ``rec`` from now on (replacing the pass followed until now, whose
        page under way is still handed over); None: no pass."""
        self._pass = rec
        self._passes += 1
        self.dirty.wake.set()

    def wake(self) -> None:
        """The pass followed has a page to read (its sweep's, found by the main thread)."""
        self.dirty.wake.set()

    def drain(self) -> None:
        """Read what is dirty now, then end (shutdown)."""
        self._draining = True
        self.dirty.wake.set()

    def stop_now(self) -> None:
        self._stop_now = True
        self.dirty.wake.set()

    def take(self, timeout: float) -> Work | None:
        """The next batch for the writer (None when none came within ``timeout``), with the
        batches of changes behind it joined in. A commit's cost is mostly the index pages it
        rewrites, and with desto's random ids a transaction of 8,000 rows rewrites far fewer
        pages per row than one of 500: so when the first batch is full (a stream of changes),
        the writer waits for the join to fill, as long as it spent writing the last batch (at
        most LINGER_S): a busy writer gathers bigger transactions, an idle one adds no delay.
        A reconcile page is never joined, so its scan's progress stays its own."""
        writing_s = time.monotonic() - self._taken_at  # the writer's time with the last batch
        try:
            return self._take(timeout, writing_s)
        finally:
            self._taken_at = time.monotonic()

    def _take(self, timeout: float, writing_s: float) -> Work | None:
        work = self._held
        if work is not None:
            self._held = None
        else:
            try:
                work = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                return None
        if work.reconcile is not None:
            return work
        joined, keys = [work], work.keys
        limit = QUEUE_DEPTH * self.settings.batch_size
        linger = min(LINGER_S, writing_s) if work.keys >= self.settings.batch_size else 0.0
        deadline = time.monotonic() + linger
        while keys < limit:
            remaining = 0.0 if self._draining else deadline - time.monotonic()
            try:
                nxt = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt.reconcile is not None:
                self._held = nxt
                break
            joined.append(nxt)
            keys += nxt.keys
        if len(joined) == 1:
            return work
        return Work(
            [item for w in joined for item in w.items],
            [outcome for w in joined for outcome in w.outcomes],
            sum(w.read_s for w in joined),
        )

    def has_queued(self) -> bool:
        """Whether batches read are waiting for the writer."""
        return self._held is not None or not self.queue.empty()

    def queued_keys(self) -> int:
        """The keys of the batches read and not yet taken by the writer."""
        waiting: list[Work] = list(self.queue.queue)
        held = self._held
        return (0 if held is None else held.keys) + sum(work.keys for work in waiting)

    # ─── the loop ──────────────────────────────────────────────────────────────────────────────

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: the main thread sees the thread gone and stops
            self.error = exc
            log.exception("fetcher.crashed", error=repr(exc))

    def _loop(self) -> None:
        batch = self.settings.batch_size
        while not self._stop_now:
            now = time.monotonic()
            rec = None if self._draining else self._pass
            try:
                if rec is not None and rec.state is State.REQUESTED:
                    self._start(rec)
                hold = self._read_later()
                if not hold and self.dirty.ready(batch, 0.0 if self._draining else self._interval(now)):
                    self._read_dirty()
                elif rec is not None and (keys := rec.sweep_page()) is not None:
                    self._read_sweep_page(rec, keys)
                elif rec is not None and rec.state is State.SCANNING:
                    self._read_scan_page(rec)
                elif hold:
                    time.sleep(_HOLD_S)  # changes meanwhile coalesce in the dirty set
                    continue
                elif self._draining:
                    return
                else:
                    self._idle(now)
                    continue
            except REDIS_ERRORS as exc:
                if not retryable(exc):
                    raise
                self._failed(exc)
                continue
            self._failures.succeeded()

    @property
    def read_failures(self) -> int:
        """Reads from Redis that failed since start (each was retried)."""
        return self._failures.read_failures

    @property
    def failing(self) -> bool:
        """Reads from Redis fail (and are retried)."""
        return self._failures.failing is not None

    def _start(self, rec: ReconcilePass) -> None:
        if rec.check_notifications:
            self._notified(self.source.ensure_notifications())
        rec.start(self.source)  # reads Redis' clock: may fail, and is then tried again

    def _interval(self, now: float) -> float:
        """How long a change may wait to be read: ARCHIVER_FLUSH_INTERVAL while changes are few, up
        to ten times that under a stream of them. Each batch costs a read round trip and a commit
        that rewrites the index pages it touched, so under load bigger batches archive more per
        second, at a latency still well under a second."""
        if now - self._rate_at >= 0.1:
            events = self.dirty.events
            rate = (events - self._rate_events) / (now - self._rate_at)
            self._rate = rate if rate > self._rate else (self._rate + rate) / 2
            self._rate_at, self._rate_events = now, events
        return self.settings.flush_interval * min(10.0, max(1.0, self._rate / _BUSY_RATE))

    def _read_later(self) -> bool:
        """Batches wait for the writer, and most keys waiting were read a moment ago: hot keys,
        changing faster than the writer writes. Reading them again now would be wasted, as they
        may change again before the writer gets to them; they coalesce in the dirty set until
        the writer has taken what is queued. Keys not read yet (a stream of new records) are
        read ahead, for the writer's next, bigger, transaction."""
        if not self.has_queued():
            return False
        waiting = self.dirty.peek(_PEEK)
        recent, older = self._recent, self._older
        again = sum(1 for key in waiting if key in recent or key in older)
        return again * 2 > len(waiting)

    def _note_read(self, items: list[tuple[bytes, bytes | None]], now: float) -> None:
        if now - self._recent_since >= _RECENT_S:
            self._older, self._recent, self._recent_since = self._recent, set(), now
        self._recent.update(key for key, _ in items)

    def _idle(self, now: float) -> None:
        timeout = _IDLE_WAIT_S
        oldest = self.dirty.oldest_at
        if oldest is not None:
            timeout = min(timeout, max(0.0, oldest + self._interval(now) - now))
        self.dirty.wake.clear()
        rec = self._pass
        if rec is not None and (rec.state in _READS or rec.sweep_page() is not None):
            return  # asked for meanwhile
        if not len(self.dirty) or timeout > 0:
            # until the oldest change is due (or woken: a reconcile's page, a drain, a stop)
            self.dirty.wake.wait(timeout)

    def _failed(self, exc: BaseException) -> None:
        deadline = time.monotonic() + self._failures.failed("redis", exc)
        # A pass begun while this backoff runs (Redis is back: reconcile) ends it; the one already
        # followed does not: its read may be what failed, and would be tried again at once.
        asked = self._passes
        while time.monotonic() < deadline and not self._stop_now and self._passes == asked:
            time.sleep(min(_TICK, max(0.0, deadline - time.monotonic())))

    def _read_dirty(self) -> None:
        items = self.dirty.pop(self.settings.batch_size)
        if items:
            keys = [key for key, _ in items]
            self._hand_over(Work(items, *self._read(items, keys)))

    def _read_scan_page(self, rec: ReconcilePass) -> None:
        keys = rec.scan_page()  # the page whose read failed, again; else SCAN's next
        # the keys about to be read need no separate flush: take them (and their events) along
        items = list(self.dirty.take(keys).items())
        outcomes, read_s = self._read(items, keys)
        last = rec.scan_page_read()
        self._hand_over(Work(items, outcomes, read_s, rec, scan_done=last))

    def _read_sweep_page(self, rec: ReconcilePass, keys: list[bytes]) -> None:
        items = list(self.dirty.take(keys).items())
        outcomes, read_s = self._read(items, keys)
        rec.sweep_page_read()
        self._hand_over(Work(items, outcomes, read_s, rec, sweep=True))

    def _read(self, items: list[tuple[bytes, bytes | None]], keys: list[bytes]) -> tuple[list[Outcome], float]:
        """Read ``keys``; on a failure the dirty entries taken go back to the set (and the caller's
        pass keeps its page)."""
        started = time.perf_counter()
        try:
            outcomes = read_batch(self.source, records_of(keys))
        except BaseException:
            self.dirty.requeue(items)
            raise
        self._note_read(items, time.monotonic())
        return outcomes, time.perf_counter() - started

    def _hand_over(self, work: Work) -> None:
        while not self._stop_now:
            if self.has_queued() and self._queued_bytes() + work.size > QUEUE_BYTES:
                time.sleep(_HOLD_S)  # big values wait for the writer: they are not read ahead
                continue
            try:
                self.queue.put(work, timeout=_TICK)
            except queue.Full:
                continue
            self._handed_over()
            return
        self.dirty.requeue(work.items)

    def _queued_bytes(self) -> int:
        waiting: list[Work] = list(self.queue.queue)
        held = self._held
        return (0 if held is None else held.size) + sum(work.size for work in waiting)


def _size(outcome: Outcome) -> int:
    if isinstance(outcome, Row):
        return sum(len(value) for value in outcome.values if isinstance(value, str)) + len(outcome.extra or "")
    if isinstance(outcome, Rejected):
        return len(outcome.payload)
    return 0


_READS = (State.REQUESTED, State.SCANNING)  # states of a pass with a read for this thread to make
