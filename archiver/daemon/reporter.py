"""What the daemon tells: the heartbeat in the file, systemd's STATUS= line, Prometheus' counters."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from archiver.archive.store import BatchResult, Store
from archiver.config import Settings
from archiver.daemon.failures import Failures
from archiver.daemon.fetcher import Fetcher
from archiver.daemon.inbox import Inbox
from archiver.daemon.reconciler import Reconciles
from archiver.daemon.snapshot import Snapshot
from archiver.log import get_logger
from archiver.redis_side.listener import Listener
from archiver.redis_side.read_clock import now_us

if TYPE_CHECKING:
    from archiver.daemon.shipper import ShipperThread

log = get_logger("archiver.daemon.reporter")


@dataclass
class Totals:
    """What the daemon has done since it started."""

    keys_read: int = 0
    erased_records: int = 0  # erased by desto, forget or retention, finished by this daemon
    result: BatchResult = field(default_factory=BatchResult)


@dataclass
class Workers:
    """The daemon's threads, once started."""

    fetcher: Fetcher | None = None
    listener: Listener | None = None
    shipper: ShipperThread | None = None


class Reporter:
    """Reads the daemon's parts; the metrics server calls :meth:`snapshot` from its own thread."""

    def __init__(
        self,
        settings: Settings,
        inbox: Inbox,
        totals: Totals,
        failures: Failures,
        reconciles: Reconciles,
        workers: Workers,
        ready: threading.Event,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.totals = totals
        self.failures = failures
        self.reconciles = reconciles
        self.workers = workers
        self.ready = ready

    def failing(self) -> str | None:
        """What is failing: the writer's own failure, else the fetcher's reads from Redis."""
        fetcher = self.workers.fetcher
        return self.failures.failing or ("redis" if fetcher is not None and fetcher.failing else None)

    def reconnects(self) -> int:
        listener = self.workers.listener
        return listener.reconnects if listener is not None else 0

    def snapshot(self) -> Snapshot:
        """The counters, read at once: the metrics server's (from its own thread), the heartbeat's
        and the status line's."""
        dirty, totals, shipper = self.inbox.dirty, self.totals, self.workers.shipper
        oldest = dirty.oldest_at
        r = totals.result
        return Snapshot(
            events=dirty.events,
            keys_read=totals.keys_read,
            written=dict(r.written),
            quarantined=r.new_quarantined,
            quarantine_not_kept=r.quarantine_not_kept,
            tombstones=r.tombstoned,
            erased=totals.erased_records,
            erased_not_written=r.erased,
            reconciles=self.reconciles.done,
            missed_changes=dict(self.reconciles.missed),
            missed_streak=self.reconciles.missed_streak,
            reconnects=self.reconnects(),
            lag_s=0.0 if oldest is None else max(0.0, time.monotonic() - oldest),
            pending=len(dirty),
            subscribed=self.inbox.connected.is_set(),
            failing=self.failing(),
            write_failures=self.failures.write_failures,
            read_failures=self.workers.fetcher.read_failures if self.workers.fetcher is not None else 0,
            ship=shipper.status() if shipper is not None else None,
        )

    def heartbeat(self, store: Store) -> None:
        """The heartbeat in the file's state, which ``health`` and ``stats`` read; skipped while
        the file is busy (the next one comes within ARCHIVER_HEARTBEAT_INTERVAL)."""
        s, notify = self.snapshot(), self.reconciles.notify
        beat = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "at_us": now_us(),
            "redis": self.settings.redis_address(),
            "subscribed": s.subscribed,
            "notifications": None if notify is None else notify.ok,
            "pending": s.pending,
            "events": s.events,
            "keys_read": s.keys_read,
            "written": sum(s.written.values()),
            "quarantined": s.quarantined,
            "quarantine_not_kept": s.quarantine_not_kept,
            "tombstoned": s.tombstones,
            "erased": s.erased,
            "reconciles": s.reconciles,
            "missed_changes": sum(s.missed_changes.values()),
            "reconnects": s.reconnects,
            "failing": s.failing,
            **({"ship": s.ship} if s.ship is not None else {}),
        }
        try:
            store.set_state({"heartbeat": json.dumps(beat)}, now_us())
        except sqlite3.Error as exc:
            log.debug("heartbeat.skipped", error=str(exc))

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS= (shown by systemctl status)."""
        s = self.snapshot()
        if s.failing:
            state = f"retrying ({s.failing} failing)"
        elif not s.subscribed:
            state = f"waiting for Redis at {self.settings.redis_address()}"
        elif not self.ready.is_set():
            state = "reconciling with Redis"
        else:
            state = "archiving"
        return (
            f"{state}: {s.events} events, {s.keys_read} keys read, {sum(s.written.values())} rows written, "
            f"{s.quarantined} quarantined, {s.pending} pending, {s.reconciles} reconciles"
        )

    def stopped(self, flushed: int, left: int) -> None:
        s = self.snapshot()
        log.info(
            "archiver.stopped",
            flushed_at_stop=flushed,
            left_for_next_start=left,
            events=s.events,
            keys_read=s.keys_read,
            written=s.written,
            tombstoned=s.tombstones,
            erased=s.erased,
            erased_not_written=s.erased_not_written,
            quarantined=s.quarantined,
            reconciles=s.reconciles,
            reconnects=s.reconnects,
        )
