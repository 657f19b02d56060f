"""The fetcher's hand-off to the writer: joined batches, and when it reads ahead of a slow writer.

No Redis here: batches are put in its queue as its reading loop would, and the decisions that
depend on what it read and queued are asked directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis as redis_lib
from redis.exceptions import NoPermissionError
from structlog.testing import capture_logs

from archiver.config import load_settings
from archiver.daemon import fetcher as fetcher_module
from archiver.daemon.dirty import Dirty
from archiver.daemon.fetcher import QUEUE_DEPTH, Fetcher, Work
from archiver.daemon.reconcile_pass import ReconcilePass, State
from archiver.kinds import Kind
from archiver.models import Fetched, Gone
from archiver.redis_side.source import NotifyState
from tests.helpers import wait_for

pytestmark = pytest.mark.unit


def gone(key: bytes) -> Gone:
    return Gone(key, Kind.SESSION, key.decode().rsplit(":", 1)[1], 1, 1)


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"desto:session:{prefix}-{i}".encode() for i in range(n)]


@pytest.fixture
def fetcher(tmp_path: Path) -> Fetcher:
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10)
    return Fetcher(settings, source=None, dirty=Dirty(1000))  # type: ignore[arg-type]


def queue_batch(fetcher: Fetcher, batch: list[bytes], reconcile: ReconcilePass | None = None) -> Work:
    """What the reading loop does with a batch it read: note its keys as read, queue it."""
    work = Work([(key, None) for key in batch], [gone(key) for key in batch], 0.001, reconcile)
    fetcher._note_read(work.items, time.monotonic())
    fetcher.queue.put_nowait(work)
    return work


def test_waiting_batches_join_into_one_up_to_the_limit(fetcher: Fetcher) -> None:
    batches = [keys(f"b{i}", 10) for i in range(QUEUE_DEPTH)]
    for batch in batches:
        queue_batch(fetcher, batch)
    first = fetcher.take(0.1)
    assert first is not None
    assert [key for key, _ in first.items] == [key for batch in batches for key in batch]
    assert first.keys == 10 * QUEUE_DEPTH
    assert fetcher.take(0) is None


def test_a_reconcile_page_is_never_joined(fetcher: Fetcher) -> None:
    page = ReconcilePass("start", 10)  # only its identity matters here
    queue_batch(fetcher, keys("a", 3))
    queue_batch(fetcher, keys("p", 3), reconcile=page)
    queue_batch(fetcher, keys("b", 3))
    first, second, third = fetcher.take(0), fetcher.take(0), fetcher.take(0)
    assert first is not None and second is not None and third is not None
    assert first.keys == 3 and second.reconcile is page and third.keys == 3


def test_behind_a_busy_writer_hot_keys_wait_and_new_keys_are_read_ahead(fetcher: Fetcher) -> None:
    hot = keys("hot", 20)
    queue_batch(fetcher, hot)  # read; the writer has not taken it yet
    fetcher.dirty.add_many([(key, None) for key in hot])  # ... and every key changed again since
    assert fetcher._read_later()  # reading them again now would be wasted

    fetcher.dirty.pop(1000)
    fetcher.dirty.add_many([(key, None) for key in keys("new", 20)])  # a stream of new records
    assert not fetcher._read_later()


def test_hot_keys_are_read_once_the_writer_took_the_queue_or_their_read_is_old(fetcher: Fetcher) -> None:
    hot = keys("hot", 20)
    queue_batch(fetcher, hot)
    fetcher.dirty.add_many([(key, None) for key in hot])
    fetcher.take(0)  # the writer took everything queued: the newer state is worth reading now
    assert not fetcher._read_later()
    queue_batch(fetcher, keys("other", 5))  # busy again, but the hot keys' read is old:
    fetcher._note_read([], time.monotonic() + 0.6)  # two periods on, it is forgotten
    fetcher._note_read([], time.monotonic() + 1.2)
    assert not fetcher._read_later()


@pytest.fixture
def long_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linger cap far longer than any test waits: a take that lingered too long would show."""
    monkeypatch.setattr(fetcher_module, "LINGER_S", 60.0)


@contextmanager
def later(delay: float, action: Callable[[], object]) -> Iterator[None]:
    """Run ``action`` in another thread ``delay`` seconds from now, as the reading loop would."""
    timer = threading.Timer(delay, action)
    timer.start()
    try:
        yield
    finally:
        timer.join()


