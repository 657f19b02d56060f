"""When the daemon reconciles, the pass under way, and what it tells of Redis' notifications.

A reconcile is asked for at start, after a reconnect, after the dirty set overflowed, after the
file was opened again, and on a timer (more often while notifications are off). The fetcher
reads its scan; once the scan is written, its sweep (the archived rows the scan did not meet)
goes page by page: the main thread finds each page's keys in the file, the fetcher reads them.
"""

from __future__ import annotations

import json
import time

from archiver.config import Settings
from archiver.log import get_logger
from archiver.read_clock import now_us
from archiver.reconcile import Reconcile
from archiver.schedule import Deadline, Schedule
from archiver.source import NotifyState
from archiver.store import Store

log = get_logger("archiver.reconciler")


class Reconciles:
    """Only the main thread calls it."""

    def __init__(self, settings: Settings, schedule: Schedule) -> None:
        self.settings = settings
        self.schedule = schedule
        self.wanted: str | None = None  # why the next reconcile begins as soon as it can
        self.running = False  # a reconcile's scan or sweep is under way
        self.sweep: Reconcile | None = None  # the reconcile whose sweep is under way
        self._page_out = False  # a page of that sweep is being read or waits to be written
        self.notify: NotifyState | None = None
        self._warned = False
        self.done = 0

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

    def begun(self) -> None:
        self.wanted = None
        self.running = True
        self.sweep = None  # a sweep under way belongs to a pass now replaced
        self._page_out = False

    def abandon_sweep(self) -> None:
        """The file the sweep read from is gone: the reconcile wanted instead replaces the pass."""
        self.sweep = None
        self._page_out = False

    # ─── the sweep ────────────────────────────────────────────────────────────────────────────

    def scan_written(self, rec: Reconcile) -> None:
        self.sweep = rec
        self._page_out = False

    def sweep_waits(self) -> bool:
        """A sweep is under way and its next page may be looked for."""
        return self.sweep is not None and not self._page_out

    def next_sweep_page(self, store: Store) -> tuple[Reconcile, list[bytes]] | None:
        """The keys of the sweep's next page, for the fetcher to read; None when the sweep is over
        (the reconcile is then finished)."""
        rec = self.sweep
        assert rec is not None and not self._page_out
        keys = rec.next_keys(store)
        if keys:
            self._page_out = True
            return rec, keys
        self._finish(rec, store)
        return None

    def page_written(self, rec: Reconcile) -> None:
        if rec is self.sweep:
            self._page_out = False

    def _finish(self, rec: Reconcile, store: Store) -> None:
        summary = rec.summary()
        # first, as it may fail (a busy file): the pass is then finished at the next try
        store.set_state({"last_reconcile_at": str(now_us()), "last_reconcile": json.dumps(summary)}, now_us())
        self.sweep = None
        self.running = False
        self.done += 1
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
