"""The daemon: its threads and parts, wired together, and its main loop.

Three threads. The listener (listener.Listener) only marks keys dirty in the inbox. The fetcher
(fetcher.Fetcher) makes every other read from Redis: it takes dirty keys out of the set *before*
reading them (so a change that lands during the read marks the key dirty again), reads them and
the reconciles' pages, and normalizes them. The main thread owns the file: it writes what the
fetcher read and does, on a schedule of named deadlines, everything else that touches the file.

The main thread's parts, each in its module:
  archive_file.ArchiveFile  the file: its lock, the store open on it, the watch on its path
  inbox.Inbox               what the other threads hand over: dirty keys, desto's messages, news
  reconciler.Reconciles     when to reconcile, the sweep's pages, the notification warnings
  housekeeping.Housekeeping other programs' writes and erasures, the retention
  failures.Failures         backoff and logging while Redis or the file fails
  reporter.Reporter         heartbeat, STATUS= line, Prometheus' counters
  schedule.Schedule         the deadlines
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

from archiver.archive.store import Store, StoreError
from archiver.config import Settings
from archiver.daemon.archive_file import ArchiveFile
from archiver.daemon.failures import Failures
from archiver.daemon.fetcher import Fetcher, Work
from archiver.daemon.health import Notifier
from archiver.daemon.housekeeping import Housekeeping
from archiver.daemon.inbox import Inbox
from archiver.daemon.reconcile import write_batch
from archiver.daemon.reconciler import Reconciles
from archiver.daemon.reporter import Reporter, Totals, Workers
from archiver.daemon.schedule import Deadline, Schedule
from archiver.daemon.snapshot import Snapshot, build_info
from archiver.daemon.wakeup import Wakeup
from archiver.log import get_logger
from archiver.redis_side.listener import Listener
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.redis_client import REDIS_ERRORS, log_unreachable, retryable
from archiver.redis_side.source import NotifyState, Source

if TYPE_CHECKING:
    from archiver.daemon.metrics import Metrics
    from archiver.daemon.shipper import ShipperThread

log = get_logger("archiver.daemon.pipeline")

_TICK = 0.25  # while stopping: the longest a wait for the reader's last batches lasts
_FILE_CHECK_S = 2.0  # how often the daemon checks that the archive's path still names its file
# After this long without a batch to write, the daemon gives back the memory its work took:
# SQLite's page cache (up to ARCHIVER_SQLITE_CACHE_MB, filled by a burst or a reconcile) and the
# heap the allocator kept.
_QUIET_S = 60.0


class Daemon:
    """``desto-archiver run``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.schedule = Schedule()
        # The main loop sleeps on this until a batch is read, news arrive, a stop is asked for or
        # its next deadline: an idle daemon wakes only for what is due.
        self.wakeup = Wakeup()
        self.inbox = Inbox(settings.max_dirty, arrived=self.wakeup.notify)
        self.file = ArchiveFile(settings)
        self.failures = Failures(settings.reconnect_max_backoff)
        self.reconciles = Reconciles(settings, self.schedule, self.inbox)
        self.housekeeping = Housekeeping(settings, self.inbox.dirty, self.schedule)
        self.totals = Totals()
        self.workers = Workers()
        self.ready = threading.Event()  # subscribed and first reconcile done (READY=1 comes before)
        self.reporter = Reporter(
            settings, self.inbox, self.totals, self.failures, self.reconciles, self.workers, self.ready
        )
        self.notifier = Notifier()
        self.source: Source | None = None
        self.metrics: Metrics | None = None
        self._pending: Work | None = None  # read, not yet written
        self._last_write = time.monotonic()
        self._given_back = True  # nothing written since the memory was last given back
        self._ship_after_reopen = False  # the shipper was stopped for a lost file: start it on the new
        # Set from signal handlers: a plain flag, no lock (a handler taking a lock the interrupted
        # main thread holds would deadlock), and a byte into the wake-up pipe.
        self._stop_requested = False

    @property
    def store(self) -> Store | None:
        return self.file.store

    @property
    def shipper(self) -> ShipperThread | None:
        return self.workers.shipper

    def snapshot(self) -> Snapshot:
        return self.reporter.snapshot()

    # ─── control ─────────────────────────────────────────────────────────────────────────────

    def request_stop(self) -> None:
        """Signal-safe: sets a flag and wakes the loop, which does the work."""
        self._stop_requested = True
        self.wakeup.notify()

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def run(self) -> None:
        """Run until :meth:`request_stop`; raises StoreError when the file cannot be used."""
        self.file.open()
        self.source = Source(self.settings)
        self._note_file()
        try:
            self._start()
            # Ready for a supervisor means the file is open and every thread runs: waiting for Redis
            # is the daemon's designed state, not a failed start (systemd would kill and restart a
            # daemon that waits longer than TimeoutStartSec). STATUS= says what it waits for.
            self.notifier.ready(self.reporter.status_line())
            while not self._stop_requested:
                self._step()
        finally:
            self._shutdown()
            self.file.close()
            self.wakeup.close()

    def _note_file(self) -> None:
        """Tell the reads' clock the newest version in the file just opened."""
        assert self.source is not None and self.file.store is not None
        self.source.clock.note_file(self.file.store.newest_version())

    def _start(self) -> None:
        assert self.source is not None and self.file.store is not None
        try:
            notify: NotifyState | None = self.source.ensure_notifications()
        except REDIS_ERRORS as exc:
            if not retryable(exc):
                raise
            notify = None
            log_unreachable(self.settings, exc)
        log.info(
            "archiver.started",
            **build_info(),
            pid=os.getpid(),
            redis=self.settings.redis_address(),
            db=str(self.settings.db_path),
            schema_found=self.file.store.schema_found,
            notify_flags_found=None if notify is None else notify.found,
            notify_flags_set=None if notify is None else notify.set_to,
            notifications="unknown (Redis unreachable)" if notify is None else ("on" if notify.ok else "off"),
        )
        if self.settings.metrics_port is not None:
            from archiver.daemon.metrics import Metrics  # prometheus_client: imported only when served

            self.metrics = Metrics(self.reporter.snapshot)
            try:
                self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:
                raise StoreError(
                    f"cannot serve metrics on {self.settings.metrics_host}:{self.settings.metrics_port}: "
                    f"{exc.strerror}; choose another ARCHIVER_METRICS_PORT"
                ) from None
            log.info("metrics.serving", host=self.settings.metrics_host, port=self.settings.metrics_port)
        self._start_shipper()
        self.workers.fetcher = Fetcher(
            self.settings,
            self.source,
            self.inbox.dirty,
            notified=self.inbox.notifications_checked,
            handed_over=self.wakeup.notify,
        )
        self.workers.fetcher.start()
        self.workers.listener = Listener(self.settings, self.source, self.inbox)
        self.inbox.send_barrier = self.workers.listener.barrier_asked
        self.workers.listener.start()

    def _start_shipper(self) -> None:
        if self.settings.postgres_url is None:
            return
        from archiver.daemon.shipper import ShipperThread  # psycopg is needed only where shipping is configured

        self.workers.shipper = ShipperThread(self.settings, self._busy)
        self.workers.shipper.start()
        if self.file.store is not None:
            self.file.store.logged = self.workers.shipper.changes_logged

    def _busy(self) -> bool:
        """Changes wait to be read or written (called from the shipper's thread: reads only)."""
        fetcher = self.workers.fetcher
        return len(self.inbox.dirty) > 0 or (fetcher is not None and fetcher.has_queued())

    # ─── the main loop: writes what the fetcher read, and everything else that is the file's ──

    def _step(self) -> None:
        now = time.monotonic()
        schedule, fetcher = self.schedule, self.workers.fetcher
        assert fetcher is not None
        self._take_news()
        self.inbox.drain_hints()
        if self.inbox.dirty.take_overflow():
            log.warning("events.overflow", limit=self.settings.max_dirty, detail="dirty keys forgotten: reconciling")
            self.reconciles.want("overflow")
        if schedule.due(Deadline.FILE_CHECK, now):
            self._check_file(now)
        # up to half a file check early: the heartbeat then keeps the file check's beat, and an
        # idle daemon wakes once every two seconds for both
        if schedule.due(Deadline.HEARTBEAT, now + _FILE_CHECK_S / 2):
            self._heartbeat(now)
        if self.notifier.watchdog_interval is not None and schedule.due(Deadline.WATCHDOG, now):
            schedule.set_after(Deadline.WATCHDOG, self.notifier.watchdog_interval, now)
            self.notifier.watchdog()
        if not fetcher.is_alive():
            raise RuntimeError(f"the reading thread stopped: {fetcher.error!r}")
        if not schedule.due(Deadline.RETRY, now):
            self.wakeup.wait(min(schedule.at(Deadline.RETRY), self._next_due()) - now)
            return
        store = self.file.store
        assert store is not None
        try:
            self.totals.erased_records += self.housekeeping.step(store, now)
            if self.inbox.connected.is_set() and (reason := self.reconciles.due(now)):
                fetcher.follow(self.reconciles.begin(reason))
            if self._pending is None:
                # while a sweep is under way, a batch waits for no one: the sweep's next page is
                # looked for meanwhile
                sweep = self.inbox.connected.is_set() and self.reconciles.sweep_waits()
                self._pending = fetcher.take(0)
                if self._pending is None:
                    if sweep:
                        if self.reconciles.next_sweep_page(store):
                            fetcher.wake()
                        elif not self.reconciles.running:  # the reconcile is over
                            self.ready.set()
                            self.notifier.status(self.reporter.status_line())
                    else:
                        self.wakeup.wait(self._next_due() - time.monotonic())
                    return
            self._write(store, self._pending)
            self._pending = None
        except sqlite3.Error as exc:  # this thread never reads Redis: the fetcher's reads fail there
            self._failed(exc)
            return
        self.failures.succeeded()

    def _next_due(self) -> float:
        """When the loop must look again with nothing arriving: its next deadline (the watchdog's
        only where systemd asks for one; the reconcile timer's once a reconcile is wanted)."""
        schedule = self.schedule
        deadlines = [Deadline.FILE_CHECK, *self.housekeeping.deadlines]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(Deadline.WATCHDOG)
        # the heartbeat rides on the file check within half of its interval either way (see _step):
        # a heartbeat due a moment before a file check never takes a wake-up of its own
        late = min(_FILE_CHECK_S, self.settings.heartbeat_interval) / 2
        due = min(schedule.at(Deadline.HEARTBEAT) + late, *(schedule.at(d) for d in deadlines))
        if self.inbox.connected.is_set():  # a reconcile waits for the subscription, whose news wake the loop
            due = min(due, self.reconciles.next_at())
        return due

    def _take_news(self) -> None:
        for news in self.inbox.take_news():
            if news.notify is not None:
                self.reconciles.notified(news.notify)
            if news.reconcile is not None:  # subscribed: Redis is back
                self.reconciles.want(news.reconcile)
                self.schedule.set_now(Deadline.RETRY)  # no need to sit out a backoff from the outage
                self.schedule.set_now(Deadline.HEARTBEAT)  # tell health checks at once

    def _write(self, store: Store, work: Work) -> None:
        """Apply one batch the fetcher read; a failure leaves it pending, to be tried again (a
        late write is safe: the version guard keeps the newest read)."""
        self.inbox.drain_hints()  # desto's messages that came with these changes go with them
        started = time.perf_counter()
        gone_events = {key: event for key, event in work.items if event}
        result = write_batch(store, work.outcomes, gone_events, self.inbox.hints)
        if self.metrics is not None:
            self.metrics.batch_seconds.observe(work.read_s + time.perf_counter() - started)
        self.totals.keys_read += work.keys
        self._last_write, self._given_back = time.monotonic(), False
        self.totals.result.merge(result)
        if work.reconcile is not None and work.reconcile.rec is not None:
            work.reconcile.rec.result.merge(result)
            self.reconciles.written(work, result)

    def _failed(self, exc: sqlite3.Error) -> None:
        delay = self.failures.failed("sqlite", exc)
        self.schedule.set_after(Deadline.RETRY, delay, time.monotonic())

    def _check_file(self, now: float) -> None:
        """Raises StoreError when the file now at the archive's path cannot be used."""
        self.schedule.set_after(Deadline.FILE_CHECK, _FILE_CHECK_S, now)
        if not self.file.lost():
            return
        shipper = self.workers.shipper
        if shipper is not None:
            # Its connection to the lost file must be closed before a new file takes the path:
            # SQLite names a database's WAL and shared memory after its path, and a connection to
            # the lost file closed later would remove or map the new file's (disk I/O errors, a
            # SIGBUS). Until it has (a batch under way ends first), the path waits; what is written
            # meanwhile goes to the lost file, and the reconcile after the reopening reads it again.
            shipper.stop(0)
            if shipper.is_alive():
                self.schedule.set_after(Deadline.FILE_CHECK, 0.1, now)
                return
            self.workers.shipper = None
            self._ship_after_reopen = True
        reopened = self.file.reopened()  # False: the path names the file again (moved back)
        if self._ship_after_reopen:  # ship from the file the path names now
            self._ship_after_reopen = False
            self._start_shipper()
        if not reopened:
            return
        self._note_file()
        self.reconciles.abandon()  # it swept the lost file; the reconcile below replaces it
        if self.workers.fetcher is not None:
            self.workers.fetcher.follow(None)
        self.reconciles.want("reopened")
        self.schedule.set_now(Deadline.HEARTBEAT)

    def _heartbeat(self, now: float) -> None:
        self.schedule.set_after(Deadline.HEARTBEAT, self.settings.heartbeat_interval, now)
        if self.file.store is not None:
            self.reporter.heartbeat(self.file.store)
            if not self._given_back and now - self._last_write >= _QUIET_S and not self.reconciles.running:
                before = _rss_mb()
                self.file.store.give_back_memory()
                self._given_back = True
                log.info("memory.given_back", quiet_s=round(now - self._last_write, 1), rss_mb=before, now_mb=_rss_mb())
        if self.notifier.enabled:
            self.notifier.status(self.reporter.status_line())

    # ─── stopping: what was read is written, within ARCHIVER_SHUTDOWN_TIMEOUT ─────────────────

    def _shutdown(self) -> None:
        self.notifier.stopping()
        listener, fetcher, shipper = self.workers.listener, self.workers.fetcher, self.workers.shipper
        if listener is not None:
            listener.stop()
        self.inbox.drain_hints()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        flushed = 0
        if fetcher is not None:
            fetcher.drain()
            # no store: a file that was lost, then refused when opened again
            while (
                (store := self.file.store) is not None
                and time.monotonic() < deadline
                and (fetcher.is_alive() or self._pending is not None or fetcher.has_queued())
            ):
                try:
                    if self._pending is None:
                        self._pending = fetcher.take(_TICK)
                        if self._pending is None:
                            continue
                    self._write(store, self._pending)
                    flushed += self._pending.keys
                    self._pending = None
                except sqlite3.Error as exc:
                    log.warning("shutdown.flush_failed", error=str(exc), pending=len(self.inbox.dirty))
                    time.sleep(_TICK)
            fetcher.stop_now()
            fetcher.join(timeout=2)
        left = len(self.inbox.dirty) + (self._pending.keys if self._pending is not None else 0)
        if fetcher is not None:
            left += fetcher.queued_keys()
        if shipper is not None:
            # the batch under way lands or not; whatever is left waits in the file for the next start
            shipper.stop(min(5.0, max(0.5, deadline - time.monotonic())))
        if (store := self.file.store) is not None:
            with contextlib.suppress(sqlite3.Error):
                self.totals.erased_records += self.housekeeping.finish_erasures(store)  # a deletion a moment ago
            with contextlib.suppress(sqlite3.Error):
                store.set_state({"stopped_at": str(now_us())}, now_us())
            self.file.close()
        if listener is not None:
            listener.join(timeout=2)
        if self.source is not None:
            self.source.close()
        if self.metrics is not None:
            self.metrics.close()
        self.notifier.close()
        self.reporter.stopped(flushed, left)


def _rss_mb() -> float | None:
    """This process's resident memory (Linux), for the log."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
