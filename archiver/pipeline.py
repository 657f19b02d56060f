"""The daemon: coalesce events into dirty keys, flush them in batches, reconcile, shut down cleanly.

Three threads. The listener (listener.Listener) only marks keys dirty. The fetcher
(fetcher.Fetcher) takes dirty keys out of the set *before* reading them (so a change that lands
during the read marks the key dirty again), reads them and reconcile pages from Redis and
normalizes them. The main thread owns the store: it writes what the fetcher read, steps a
reconcile's sweep between writes, and keeps the heartbeat, the rechecks and the schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from archiver import changelog, erase
from archiver.config import Settings
from archiver.dirty import Dirty, Hints
from archiver.fetcher import Fetcher, Work
from archiver.health import Notifier
from archiver.keys import record_key
from archiver.listener import Listener
from archiver.log import get_logger
from archiver.metrics import Metrics, Snapshot
from archiver.models import TimedHint, parse_hint
from archiver.reconcile import Reconcile, archive, now_us, records_of, write_batch
from archiver.redis_client import CONNECTION_ERRORS, log_unreachable, unreachable_advice
from archiver.source import NotifyState, Source
from archiver.store import BatchResult, DaemonLock, Store, StoreError, store_advice

if TYPE_CHECKING:
    from archiver.shipper import ShipperThread

log = get_logger("archiver.pipeline")

# The archive only grows, and desto's random ids spread every insert over its indexes: once those
# outgrow SQLite's page cache, each insert reads pages back from the OS. A cache that holds the
# indexes of a few hundred thousand records keeps the writer well ahead of desto.
DAEMON_CACHE_MB = 64

_TICK = 0.25  # the longest the main loop sleeps: how fast it notices a stop request
_FILE_CHECK_S = 1.0  # how often the daemon checks that the archive's path still names its file
_RETENTION_S = 3600.0  # how often the daemon erases what left Redis longer ago than ARCHIVER_RETENTION_DAYS
_RETENTION_BATCHES = 4  # transactions of retention per step, between the daemon's writes


@dataclass
class Totals:
    """What the daemon has done since it started."""

    keys_read: int = 0
    reconciles: int = 0
    erased_records: int = 0  # erased by desto, forget or retention, finished by this daemon
    result: BatchResult = field(default_factory=BatchResult)


class Daemon:
    """``desto-archiver run``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dirty = Dirty(settings.max_dirty)
        self.hints = Hints(settings.max_dirty)
        self._raw_hints: deque[tuple[bytes, bytes, int]] = deque(maxlen=settings.max_dirty)
        self.totals = Totals()
        # Set from signal handlers: a plain flag, no lock (a handler taking a lock the interrupted
        # main thread holds would deadlock). The loop never sleeps longer than _TICK.
        self._stop_requested = False
        self._subscribed = threading.Event()
        self._reconcile_wanted: str | None = None
        self._notify: NotifyState | None = None
        self._notify_warned = False
        self._reconciling = False  # a reconcile's scan or sweep is under way
        self._sweep: Reconcile | None = None  # the reconcile whose sweep is under way
        self._pending: Work | None = None  # read, not yet written
        self.fetcher: Fetcher | None = None
        self._next_reconcile = float("inf")
        self._retry_at = 0.0
        self._failures = 0
        self._failing: str | None = None
        self._write_failures = 0  # every failed write to the file since start, for the metrics
        self._next_heartbeat = 0.0
        self._next_recheck = 0.0
        self._recheck_more = False
        self._scrub_retry = False
        self._next_retention = 0.0
        self.store: Store | None = None
        self._lock: DaemonLock | None = None
        self._next_file_check = 0.0
        self.source: Source | None = None
        self.listener: Listener | None = None
        self.ready = threading.Event()  # subscribed and first reconcile done (READY=1 comes before)
        self.notifier = Notifier()
        self._next_watchdog = 0.0
        self.metrics: Metrics | None = None
        self.shipper: ShipperThread | None = None

    # ─── the listener's sink (called from its thread: only cheap, thread-safe work) ──────────

    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None:
        self.dirty.add_many(events)

    def hint(self, channel: bytes, data: bytes) -> None:
        self._raw_hints.append((channel, data, now_us()))
        self.dirty.wake.set()

    def subscribed(self, notify: NotifyState, reconnected: bool) -> None:
        self._notify = notify
        self._reconcile_wanted = "reconnect" if reconnected else "start"
        self._retry_at = 0.0  # Redis is back: no need to sit out a backoff from the outage
        self._next_heartbeat = 0.0  # tell health checks at once
        self._subscribed.set()

    def disconnected(self, error: str) -> None:
        self._subscribed.clear()

    # ─── control ─────────────────────────────────────────────────────────────────────────────

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag; the loop does the work."""
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def run(self) -> None:
        """Run until :meth:`request_stop`; raises StoreError when the file cannot be used."""
        self._open_store()
        self.source = Source(self.settings)
        self._note_file()
        try:
            self._start()
            # Ready for a supervisor means the file is open and every thread runs: waiting for Redis
            # is the daemon's designed state, not a failed start (systemd would kill and restart a
            # daemon that waits longer than TimeoutStartSec). STATUS= says what it waits for.
            self.notifier.ready(self._status_line())
            while not self._stop_requested:
                self._step()
        finally:
            self._shutdown()
            if self._lock is not None:
                self._lock.release()

    def _open_store(self) -> None:
        settings = self.settings
        self._lock = DaemonLock(settings.db_path)
        self._lock.acquire()
        try:
            self.store = Store.open(
                settings.db_path, settings.sqlite_busy_timeout, cache_mb=settings.sqlite_cache_mb or DAEMON_CACHE_MB
            )
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
        try:
            # the change log's triggers exist while shipping is configured, and only then
            changelog.set_enabled(self.store.conn, settings.postgres_url is not None, settings.sqlite_busy_timeout)
        except sqlite3.Error as exc:
            self.store.close()
            self._lock.release()
            self._lock = None
            raise StoreError(f"cannot set up the change log in {settings.db_path}: {exc}") from None

    def _note_file(self) -> None:
        """Tell the reads' clock the newest version in the file just opened."""
        assert self.source is not None and self.store is not None
        self.source.clock.note_file(self.store.newest_version())

    def _check_file(self) -> None:
        """The archive's file removed or replaced under the daemon (rm, mv, a restore moved into
        place) would go on taking every write, unseen by desto and by every other reader of the
        path. Open the path again instead, and reconcile: Redis still holds the last 7 days.
        Raises StoreError when the file now at the path cannot be used."""
        assert self.store is not None and self._lock is not None
        self._next_file_check = time.monotonic() + _FILE_CHECK_S
        reason = self.store.file_lost()
        if reason is None:
            return
        removed = self.store.release_lost_file()
        self.store = None
        self._lock.release()
        self._lock = None
        log.error(
            "archive.file_lost",
            db=str(self.settings.db_path),
            reason=reason,
            removed=removed,
            detail="what the daemon wrote since the file was opened stays in that file, wherever it went; "
            "opening the path again and reconciling from Redis",
        )
        self._open_store()
        self._note_file()
        assert self.store is not None
        if self.shipper is not None:  # its connection reads the lost file: ship from the new one
            from archiver.shipper import ShipperThread

            self.shipper.stop(2.0)
            self.shipper = ShipperThread(self.settings, self._busy)
            self.shipper.start()
        self._sweep = None  # it swept the lost file; the reconcile below replaces it
        self._reconcile_wanted = self._reconcile_wanted or "reopened"
        self._next_heartbeat = 0.0
        log.info("archive.reopened", db=str(self.settings.db_path), schema_found=self.store.schema_found)

    def _start(self) -> None:
        assert self.source is not None and self.store is not None
        try:
            notify: NotifyState | None = self.source.ensure_notifications()
        except CONNECTION_ERRORS as exc:
            notify = None
            log_unreachable(self.settings, exc)
        log.info(
            "archiver.started",
            pid=os.getpid(),
            redis=self.settings.redis_address(),
            db=str(self.settings.db_path),
            schema_found=self.store.schema_found,
            notify_flags_found=None if notify is None else notify.found,
            notify_flags_set=None if notify is None else notify.set_to,
            notifications="unknown (Redis unreachable)" if notify is None else ("on" if notify.ok else "off"),
        )
        if self.settings.metrics_port is not None:
            self.metrics = Metrics(self.snapshot)
            try:
                self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:
                raise StoreError(
                    f"cannot serve metrics on {self.settings.metrics_host}:{self.settings.metrics_port}: "
                    f"{exc.strerror}; choose another ARCHIVER_METRICS_PORT"
                ) from None
            log.info("metrics.serving", host=self.settings.metrics_host, port=self.settings.metrics_port)
        if self.settings.postgres_url is not None:
            from archiver.shipper import ShipperThread

            self.shipper = ShipperThread(self.settings, self._busy)
            self.shipper.start()
        self.fetcher = Fetcher(self.settings, self.source, self.dirty)
        self.fetcher.start()
        self.listener = Listener(self.settings, self.source, self)
        self.listener.start()

    # ─── the main loop: writes what the fetcher read, and everything else that is the store's ──

    def _step(self) -> None:
        now = time.monotonic()
        self._drain_hints()
        overflowed = self.dirty.take_overflow()
        if overflowed:
            log.warning("events.overflow", limit=self.settings.max_dirty, detail="dirty keys forgotten: reconciling")
            self._reconcile_wanted = self._reconcile_wanted or "overflow"
        if now >= self._next_file_check:
            self._check_file()
        if now >= self._next_heartbeat:
            self._heartbeat()
        if self.notifier.watchdog_interval is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self.notifier.watchdog_interval
            self.notifier.watchdog()
        assert self.fetcher is not None
        if not self.fetcher.is_alive():
            raise RuntimeError(f"the reading thread stopped: {self.fetcher.error!r}")
        if now < self._retry_at:
            time.sleep(min(_TICK, self._retry_at - now))
            return
        try:
            if now >= self._next_recheck:
                self._recheck_foreign_writes(now)
            if self.settings.retention_days is not None and now >= self._next_retention:
                self._retention(now)
            if self._subscribed.is_set() and self._reconcile_wanted:
                self._begin_reconcile(self._reconcile_wanted)
            elif self._subscribed.is_set() and not self._reconciling and now >= self._next_reconcile:
                self._begin_reconcile("timer")
            if self._pending is None:
                # while a sweep is under way, a batch waits for no one: the sweep steps meanwhile
                self._pending = self.fetcher.take(0 if self._sweep is not None else _TICK)
                if self._pending is None:
                    if self._sweep is not None and self._subscribed.is_set():
                        self._sweep_step(self._sweep)
                    return
            self._write(self._pending)
            self._pending = None
        except CONNECTION_ERRORS as exc:
            self._failed("redis", exc)
            return
        except sqlite3.Error as exc:
            self._failed("sqlite", exc)
            return
        if self._failing is not None:
            log.info("archiver.recovered", after=self._failing, failures=self._failures)
            self._failing, self._failures = None, 0

    def _write(self, work: Work) -> None:
        """Apply one batch the fetcher read; a failure leaves it pending, to be tried again (a
        late write is safe: the version guard keeps the newest read)."""
        assert self.store is not None
        self._drain_hints()  # desto's messages that came with these changes go with them
        started = time.perf_counter()
        gone_events = {key: event for key, event in work.items if event}
        result = write_batch(self.store, work.outcomes, gone_events, self.hints)
        if self.metrics is not None:
            self.metrics.batch_seconds.observe(work.read_s + time.perf_counter() - started)
        self.totals.keys_read += work.keys
        self.totals.result.merge(result)
        if work.reconcile is not None:
            work.reconcile.result.merge(result)
            if work.scan_done:
                self._sweep = work.reconcile

    def _sweep_step(self, rec: Reconcile) -> None:
        """One page of a reconcile's sweep (archived rows its scan did not meet), between writes."""
        assert self.store is not None and self.source is not None
        keys = rec.next_keys(self.store)
        if keys:
            events = self.dirty.take(keys)
            gone_events = {k: e for k, e in events.items() if e}
            try:
                result = archive(self.source, self.store, records_of(keys), gone_events)
            except BaseException:
                self.dirty.requeue(list(events.items()))
                raise
            rec.result.merge(result)
            self.totals.result.merge(result)
            self.totals.keys_read += len(keys)
        if rec.done:
            self._finish_reconcile(rec)

    def _recheck_foreign_writes(self, now: float) -> None:
        """Re-read records another program (desto's own store) wrote to the file since the last
        look, so a stale copy it saved never outlives the Redis state."""
        assert self.store is not None
        self._next_recheck = now + _TICK
        foreign = self.store.foreign_commits()
        if foreign or self._scrub_retry:
            self._finish_erasures()
        if not (foreign or self._recheck_more):
            return
        limit = self.settings.batch_size
        taken = self.store.take_rechecks(limit)
        self._recheck_more = len(taken) == limit
        for kind, record_id in taken:
            self.dirty.add(record_key(kind, record_id), None)

    def _finish_erasures(self) -> None:
        """Records another program erased (desto's History tab, forget): their history and
        quarantine entries go, and their bytes are scrubbed from the file."""
        assert self.store is not None
        self._scrub_retry = True  # until it has run through (a busy file raises: tried again)
        done = erase.finish(self.store)
        self._scrub_retry = done is not None and not done.scrub_done
        if done is not None:
            self.totals.erased_records += done.erasures
            log.info("erasure.finished", **done.as_dict())

    def _retention(self, now: float) -> None:
        """Erase what left Redis longer ago than ARCHIVER_RETENTION_DAYS, a few small
        transactions per step, so live writes go on between them."""
        assert self.store is not None and self.settings.retention_days is not None
        cutoff = now_us() - int(self.settings.retention_days * 86_400 * 1_000_000)
        pruned = erase.prune(self.store, cutoff, self.settings.batch_size, _RETENTION_BATCHES)
        self._next_retention = now + (_TICK if not pruned.done else _RETENTION_S)
        if pruned.records:
            self.totals.erased_records += sum(pruned.records.values())
            log.info("retention.erased", days=self.settings.retention_days, **pruned.as_dict())

    def _failed(self, what: str, exc: BaseException) -> None:
        self._failures += 1
        if what == "sqlite":
            self._write_failures += 1
        delay = min(self.settings.reconnect_max_backoff, 0.1 * 2 ** min(self._failures, 10))
        self._retry_at = time.monotonic() + delay
        if self._failing != what or self._failures % 20 == 0:
            error = str(exc) or type(exc).__name__
            if what == "sqlite":
                log.warning(
                    "store.write_failed",
                    error=error,
                    failures=self._failures,
                    retry_in_s=delay,
                    **({"action": advice} if (advice := store_advice(exc)) else {}),
                )
            else:
                log.warning(
                    "redis.read_failed",
                    error=error,
                    failures=self._failures,
                    retry_in_s=delay,
                    action=unreachable_advice(exc),
                )
        self._failing = what

    def _drain_hints(self) -> None:
        raw = self._raw_hints
        while raw:
            channel, data, received = raw.popleft()
            hint = parse_hint(channel, data)
            if hint is None:
                continue
            self.hints.add(hint.kind, hint.record_id, TimedHint(hint.status, hint.timestamp, received))
            self.dirty.add(record_key(hint.kind, hint.record_id), None)

    def _begin_reconcile(self, reason: str) -> None:
        assert self.source is not None and self.fetcher is not None
        if reason == "timer":
            notify = self.source.ensure_notifications()
            self._notify = notify
        self._warn_notifications()
        self._reconcile_wanted = None
        self._reconciling = True
        self._sweep = None  # a sweep under way belongs to a pass now replaced
        self.fetcher.request_scan(reason)

    def _warn_notifications(self) -> None:
        notify = self._notify
        if notify is None:
            return
        if not notify.ok and not self._notify_warned:
            self._notify_warned = True
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
        elif notify.ok and self._notify_warned:
            self._notify_warned = False
            log.info("notifications.available", flags=notify.set_to or notify.found)
        if notify.set_to:
            log.info("notifications.set", flags_found=notify.found, flags_set=notify.set_to)

    def _finish_reconcile(self, rec: Reconcile) -> None:
        assert self.store is not None
        self._sweep = None
        self._reconciling = False
        self.totals.reconciles += 1
        interval = self.settings.reconcile_interval
        if self._notify is None or not self._notify.ok:
            interval = min(interval, self.settings.fallback_reconcile_interval)
        self._next_reconcile = time.monotonic() + interval
        self.store.set_state(
            {"last_reconcile_at": str(now_us()), "last_reconcile": json.dumps(rec.summary())}, now_us()
        )
        log.info("reconcile.done", **rec.summary(), next_in_s=interval)
        self.ready.set()
        self.notifier.status(self._status_line())

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
        if self.store is None:
            return
        state = {
            "heartbeat": json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "at_us": now_us(),
                    "redis": self.settings.redis_address(),
                    "subscribed": self._subscribed.is_set(),
                    "notifications": None if self._notify is None else self._notify.ok,
                    "pending": len(self.dirty),
                    "events": self.dirty.events,
                    "keys_read": self.totals.keys_read,
                    "written": sum(self.totals.result.written.values()),
                    "quarantined": self.totals.result.new_quarantined,
                    "tombstoned": self.totals.result.tombstoned,
                    "erased": self.totals.erased_records,
                    "reconciles": self.totals.reconciles,
                    "reconnects": self.listener.reconnects if self.listener else 0,
                    "failing": self._failing_now(),
                    **({"ship": self.shipper.status()} if self.shipper is not None else {}),
                }
            )
        }
        try:
            self.store.set_state(state, now_us())
        except sqlite3.Error as exc:
            log.debug("heartbeat.skipped", error=str(exc))
        if self.notifier.enabled:
            self.notifier.status(self._status_line())

    def _busy(self) -> bool:
        """Changes wait to be read or written (called from the shipper's thread: reads only)."""
        fetcher = self.fetcher
        return len(self.dirty) > 0 or (fetcher is not None and fetcher.has_queued())

    def _failing_now(self) -> str | None:
        """What is failing: the writer's own failure, else the fetcher's reads from Redis."""
        return self._failing or ("redis" if self.fetcher is not None and self.fetcher.failing else None)

    def _status_line(self) -> str:
        """A one-line summary for systemd's STATUS= (shown by systemctl status)."""
        r = self.totals.result
        if not self._subscribed.is_set():
            state = f"waiting for Redis at {self.settings.redis_address()}"
        elif not self.ready.is_set():
            state = "reconciling with Redis"
        else:
            state = "archiving"
        failing = self._failing_now()
        if failing:
            state = f"retrying ({failing} failing)"
        return (
            f"{state}: {self.dirty.events} events, {self.totals.keys_read} keys read, "
            f"{sum(r.written.values())} rows written, {r.new_quarantined} quarantined, "
            f"{len(self.dirty)} pending, {self.totals.reconciles} reconciles"
        )

    def snapshot(self) -> Snapshot:
        """The counters Prometheus reads (called from the metrics server's thread)."""
        oldest = self.dirty.oldest_at
        r = self.totals.result
        return Snapshot(
            events=self.dirty.events,
            keys_read=self.totals.keys_read,
            written=dict(r.written),
            quarantined=r.new_quarantined,
            tombstones=r.tombstoned,
            erased=self.totals.erased_records,
            erased_not_written=r.erased,
            reconciles=self.totals.reconciles,
            reconnects=self.listener.reconnects if self.listener else 0,
            lag_s=0.0 if oldest is None else max(0.0, time.monotonic() - oldest),
            pending=len(self.dirty),
            subscribed=self._subscribed.is_set(),
            failing=self._failing_now(),
            write_failures=self._write_failures,
            ship=self.shipper.status() if self.shipper is not None else None,
        )

    def _shutdown(self) -> None:
        self.notifier.stopping()
        if self.listener is not None:
            self.listener.stop()
        self._drain_hints()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        flushed = 0
        fetcher = self.fetcher
        if fetcher is not None:
            fetcher.drain()
            # no store: a file that was lost, then refused when opened again
            while (
                self.store is not None
                and time.monotonic() < deadline
                and (fetcher.is_alive() or self._pending is not None or fetcher.has_queued())
            ):
                try:
                    if self._pending is None:
                        self._pending = fetcher.take(_TICK)
                        if self._pending is None:
                            continue
                    self._write(self._pending)
                    flushed += self._pending.keys
                    self._pending = None
                except sqlite3.Error as exc:
                    log.warning("shutdown.flush_failed", error=str(exc), pending=len(self.dirty))
                    time.sleep(_TICK)
            fetcher.stop_now()
            fetcher.join(timeout=2)
        left = len(self.dirty) + (self._pending.keys if self._pending is not None else 0)
        if fetcher is not None:
            left += fetcher.queued_keys()
        if self.shipper is not None:
            # the batch under way lands or not; whatever is left waits in the file for the next start
            self.shipper.stop(min(5.0, max(0.5, deadline - time.monotonic())))
        if self.store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._finish_erasures()  # a deletion desto made a moment ago
            with contextlib.suppress(sqlite3.Error):
                self.store.set_state({"stopped_at": str(now_us())}, now_us())
            self.store.close()
        if self.listener is not None:
            self.listener.join(timeout=2)
        if self.source is not None:
            self.source.close()
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()
        totals = self.totals
        log.info(
            "archiver.stopped",
            flushed_at_stop=flushed,
            left_for_next_start=left,
            events=self.dirty.events,
            keys_read=totals.keys_read,
            written=dict(totals.result.written),
            tombstoned=totals.result.tombstoned,
            erased=totals.erased_records,
            erased_not_written=totals.result.erased,
            quarantined=totals.result.new_quarantined,
            reconciles=totals.reconciles,
            reconnects=self.listener.reconnects if self.listener else 0,
        )
