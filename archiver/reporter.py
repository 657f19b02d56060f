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

from archiver.config import Settings
from archiver.failures import Failures
from archiver.fetcher import Fetcher
from archiver.inbox import Inbox
from archiver.listener import Listener
from archiver.log import get_logger
from archiver.metrics import Snapshot
from archiver.read_clock import now_us
from archiver.reconciler import Reconciles
from archiver.store import BatchResult, Store

if TYPE_CHECKING:
    from archiver.shipper import ShipperThread

log = get_logger("archiver.reporter")


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

    def heartbeat(self, store: Store) -> None:
        """The heartbeat in the file's state, which ``health`` and ``stats`` read; skipped while
        the file is busy (the next one comes within ARCHIVER_HEARTBEAT_INTERVAL)."""
        dirty, totals, notify, shipper = self.inbox.dirty, self.totals, self.reconciles.notify, self.workers.shipper
        beat = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "at_us": now_us(),
            "redis": self.settings.redis_address(),
            "subscribed": self.inbox.connected.is_set(),
            "notifications": None if notify is None else notify.ok,
            "pending": len(dirty),
            "events": dirty.events,
            "keys_read": totals.keys_read,
            "written": sum(totals.result.written.values()),
            "quarantined": totals.result.new_quarantined,
            "tombstoned": totals.result.tombstoned,
            "erased": totals.erased_records,
            "reconciles": self.reconciles.done,
            "reconnects": self.reconnects(),
            "failing": self.failing(),
            **({"ship": shipper.status()} if shipper is not None else {}),
        }
        try:
            store.set_state({"heartbeat": json.dumps(beat)}, now_us())
        except sqlite3.Error as exc:
            log.debug("heartbeat.skipped", error=str(exc))

    def status_line(self) -> str:
        """A one-line summary for systemd's STATUS= (shown by systemctl status)."""
        r, dirty = self.totals.result, self.inbox.dirty
        if not self.inbox.connected.is_set():
            state = f"waiting for Redis at {self.settings.redis_address()}"
        elif not self.ready.is_set():
            state = "reconciling with Redis"
        else:
            state = "archiving"
        failing = self.failing()
        if failing:
            state = f"retrying ({failing} failing)"
        return (
            f"{state}: {dirty.events} events, {self.totals.keys_read} keys read, "
            f"{sum(r.written.values())} rows written, {r.new_quarantined} quarantined, "
            f"{len(dirty)} pending, {self.reconciles.done} reconciles"
        )

    def snapshot(self) -> Snapshot:
        """The counters Prometheus reads (called from the metrics server's thread)."""
        dirty, totals, shipper = self.inbox.dirty, self.totals, self.workers.shipper
        oldest = dirty.oldest_at
        r = totals.result
        return Snapshot(
            events=dirty.events,
            keys_read=totals.keys_read,
            written=dict(r.written),
            quarantined=r.new_quarantined,
            tombstones=r.tombstoned,
            erased=totals.erased_records,
            erased_not_written=r.erased,
            reconciles=self.reconciles.done,
            reconnects=self.reconnects(),
            lag_s=0.0 if oldest is None else max(0.0, time.monotonic() - oldest),
            pending=len(dirty),
            subscribed=self.inbox.connected.is_set(),
            failing=self.failing(),
            write_failures=self.failures.write_failures,
            ship=shipper.status() if shipper is not None else None,
        )

    def stopped(self, flushed: int, left: int) -> None:
        totals = self.totals
        log.info(
            "archiver.stopped",
            flushed_at_stop=flushed,
            left_for_next_start=left,
            events=self.inbox.dirty.events,
            keys_read=totals.keys_read,
            written=dict(totals.result.written),
            tombstoned=totals.result.tombstoned,
            erased=totals.erased_records,
            erased_not_written=totals.result.erased,
            quarantined=totals.result.new_quarantined,
            reconciles=self.reconciles.done,
            reconnects=self.reconnects(),
        )