def busy_writer(fetcher: Fetcher, seconds: float) -> None:
    """The writer takes a batch and spends ``seconds`` writing it."""
    queue_batch(fetcher, keys("earlier", 10))
    assert fetcher.take(0) is not None
    time.sleep(seconds)


def test_a_busy_writer_waits_behind_a_full_batch_for_a_stream_to_fill_its_transaction(
    fetcher: Fetcher, long_linger: None
) -> None:
    busy_writer(fetcher, 0.5)  # it may now wait up to 0.5 s
    batches = [keys(f"s{i}", 10) for i in range(QUEUE_DEPTH)]
    queue_batch(fetcher, batches[0])  # full (batch_size 10): a stream of changes

    def the_rest_arrive() -> None:
        for batch in batches[1:]:
            queue_batch(fetcher, batch)

    with later(0.05, the_rest_arrive):
        work = fetcher.take(0.1)
    assert work is not None
    assert work.keys == 10 * QUEUE_DEPTH
    assert [key for key, _ in work.items] == [key for batch in batches for key in batch]


def test_an_idle_writer_writes_a_full_batch_at_once(fetcher: Fetcher, long_linger: None) -> None:
    assert fetcher.take(0.2) is None  # nothing to write: the writer waited idle
    queue_batch(fetcher, keys("first", 10))
    with later(0.1, lambda: queue_batch(fetcher, keys("next", 10))):
        work = fetcher.take(0.1)
    assert work is not None and work.keys == 10
    assert fetcher.queued_keys() == 10  # the later batch waits for the next take


def test_a_part_batch_is_written_at_once(fetcher: Fetcher, long_linger: None) -> None:
    busy_writer(fetcher, 0.5)
    queue_batch(fetcher, keys("few", 3))  # the fetcher read what was dirty: changes are few
    with later(0.05, lambda: queue_batch(fetcher, keys("next", 10))):
        work = fetcher.take(0.1)
    assert work is not None and work.keys == 3
    assert fetcher.queued_keys() == 10


def test_a_reconcile_page_met_while_lingering_is_written_next(fetcher: Fetcher, long_linger: None) -> None:
    page = ReconcilePass("start", 10)
    busy_writer(fetcher, 0.5)
    queue_batch(fetcher, keys("a", 10))
    with later(0.05, lambda: queue_batch(fetcher, keys("p", 4), reconcile=page)):
        first = fetcher.take(0.1)
    assert first is not None and first.keys == 10 and first.reconcile is None
    assert fetcher.queued_keys() == 4  # the page still counts as queued
    second = fetcher.take(0)
    assert second is not None and second.reconcile is page
    assert fetcher.queued_keys() == 0


def test_a_draining_writer_does_not_linger(fetcher: Fetcher, long_linger: None) -> None:
    busy_writer(fetcher, 0.5)
    queue_batch(fetcher, keys("a", 10))
    queue_batch(fetcher, keys("b", 10))
    fetcher.drain()
    with later(0.05, lambda: queue_batch(fetcher, keys("c", 10))):
        work = fetcher.take(0.1)  # joins what is there, waits for nothing more
    assert work is not None and work.keys == 20


