"""One reconcile of the daemon, shared by its two threads: the handshake in one place.

The main thread (daemon/pipeline.py, through daemon/reconciler.py) begins a pass, writes the
pages the fetcher read, and finds the pages of its sweep in the file; the fetcher thread
(daemon/fetcher.py) reads the pass's pages from Redis. Each state is left by one thread only
("main": the main thread, "fetcher": the fetcher thread):

    state       left by   for          when
    requested   fetcher   scanning     Redis' clock is read (and its notification flags looked at,
                                       when asked)
    scanning    fetcher   scanning     a page of the scan is read and handed to the writer
                fetcher   scanned      the scan's last page is read and handed to the writer
    scanned     main      sweeping     that last page is written
    sweeping    main      paging       the keys of the sweep's next page are found in the file
                main      done         no key is left: the pass's summary is written
    paging      fetcher   paged        the sweep's page is read and handed to the writer
    paged       main      sweeping     that page is written

A read that fails moves nothing (and so does a look in the file for the sweep's next page that
fails: the pass stays sweeping): the pass keeps its page (the scan page's keys, not only SCAN's
cursor, which has moved on) and the fetcher reads it again after its backoff, as often as it
takes. So a pass is done only once every page of it is written, and nothing but a new pass
replaces it: the main thread begins another (a reconnect, a file opened again), and the fetcher
drops the old one at its next look. Pages of a replaced pass still in flight are written (they
are reads like any other) and move nothing.

A state is moved to before the page it announces is handed over: the writer never meets a page
whose pass does not yet know it was read.
"""

from __future__ import annotations

import enum
import threading

from archiver.archive.store import Store
from archiver.daemon.reconcile import Reconcile
from archiver.redis_side.source import Source


class State(enum.Enum):
    REQUESTED = "requested"
    SCANNING = "scanning"
    SCANNED = "scanned"
    SWEEPING = "sweeping"
    PAGING = "paging"
    PAGED = "paged"
    DONE = "done"


class StateError(AssertionError):
    """A transition the table above does not have: a bug."""


class ReconcilePass:
    def __init__(self, reason: str, page: int, check_notifications: bool = False) -> None:
        self.reason = reason
        self.page = page
        self.check_notifications = check_notifications  # the fetcher looks at the flags first
        self.state = State.REQUESTED
        self.rec: Reconcile | None = None  # the pass's progress, from its start on
        self._scan_keys: list[bytes] | None = None  # the scan page read now (kept until handed over)
        self._sweep_keys: list[bytes] | None = None  # the sweep page to read
        self._lock = threading.Lock()  # transitions are atomic: the other thread looks at the state

    def __repr__(self) -> str:
        return f"<ReconcilePass {self.reason} {self.state.value}>"

    def _move(self, expected: State, to: State) -> None:
        with self._lock:
            if self.state is not expected:
                raise StateError(
                    f"reconcile pass {self.reason}: {self.state.value} -> {to.value}, expected {expected.value}"
                )
            self.state = to

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    # ─── the fetcher's ────────────────────────────────────────────────────────────────────────

    def start(self, source: Source) -> None:
        """requested -> scanning: read Redis' clock (every row read from now on is newer). A
        failure (Redis unreachable) raises and leaves the pass requested."""
        if self.state is not State.REQUESTED:
            raise StateError(f"reconcile pass {self.reason}: started again while {self.state.value}")
        rec = Reconcile(source, self.page, self.reason)
        self.rec = rec
        self._move(State.REQUESTED, State.SCANNING)

    def scan_page(self) -> list[bytes]:
        """The keys of the scan's page to read now: the same page again after a failed read,
        else the next one SCAN gives (possibly none: an empty last page still ends the scan)."""
        if self.state is not State.SCANNING:
            raise StateError(f"reconcile pass {self.reason}: no scan page while {self.state.value}")
        if self._scan_keys is None:
            assert self.rec is not None
            self._scan_keys = self.rec.next_scan_keys()
        return self._scan_keys

    @property
    def scan_ends(self) -> bool:
        """The page from :meth:`scan_page` is the scan's last."""
        return self.rec is not None and not self.rec.scanning

    def scan_page_read(self) -> bool:
        """scanning -> scanning, or scanned after the last page: the page is read, and about to be
        handed over. Returns whether it was the last."""
        last = self.scan_ends
        self._scan_keys = None
        if last:
            self._move(State.SCANNING, State.SCANNED)
        return last

    def sweep_page(self) -> list[bytes] | None:
        """The keys of the sweep's page to read (None: no page waits to be read)."""
        return self._sweep_keys if self.state is State.PAGING else None

    def sweep_page_read(self) -> None:
        """paging -> paged: the page is read, and about to be handed over."""
        self._move(State.PAGING, State.PAGED)
        self._sweep_keys = None

    # ─── the main thread's ────────────────────────────────────────────────────────────────────

    def scan_written(self) -> None:
        """scanned -> sweeping: the scan's last page is in the file."""
        self._move(State.SCANNED, State.SWEEPING)

    def sweep_page_written(self) -> None:
        """paged -> sweeping."""
        self._move(State.PAGED, State.SWEEPING)

    @property
    def sweep_waits(self) -> bool:
        """The sweep's next page may be looked for in the file."""
        return self.state is State.SWEEPING

    def next_sweep_page(self, store: Store) -> bool:
        """sweeping -> paging with the keys of the next page found in the file (True), or, with
        none left, stays sweeping for :meth:`finished` (False)."""
        if self.state is not State.SWEEPING:
            raise StateError(f"reconcile pass {self.reason}: no sweep page while {self.state.value}")
        assert self.rec is not None
        keys = self.rec.next_keys(store)
        if not keys:
            return False
        self._sweep_keys = keys
        self._move(State.SWEEPING, State.PAGING)
        return True

    def finished(self) -> None:
        """sweeping -> done: the summary is written."""
        self._move(State.SWEEPING, State.DONE)
