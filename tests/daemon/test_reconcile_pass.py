"""The reconcile pass shared by the daemon's two threads, transition by transition (its table is
in archiver/daemon/reconcile_pass.py), failed steps included. No Redis and no file: stand-ins."""

from __future__ import annotations

import pytest
import redis as redis_lib

from archiver.daemon.reconcile_pass import ReconcilePass, State, StateError
from archiver.keys import record_key
from archiver.kinds import Kind

pytestmark = pytest.mark.unit


class Redis:
    """Redis' clock and a SCAN over ``pages`` (one list of keys per SCAN call); each can fail."""

    def __init__(self, *pages: list[bytes]) -> None:
        self.pages = list(pages)
        self.calls = 0
        self.failing: BaseException | None = None

    def version_now(self) -> int:
        if self.failing is not None:
            raise self.failing
        return 1_000

    def scan_page(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        if self.failing is not None:
            raise self.failing
        self.calls += 1
        return (0 if cursor + 1 >= len(self.pages) else cursor + 1), self.pages[cursor]


class File:
    """Archived sessions the scan did not meet."""

    def __init__(self, *ids: str) -> None:
        self.ids = list(ids)

    def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
        rows = [(rowid, record_id) for rowid, record_id in enumerate(self.ids, 1) if rowid > after_rowid]
        return rows[:limit] if kind is Kind.SESSION else []


UNREACHABLE = redis_lib.TimeoutError("Timeout reading from 127.0.0.1:6379")
A, B = [b"desto:session:a"], [b"desto:session:b"]


def started(redis: Redis, page: int = 10) -> ReconcilePass:
    rec = ReconcilePass("start", page)
    rec.start(redis)  # type: ignore[arg-type]
    return rec


def test_a_pass_waits_requested_until_redis_clock_is_read() -> None:
    redis = Redis(A)
    redis.failing = UNREACHABLE
    rec = ReconcilePass("timer", 10, check_notifications=True)
    assert rec.state is State.REQUESTED and rec.check_notifications
    with pytest.raises(redis_lib.TimeoutError):
        rec.start(redis)  # type: ignore[arg-type]
    assert rec.state is State.REQUESTED  # tried again after the fetcher's backoff
    redis.failing = None
    rec.start(redis)  # type: ignore[arg-type]
    assert rec.state is State.SCANNING and rec.rec is not None and rec.rec.started_us == 1_000


def test_the_scan_goes_page_by_page_and_its_last_page_read_ends_it() -> None:
    redis = Redis(A, [], B)
    rec = started(redis)
    assert rec.scan_page() == A and not rec.scan_ends
    assert rec.scan_page() == A  # asked again before it was read: the same page
    assert not rec.scan_page_read() and rec.state is State.SCANNING
    assert rec.scan_page() == B and rec.scan_ends  # an empty page of SCAN is skipped
    assert rec.scan_page_read() and rec.state is State.SCANNED
    assert redis.calls == 3


def test_a_page_whose_read_failed_is_the_page_read_again() -> None:
    """The failed read is the fetcher's: it does not call scan_page_read, and asks for the page
    again after its backoff. SCAN has moved past the last page; the page's keys are kept."""
    redis = Redis(A)
    rec = started(redis)
    assert rec.scan_page() == A and rec.scan_ends
    # ... the read of A times out ...
    assert rec.state is State.SCANNING
    assert rec.scan_page() == A and redis.calls == 1
    assert rec.scan_page_read() and rec.state is State.SCANNED


def test_a_failed_scan_call_moves_nothing() -> None:
    redis = Redis(A, B)
    rec = started(redis)
    assert rec.scan_page() == A
    rec.scan_page_read()
    redis.failing = UNREACHABLE
    with pytest.raises(redis_lib.TimeoutError):
        rec.scan_page()
    redis.failing = None
    assert rec.scan_page() == B and rec.scan_ends


def test_an_empty_scan_still_hands_over_a_last_page() -> None:
    rec = started(Redis([]))
    assert rec.scan_page() == [] and rec.scan_ends
    assert rec.scan_page_read() and rec.state is State.SCANNED


def test_the_sweep_goes_page_by_page_each_read_then_written_then_done() -> None:
    rec = started(Redis([]), page=2)
    rec.scan_page()
    rec.scan_page_read()
    rec.scan_written()
    file = File("s1", "s2", "s3")
    pages = []
    while rec.sweep_waits:
        if not rec.next_sweep_page(file):  # type: ignore[arg-type]
            break
        assert rec.state is State.PAGING and not rec.sweep_waits
        keys = rec.sweep_page()
        assert keys is not None
        pages.append(keys)
        rec.sweep_page_read()
        assert rec.state is State.PAGED and rec.sweep_page() is None
        rec.sweep_page_written()
    assert pages == [[record_key(Kind.SESSION, "s1"), record_key(Kind.SESSION, "s2")], [record_key(Kind.SESSION, "s3")]]
    assert rec.state is State.SWEEPING  # no page left: the main thread writes the summary, then
    rec.finished()
    assert rec.done


def test_a_sweep_page_whose_read_failed_keeps_its_keys() -> None:
    rec = started(Redis([]))
    rec.scan_page()
    rec.scan_page_read()
    rec.scan_written()
    assert rec.next_sweep_page(File("s1"))  # type: ignore[arg-type]
    # ... its read fails: the fetcher asks again after its backoff ...
    assert rec.sweep_page() == [record_key(Kind.SESSION, "s1")] and rec.state is State.PAGING


@pytest.mark.parametrize(
    "step",
    [
        "scan_written",  # scanned -> sweeping, from requested
        "sweep_page_read",
        "sweep_page_written",
        "finished",
        "scan_page",
    ],
)
def test_a_transition_the_table_does_not_have_is_refused(step: str) -> None:
    rec = ReconcilePass("start", 10)
    with pytest.raises(StateError):
        getattr(rec, step)()
    assert rec.state is State.REQUESTED


def test_a_pass_is_started_once() -> None:
    redis = Redis(A)
    rec = started(redis)
    with pytest.raises(StateError):
        rec.start(redis)  # type: ignore[arg-type]
    assert rec.state is State.SCANNING


def test_a_sweep_page_the_file_could_not_give_moves_nothing() -> None:
    """The main thread's look in the file fails (the file busy, or gone): the pass stays sweeping,
    and the next look finds the same page."""
    import sqlite3

    rec = started(Redis([]))
    rec.scan_page()
    rec.scan_page_read()
    rec.scan_written()

    class Failing(File):
        def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
            raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        rec.next_sweep_page(Failing("s1"))  # type: ignore[arg-type]
    assert rec.state is State.SWEEPING and rec.sweep_page() is None
    assert rec.next_sweep_page(File("s1"))  # type: ignore[arg-type]
    assert rec.sweep_page() == [record_key(Kind.SESSION, "s1")] and rec.state is State.PAGING