class RefusingSource:
    """Redis refusing the reconcile's first read: down, or a permission the user lacks."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.attempts = 0

    def version_now(self) -> int:
        self.attempts += 1
        raise self.error


@pytest.mark.parametrize(
    "error",
    [redis_lib.ConnectionError("Connection refused"), NoPermissionError("no permissions to run the 'time' command")],
    ids=["unreachable", "no-permission"],
)
def test_a_reconcile_whose_first_read_fails_is_retried_with_a_backoff_not_at_once(tmp_path: Path, error) -> None:
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", reconnect_max_backoff=5)
    source = RefusingSource(error)
    fetcher = Fetcher(settings, source=source, dirty=Dirty(1000))  # type: ignore[arg-type]
    fetcher.follow(ReconcilePass("start", 10))
    fetcher.start()
    try:
        time.sleep(1.0)
        assert fetcher.is_alive() and fetcher.failing
        # backoffs of 0.2, 0.4, 0.8 s..., each drawn from its half to its whole: a few tries
        assert 2 <= source.attempts <= 6, source.attempts
        # the fourth try is followed by a backoff of 0.8 s at least, which a new request (Redis
        # is back: reconcile) ends: the backoff looks every tick (0.25 s)
        wait_for(lambda: source.attempts >= 4, 3, what="a fourth try")
        asked = source.attempts
        fetcher.follow(ReconcilePass("reconnect", 10))
        wait_for(lambda: source.attempts > asked, 0.5, what="the new request tried within a tick")
    finally:
        fetcher.stop_now()
        fetcher.join(timeout=2)


def test_an_os_error_that_is_not_redis_s_stops_the_reader_instead_of_passing_for_an_outage(tmp_path: Path) -> None:
    """redis-py reports a lost connection as its own ConnectionError; a bare OSError in the
    reading path is a bug (or a file's error), and retrying it forever as "Redis is down"
    would hide it behind a daemon that looks like it waits for Redis."""
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", reconnect_max_backoff=5)
    source = RefusingSource(PermissionError(13, "Permission denied", "/var/lib/desto/desto.db"))
    fetcher = Fetcher(settings, source=source, dirty=Dirty(1000))  # type: ignore[arg-type]
    fetcher.follow(ReconcilePass("start", 10))
    with capture_logs() as logs:
        fetcher.start()
        fetcher.join(timeout=5)
    assert not fetcher.is_alive()
    assert isinstance(fetcher.error, PermissionError) and source.attempts == 1
    assert not fetcher.failing
    assert [e["event"] for e in logs] == ["fetcher.crashed"]


class GoneSource:
    """A Redis where every key read is gone; its reads can be made to fail, and each read notes
    the thread that made it. Its scan meets ``scanned`` keys, in one page."""

    def __init__(self, scanned: list[bytes] | None = None) -> None:
        self.failing: BaseException | None = None
        self.reads: list[tuple[str, list[bytes]]] = []
        self.flag_looks: list[str] = []
        self.scans = 0
        self.scanned = scanned or []
        self.now = 1_000

    def version_now(self) -> int:
        return self.now

    def scan_page(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        self.scans += 1
        return 0, list(self.scanned)

    def ensure_notifications(self) -> NotifyState:
        self.flag_looks.append(threading.current_thread().name)
        return NotifyState(ok=False, found="", set_to=None, error="CONFIG is disabled")

    def fetch(self, batch: list[bytes]) -> list[Fetched]:
        if not batch:
            return []
        if self.failing is not None:
            raise self.failing
        self.reads.append((threading.current_thread().name, list(batch)))
        self.now += 1
        return [Fetched(key, "none", None, -2, self.now, self.now) for key in batch]


class FileRows:
    """The archived sessions a sweep finds in the file."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
        rows = [(rowid, record_id) for rowid, record_id in enumerate(self.ids, 1) if rowid > after_rowid]
        return rows[:limit] if kind is Kind.SESSION else []


@contextmanager
def running(fetcher: Fetcher) -> Iterator[Fetcher]:
    fetcher.start()
    try:
        yield fetcher
    finally:
        fetcher.stop_now()
        fetcher.join(timeout=2)


def paging(source: GoneSource, ids: list[str]) -> ReconcilePass:
    """A pass whose (empty) scan is written and whose sweep's first page, sessions ``ids``
    archived and not met by the scan, waits to be read."""
    rec = ReconcilePass("start", 10)
    rec.start(source)  # type: ignore[arg-type]
    assert rec.scan_page() == [] and rec.scan_page_read()
    rec.scan_written()
    assert rec.next_sweep_page(FileRows(ids))  # type: ignore[arg-type]
    return rec


def test_a_sweep_page_is_read_by_the_fetcher_with_the_changes_met_for_its_keys(tmp_path: Path) -> None:
    """The main thread finds a sweep's keys in the file; reading them from Redis is the fetcher's
    job, so a slow or unreachable Redis never holds up the writes of live changes."""
    # a change waits up to the flush interval to be read: long here, so the page comes first
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10, flush_interval=5)
    source = GoneSource()
    fetcher = Fetcher(settings, source=source, dirty=Dirty(1000))  # type: ignore[arg-type]
    page = keys("swept", 3)
    rec = paging(source, [f"swept-{i}" for i in range(3)])
    fetcher.dirty.add(page[0], b"expired")  # its expiry was met meanwhile: it goes with the page
    fetcher.follow(rec)
    with running(fetcher):
        work = fetcher.take(2.0)
    assert work is not None and work.sweep and work.reconcile is rec and not work.scan_done
    assert rec.state is State.PAGED  # read: the main thread writes it, then looks for the next
    assert source.reads == [("archiver-fetcher", page)]
    assert dict(work.items) == {page[0]: b"expired"}  # its removal event is kept for its tombstone
    assert len(fetcher.dirty) == 0
    assert [o.key for o in work.outcomes] == page


