"""The daemon's shipper thread: the file's change log into PostgreSQL, off the daemon's hot path."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from archiver.central.postgres import NotAllowed, ShipError
from archiver.central.ship import FileReplaced, NeedsCopy, Shipper
from archiver.config import Settings
from archiver.daemon.failures import worth_logging
from archiver.log import get_logger

log = get_logger("archiver.central.ship")


class _Stopping(Exception):
    pass


# Entries shipped between trims of the log while catching up: each trim takes the file's write lock.
_TRIM_EVERY = 20_000
# Shortest time between the starts of two rounds woken by commits: at a steady stream of changes a
# round ships what a quarter of a second committed, not one small batch per commit.
_GATHER_S = 0.25


class ShipperThread(threading.Thread):
    """The daemon's shipper: follows the file's change log into PostgreSQL from connections of its
    own. PostgreSQL down, slow or refusing only delays it (it retries with a growing pause); the
    daemon's writer never waits for it, and it holds no more than one batch in memory."""

    def __init__(self, settings: Settings, busy: Callable[[], bool] | None = None) -> None:
        super().__init__(name="archiver-shipper", daemon=True)
        self.settings = settings
        self.busy = busy  # the daemon has changes waiting: the archive goes first
        self.shipper = Shipper(settings)
        self._stop_event = threading.Event()
        self.wake = threading.Event()
        self.shipped = 0  # log entries shipped since start
        self.copies = 0
        self.failures = 0
        self.failing: str | None = None  # the last error while shipping fails
        self.refused: str | None = None  # shipping stopped until a person acts
        self.connected = False
        self.last_shipped_at: float | None = None  # monotonic
        self.backlog: int | None = None  # changes waiting in the file, as of the last look
        self._backoff = 0.0  # seconds before the next try while shipping fails

    def _copy_progress(self, table: str, copied: int, total: int) -> None:
        if self.stopping:  # a whole copy is long: a stop request ends it between pages
            raise _Stopping

    def changes_logged(self) -> None:
        """The file's change log may have grown (a commit of the daemon's, or another program's seen):
        ship now rather than at the next look (called from the daemon's main thread)."""
        self.wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.wake.set()
        self.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "position": self.shipper.position,
            "shipped": self.shipped,
            "copies": self.copies,
            "failing": self.failing,
            "refused": self.refused,
            "backlog": self.backlog,
        }

    def run(self) -> None:
        import psycopg

        self._backoff = 0.0
        while not self.stopping:
            try:
                self._round()
            except NotAllowed as exc:  # the owner's grant lets it go on: tried again, not refused for good
                self._failed(exc, expected=True)
            except ShipError as exc:
                self.refused = str(exc)
                self.connected = False
                log.error("ship.refused", error=str(exc), detail="shipping stopped; the archive goes on")
                self.shipper.close_pg()
                return
            except _Stopping:
                break
            except FileReplaced as exc:
                # The daemon opens the path's new file and starts a shipper for it once it notices
                # (within two seconds). This thread must not open the path itself meanwhile: it would
                # race the daemon's creation of the new file (a connection in the middle of it
                # keeps the file from being set to WAL, or meets the lost file's WAL still there).
                log.info("ship.file_replaced", detail=str(exc), source=self.shipper.source)
                self.shipper.close_file()
                self._stop_event.wait()
                break
            except Exception as exc:  # whatever fails, the archive goes on and shipping retries
                self._failed(exc, expected=isinstance(exc, psycopg.Error | OSError | sqlite3.Error))
        self.shipper.close()

    def _failed(self, exc: Exception, expected: bool) -> None:
        """Note a failure, log it (once per outage, each new kind, every 20th) and wait, longer and
        longer up to ARCHIVER_RECONNECT_MAX_BACKOFF, before the next try."""
        import psycopg

        if not expected:
            log.exception("ship.error", error=repr(exc))
        self.failures += 1
        previous, self.failing = (
            self.failing,
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
        )
        if isinstance(exc, psycopg.errors.QueryCanceled) and self.shipper.batch_size > 1:
            # a statement timeout: smaller batches fit in it
            self.shipper.batch_size = max(1, self.shipper.batch_size // 2)
        self._backoff = min(self.settings.reconnect_max_backoff, max(0.5, self._backoff * 2))
        before = None if previous is None else previous.split(":", 1)[0]
        if worth_logging(before, type(exc).__name__, self.failures):
            log.warning(
                "ship.failed",
                error=self.failing,
                failures=self.failures,
                retry_in_s=self._backoff,
                postgres=self.settings.postgres_address(),
                batch_size=self.shipper.batch_size,
            )
        if not isinstance(exc, OSError | sqlite3.Error):
            self.connected = False
            self.shipper.close_pg()
        with contextlib.suppress(sqlite3.Error):
            self.backlog = self.shipper.backlog()
        self._stop_event.wait(self._backoff)

    def _round(self) -> None:
        started_round = time.monotonic()
        shipper = self.shipper
        if shipper.pg is None:
            shipper.open()
            self.connected = True
            log.info("ship.connected", postgres=self.settings.postgres_address(), source=shipper.source)
        shipped, copied, trimmed_at = 0, False, 0
        while not self.stopping:
            started = time.monotonic()
            try:
                n = shipper.ship_batch()
            except NeedsCopy as why:
                if copied:  # the log is still not usable right after a copy: try again later, not at once
                    log.warning("ship.copy_again", reason=str(why), source=shipper.source)
                    break
                copied = True
                log.info("ship.copying", reason=str(why), source=shipper.source)
                report = shipper.copy_all(self._copy_progress)
                self.copies += 1
                log.info("ship.copied", **report.as_dict())
                continue
            if n == 0:
                break
            shipped += n
            self.shipped += n
            self.last_shipped_at = time.monotonic()
            if shipped - trimmed_at >= _TRIM_EVERY:  # far behind: trim on the way, not only at the end
                shipper.trim()
                trimmed_at = shipped
            if self.busy is not None and self.busy():
                # Catching up while the daemon has changes to archive: the two share the cores (and
                # the interpreter), and the archive goes first. Shipping at most half the time leaves
                # it the rest; the backlog waits in the file.
                self._stop_event.wait(min(1.0, time.monotonic() - started))
            if shipper.batch_size < self.settings.ship_batch_size:
                shipper.batch_size = min(self.settings.ship_batch_size, shipper.batch_size * 2)
        if shipped > trimmed_at:
            shipper.trim()
        self.backlog = shipper.backlog()
        if shipped:
            log.debug("ship.shipped", entries=shipped, position=shipper.position)
        self._succeeded()  # before the wait: what it shipped is in PostgreSQL now
        self._wait_for_changes(started_round)

    def _succeeded(self) -> None:
        self._backoff = 0.0
        if self.failing is not None:
            log.info("ship.recovered", after=self.failing, failures=self.failures)
            self.failing, self.failures = None, 0

    def _wait_for_changes(self, started_round: float) -> None:
        """Until the daemon says the log grew (or ARCHIVER_SHIP_INTERVAL passes: another program's
        commit the daemon has not seen yet); then, if this round began less than _GATHER_S ago, the
        rest of that time, so that a steady stream of commits goes in batches, not one round each."""
        self.wake.wait(self.settings.ship_interval)
        self.wake.clear()
        rest = _GATHER_S - (time.monotonic() - started_round)
        if rest > 0:
            self._stop_event.wait(min(rest, self.settings.ship_interval))
