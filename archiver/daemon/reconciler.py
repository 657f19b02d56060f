"""When the daemon reconciles, the pass under way, and what it tells of Redis' notifications.

A reconcile is asked for at start, after a reconnect, after the dirty set overflowed, after the
file was opened again, and on a timer (more often while notifications are off). Each pass is a
reconcile_pass.ReconcilePass, which the fetcher follows: it reads the scan; once the scan is
written, its sweep (the archived rows the scan did not meet) goes page by page: this thread finds
each page's keys in the file, the fetcher reads them.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter

from archiver.archive.store import BatchResult, Store
from archiver.config import Settings
from archiver.daemon.fetcher import Work
from archiver.daemon.missed import MEASURED_REASONS, Measure, Notified
from archiver.daemon.reconcile_pass import ReconcilePass
from archiver.daemon.schedule import Deadline, Schedule
from archiver.kinds import Kind
from archiver.log import get_logger
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.source import NotifyState

log = get_logger("archiver.daemon.reconciler")


class Reconciles:
    """Only the main thread calls it."""

    def __init__(self, settings: Settings, schedule: Schedule, watcher: Notified | None = None) -> None:
        self.settings = settings
        self.schedule = schedule
        self.watcher = watcher  # the keys notifications named, for the passes that measure (missed.py)
        self.measure: Measure | None = None  # the pass under way's count of missed changes
        # changes the notifications missed, by kind, since the start
        self.missed: Counter[str] = Counter({kind.value: 0 for kind in Kind})
        self.missed_streak = 0  # measured passes in a row, up to the last, that found missed changes
        self.wanted: str | None = None  # why the next reconcile begins as soon as it can
        self.current: ReconcilePass | None = None  # the pass under way (or the last, done)
        self.notify: NotifyState | None = None
        self._warned = False
        self.done = 0

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.done

    def want(self, reason: str) -> None:
        self.wanted = self.wanted or reason

    def due(self, now: float) -> str | None:
        """Why to begin a reconcile now (None: not now). Asked only while subscribed: a reconcile
        with nobody listening would miss the changes made during it."""
        if self.wanted:
            return self.wanted
        if not self.running and self.schedule.due(Deadline.RECONCILE, now):
            return "timer"
        return None

    def next_at(self) -> float:
        """When :meth:`due` next says yes, on the monotonic clock (0: now; inf: not on its own)."""
        if self.wanted:
            return 0.0
        return math.inf if self.running else self.schedule.at(Deadline.RECONCILE)

    def begin(self, reason: str) -> ReconcilePass:
        """A new pass, for the fetcher to follow; it replaces the one under way."""
        self.wanted = None
        self.current = ReconcilePass(reason, self.settings.batch_size, check_notifications=reason == "timer")
        if self.watcher is not None:
            self.watcher.watched()  # a watch a replaced pass began ends here
        notifications_on = self.notify is None or self.notify.ok
        measures = self.watcher is not None and reason in MEASURED_REASONS and notifications_on
        self.measure = Measure(self.watcher) if self.watcher is not None and measures else None
        return self.current

    def abandon(self) -> None:
        """The file the pass read from is gone: the reconcile wanted instead replaces it."""
        self.current = None
        if self.measure is not None and self.watcher is not None:
            self.watcher.watched()
        self.measure = None

    # ─── its pages, written ───────────────────────────────────────────────────────────────────

    def written(self, work: Work, result: BatchResult | None = None) -> None:
        """A page of a pass is in the file (a page of a replaced pass moves nothing); ``result``:
        what its write changed, for the count of missed changes."""
        rec = work.reconcile
        if rec is None:
            return
        assert rec.rec is not None
        if rec is not self.current:
            return
        if self.measure is not None and result is not None:
            self.measure.page_written((key for key, _ in work.items), result.changed)
        if work.scan_done:
            rec.scan_written()
        elif work.sweep:
            rec.sweep_page_written()

    # ─── the sweep ────────────────────────────────────────────────────────────────────────────

    def sweep_waits(self) -> bool:
        """A sweep is under way and its next page may be looked for (or, its last page written,
        the pass may end: not while the barrier of its count of missed changes is awaited)."""
        waiting = self.measure is not None and self.measure.waiting()
        return self.current is not None and self.current.sweep_waits and not waiting

    def next_sweep_page(self, store: Store) -> bool:
        """Find the sweep's next page in the file, for the fetcher to read (True); with none left,
        finish the pass (False)."""
        rec = self.current
        assert rec is not None
        if rec.next_sweep_page(store):
            return True
        if self.measure is not None and not self.measure.settle():
            return False  # the pass ends once the barrier is reached
        self._finish(rec, store)
        return False

    def _finish(self, rec: ReconcilePass, store: Store) -> None:
        assert rec.rec is not None
        summary = rec.rec.summary()
        missed = self.measure.missed if self.measure is not None else None
        summary["missed_changes"] = missed
        # first, as it may fail (a busy file): the pass is then finished at the next try
        store.set_state({"last_reconcile_at": str(now_us()), "last_reconcile": json.dumps(summary)}, now_us())
        rec.finished()
        self.measure = None
        self.done += 1
        if missed is not None:
            self.missed.update(missed)
            self.missed_streak = self.missed_streak + 1 if sum(missed.values()) else 0
            if sum(missed.values()):
                log.warning(
                    "notifications.missed_changes",
                    reason=rec.reason,
                    missed_changes={kind: n for kind, n in missed.items() if n},
                    detail="the reconcile found changes no keyspace notification had named (it archived them)",
                    action="if this repeats: is the subscription dropped (client-output-buffer-limit pubsub, "
                    "the network), or were notify-keyspace-events changed? docs/metrics.md, 'Alerting rules'",
                )
        interval = self.settings.reconcile_interval
        if self.notify is None or not self.notify.ok:
            interval = min(interval, self.settings.fallback_reconcile_interval)
        self.schedule.set_after(Deadline.RECONCILE, interval, time.monotonic())
        log.info("reconcile.done", **summary, next_in_s=interval)

    # ─── Redis' notification flags ────────────────────────────────────────────────────────────

    def notified(self, notify: NotifyState) -> None:
        """A look at Redis' notification flags (at subscribing, before each timer's reconcile):
        warn once when they are off and cannot be set, tell when they come back."""
        self.notify = notify
        if not notify.ok and not self._warned:
            self._warned = True
            log.warning(
                "notifications.unavailable",
                error=notify.error,
                flags_found=notify.found,
                action=(
                    "set notify-keyspace-events to include 'Khgxe' (for example 'notify-keyspace-events KEA' in "
                    "redis.conf, or CONFIG SET notify-keyspace-events KEA)"
                ),
                fallback=f"a full reconcile every {self.settings.fallback_reconcile_interval:g} s keeps the archive "
                "complete meanwhile",
            )
        elif notify.ok and self._warned:
            self._warned = False
            log.info("notifications.available", flags=notify.set_to or notify.found)
        if notify.set_to:
            log.info("notifications.set", flags_found=notify.found, flags_set=notify.set_to)