def test_a_sweep_page_whose_read_fails_is_read_again_and_a_new_pass_drops_it(tmp_path: Path) -> None:
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10, reconnect_max_backoff=0.2)
    source = GoneSource()
    source.failing = redis_lib.ConnectionError("Connection refused")
    fetcher = Fetcher(settings, source=source, dirty=Dirty(1000))  # type: ignore[arg-type]
    page = keys("swept", 2)
    with running(fetcher):
        rec = paging(source, ["swept-0", "swept-1"])
        fetcher.follow(rec)
        wait_for(lambda: fetcher.failing, 2, what="the read to fail")
        assert fetcher.take(0.3) is None and rec.state is State.PAGING
        source.failing = None  # Redis is back: the page is read after the backoff, not lost
        work = fetcher.take(3.0)
        assert work is not None and work.sweep and [o.key for o in work.outcomes] == page

        source.failing = redis_lib.ConnectionError("Connection refused")
        fetcher.follow(paging(source, ["stale-0", "stale-1"]))
        wait_for(lambda: fetcher.failing, 2, what="the read to fail")
        source.failing = None
        fetcher.follow(ReconcilePass("reconnect", 10))  # a new pass: the page of the old one is not read again
        scan = fetcher.take(3.0)
        assert scan is not None and scan.scan_done and scan.reconcile is not None
        assert scan.reconcile.reason == "reconnect"
        assert fetcher.take(0.5) is None
    assert [batch for _, batch in source.reads] == [page]


def test_a_scan_s_last_page_whose_read_fails_is_read_again_and_ends_the_scan(tmp_path: Path) -> None:
    """SCAN answers but the page's read times out (a write pause, as in a failover): the page is
    read again after the backoff, and only the page read ends the scan. Once dropped, no
    reconcile would ever begin again on the timer."""
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10, reconnect_max_backoff=0.2)
    page = keys("live", 3)
    source = GoneSource(scanned=page)
    source.failing = redis_lib.TimeoutError("Timeout reading from 127.0.0.1:6379")
    fetcher = Fetcher(settings, source=source, dirty=Dirty(1000))  # type: ignore[arg-type]
    rec = ReconcilePass("timer", 10)
    with running(fetcher):
        fetcher.follow(rec)
        wait_for(lambda: fetcher.failing, 2, what="the page's read to fail")
        assert rec.state is State.SCANNING  # SCAN is past its last page; the page is kept
        assert fetcher.take(0.3) is None
        source.failing = None
        work = fetcher.take(3.0)
    assert work is not None and work.reconcile is rec and work.scan_done
    assert [o.key for o in work.outcomes] == page and rec.state is State.SCANNED
    assert source.scans == 1  # the page kept, not a new SCAN from the start


def test_the_timer_s_look_at_the_notification_flags_is_made_by_the_fetcher(tmp_path: Path) -> None:
    """Before a reconcile on the timer the daemon looks at Redis' notification flags again (an
    operator or a restart may have changed them): a read from Redis, made on the fetcher's thread
    and reported to the main loop, which never waits on Redis."""
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10)
    source = GoneSource()
    reported: list[tuple[str, NotifyState]] = []
    fetcher = Fetcher(
        settings,
        source=source,  # type: ignore[arg-type]
        dirty=Dirty(1000),
        notified=lambda notify: reported.append((threading.current_thread().name, notify)),
    )
    with running(fetcher):
        fetcher.follow(ReconcilePass("start", 10))
        assert fetcher.take(2.0) is not None
        fetcher.follow(ReconcilePass("timer", 10, check_notifications=True))
        work = fetcher.take(2.0)
    assert work is not None and work.reconcile is not None and work.reconcile.reason == "timer"
    assert source.flag_looks == ["archiver-fetcher"]
    assert [(thread, notify.ok) for thread, notify in reported] == [("archiver-fetcher", False)]
