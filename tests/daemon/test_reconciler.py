"""When the daemon reconciles, how a pass's sweep goes page by page, and what a busy file does to
the end of a pass. No Redis and no file: the reconcile's source and the store are stand-ins."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from archiver.archive.store import BatchResult
from archiver.config import load_settings
from archiver.daemon.fetcher import Work
from archiver.daemon.inbox import Inbox
from archiver.daemon.reconcile_pass import ReconcilePass, State
from archiver.daemon.reconciler import Reconciles
from archiver.daemon.schedule import Deadline, Schedule
from archiver.keys import record_key
from archiver.kinds import Kind
from archiver.redis_side.source import NotifyState

pytestmark = pytest.mark.unit

ON = NotifyState(ok=True, found="KEA", set_to=None, error=None)
OFF = NotifyState(ok=False, found="", set_to=None, error="CONFIG is disabled")


class Clock:
    """Redis' clock, and a SCAN that meets nothing."""

    def version_now(self) -> int:
        return 1_000

    def scan_page(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        return 0, []


class ArchivedRows:
    """The archived rows a sweep looks for, and a file that can be busy when the pass ends."""

    def __init__(self, sessions: int) -> None:
        self.rows = {Kind.SESSION: [(rowid, f"s{rowid}") for rowid in range(1, sessions + 1)]}
        self.busy = 0  # the next set_state calls that find the file busy
        self.state: dict[str, str] = {}

    def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
        return [row for row in self.rows.get(kind, []) if row[0] > after_rowid][:limit]

    def set_state(self, values: dict[str, str], now_us: int) -> None:
        if self.busy:
            self.busy -= 1
            raise sqlite3.OperationalError("database is locked")
        self.state.update(values)


def reconciles(tmp_path: Path, **settings: float) -> Reconciles:
    values = {"sqlite_db_path": tmp_path / "desto.db", "reconcile_interval": 300.0, **settings}
    return Reconciles(load_settings(**values), Schedule())


def scanned(plan: Reconciles, reason: str = "start") -> ReconcilePass:
    """A pass begun, its scan read by the fetcher (nothing met) and written."""
    rec = plan.begin(reason)
    rec.start(Clock())  # type: ignore[arg-type]
    assert rec.scan_page() == [] and rec.scan_page_read()
    plan.written(Work([], [], 0.0, rec, scan_done=True))
    assert rec.state is State.SWEEPING
    return rec


def read_and_written(plan: Reconciles, rec: ReconcilePass) -> None:
    """The fetcher reads the sweep's page, the main thread writes it."""
    assert rec.sweep_page() is not None
    rec.sweep_page_read()
    plan.written(Work([], [], 0.0, rec, sweep=True))


def test_a_reconcile_is_wanted_for_a_reason_and_on_the_timer_once_none_runs(tmp_path: Path) -> None:
    plan = reconciles(tmp_path)
    assert plan.due(time.monotonic()) is None  # the timer starts with the first pass's end
    plan.want("start")
    plan.want("overflow")  # the first reason stands: one pass answers both
    assert plan.due(time.monotonic()) == "start"
    plan.begin("start")
    assert plan.wanted is None and plan.running
    plan.schedule.set_now(Deadline.RECONCILE)
    assert plan.due(time.monotonic()) is None  # a pass runs: the timer waits for it
    plan.want("reconnect")
    assert plan.due(time.monotonic()) == "reconnect"  # a reason replaces the pass under way


def test_a_sweep_goes_page_by_page_each_page_once_written(tmp_path: Path) -> None:
    plan, rows = reconciles(tmp_path, batch_size=10), ArchivedRows(sessions=25)
    plan.want("start")
    rec = scanned(plan)
    pages = []
    while plan.sweep_waits():
        if not plan.next_sweep_page(rows):  # type: ignore[arg-type]
            break
        assert not plan.sweep_waits()  # one page at a time
        keys = rec.sweep_page()
        assert keys is not None
        pages.append(keys)
        read_and_written(plan, rec)
    assert [len(keys) for keys in pages] == [10, 10, 5]
    assert pages[0][0] == record_key(Kind.SESSION, "s1")
    assert plan.done == 1 and not plan.running and rec.done
    assert json.loads(rows.state["last_reconcile"])["reason"] == "start"


def test_a_page_of_a_replaced_pass_does_not_move_the_new_one(tmp_path: Path) -> None:
    plan, rows = reconciles(tmp_path), ArchivedRows(sessions=25)
    old = scanned(plan)
    assert plan.next_sweep_page(rows)  # type: ignore[arg-type]
    old.sweep_page_read()  # read by the fetcher, not yet written
    plan.want("reconnect")
    new = scanned(plan, "reconnect")  # the old pass is dropped
    assert plan.next_sweep_page(rows)  # type: ignore[arg-type]
    plan.written(Work([], [], 0.0, old, sweep=True))  # the old pass's page, written late
    assert old.state is State.PAGED and new.state is State.PAGING
    assert not plan.sweep_waits()  # the new pass's own page is still out


def test_a_busy_file_at_the_end_of_a_pass_finishes_it_at_the_next_try(tmp_path: Path) -> None:
    """The end of a pass writes its summary into the file; a busy file then must not leave the
    pass half finished (counted, timer set, never reported, the daemon never ready)."""
    plan, rows = reconciles(tmp_path), ArchivedRows(sessions=0)
    plan.notified(ON)
    scanned(plan)
    rows.busy = 1
    with pytest.raises(sqlite3.OperationalError):
        plan.next_sweep_page(rows)  # type: ignore[arg-type]
    assert plan.done == 0 and plan.running and plan.sweep_waits()
    assert plan.schedule.at(Deadline.RECONCILE) == math.inf
    with capture_logs() as logs:
        assert not plan.next_sweep_page(rows)  # type: ignore[arg-type]
    assert plan.done == 1 and not plan.running
    assert [e["event"] for e in logs] == ["reconcile.done"] and logs[0]["next_in_s"] == 300
    assert "last_reconcile_at" in rows.state


def test_without_notifications_the_timer_runs_at_the_fallback_interval_and_warns_once(tmp_path: Path) -> None:
    plan, rows = reconciles(tmp_path, fallback_reconcile_interval=10), ArchivedRows(sessions=0)
    with capture_logs() as logs:
        plan.notified(OFF)
        plan.notified(OFF)  # the timer's next look finds them still off: no second warning
        scanned(plan)
        plan.next_sweep_page(rows)  # type: ignore[arg-type]
        plan.notified(ON)
    events = [e["event"] for e in logs]
    assert events == ["notifications.unavailable", "reconcile.done", "notifications.available"]
    assert logs[1]["next_in_s"] == 10


# ─── the count of changes the notifications missed ───────────────────────────────────────────────


def measuring(tmp_path: Path, limit: int = 1000) -> tuple[Reconciles, Inbox]:
    inbox = Inbox(limit)
    return Reconciles(load_settings(sqlite_db_path=tmp_path / "desto.db"), Schedule(), inbox), inbox


def scan_page_written(plan: Reconciles, rec: ReconcilePass, changed: list[str], taken: list[str] = ()) -> None:
    """The pass's scan, one page: ``changed`` session records written, ``taken`` of them dirty at its read."""
    rec.start(Clock())  # type: ignore[arg-type]
    rec.scan_page()
    rec.scan_page_read()
    items = [(record_key(Kind.SESSION, record_id), None) for record_id in taken]
    result = BatchResult(changed=[(Kind.SESSION, record_id) for record_id in changed])
    plan.written(Work(items, [], 0.0, rec, scan_done=True), result)


def test_a_reconcile_counts_the_changes_no_notification_named_once_the_barrier_is_reached(tmp_path: Path) -> None:
    plan, inbox = measuring(tmp_path)
    rows = ArchivedRows(sessions=0)
    plan.notified(ON)
    rec = plan.begin("timer")
    # s1 was dirty when the page was read; s2's notification comes after the read; s3 and s4 have none
    scan_page_written(plan, rec, ["s1", "s2", "s3", "s4"], taken=["s1"])
    inbox.keys_changed([(record_key(Kind.SESSION, "s2"), b"hset")])
    assert plan.sweep_waits()
    assert not plan.next_sweep_page(rows)  # type: ignore[arg-type]
    assert plan.running and not plan.sweep_waits()  # the pass waits for the barrier, without spinning
    assert inbox.barrier_wanted() == 1
    inbox.keys_changed([(record_key(Kind.SESSION, "s3"), b"hset")])  # still before the barrier: named
    inbox.barrier_reached(1)
    assert plan.sweep_waits()
    with capture_logs() as logs:
        assert not plan.next_sweep_page(rows)  # type: ignore[arg-type]
    assert not plan.running and plan.done == 1
    summary = json.loads(rows.state["last_reconcile"])
    assert summary["missed_changes"] == {"session": 1, "job": 0, "favorite": 0, "atjob": 0}
    assert plan.missed["session"] == 1 and plan.missed_streak == 1
    assert [e["event"] for e in logs] == ["notifications.missed_changes", "reconcile.done"]
    assert inbox.watched() is None  # the watch ended with the pass


def test_only_timer_and_reconnect_reconciles_with_notifications_on_measure(tmp_path: Path) -> None:
    plan, inbox = measuring(tmp_path)
    rows = ArchivedRows(sessions=0)
    for reason, notify, measured in [
        ("start", ON, False),
        ("overflow", ON, False),
        ("reopened", ON, False),
        ("timer", OFF, False),
        ("timer", ON, True),
        ("reconnect", ON, True),
    ]:
        plan.notified(notify)
        rec = plan.begin(reason)
        scan_page_written(plan, rec, ["s1"])
        if measured:
            assert not plan.next_sweep_page(rows)  # type: ignore[arg-type]
            inbox.barrier_reached(inbox.barrier_wanted())
        assert not plan.next_sweep_page(rows)  # type: ignore[arg-type]
        assert not plan.running
        missed = json.loads(rows.state["last_reconcile"])["missed_changes"]
        assert (missed is not None and missed["session"] == 1) is measured, (reason, notify)
    assert plan.missed["session"] == 2 and plan.missed_streak == 2


def test_a_reconcile_that_misses_nothing_ends_the_streak_and_too_many_notified_keys_measure_nothing(
    tmp_path: Path,
) -> None:
    plan, inbox = measuring(tmp_path, limit=2)
    rows = ArchivedRows(sessions=0)
    plan.notified(ON)

    def one(changed: list[str], notified: list[str]) -> dict[str, int] | None:
        rec = plan.begin("timer")
        scan_page_written(plan, rec, changed)
        inbox.keys_changed([(record_key(Kind.SESSION, i), b"hset") for i in notified])
        plan.next_sweep_page(rows)  # type: ignore[arg-type]
        inbox.barrier_reached(inbox.barrier_wanted())
        plan.next_sweep_page(rows)  # type: ignore[arg-type]
        return json.loads(rows.state["last_reconcile"])["missed_changes"]

    assert one(["a"], [])["session"] == 1 and plan.missed_streak == 1
    assert one(["a"], ["a"])["session"] == 0 and plan.missed_streak == 0
    assert one(["a"], ["x", "y", "z"]) is None  # more than ARCHIVER_MAX_DIRTY keys named: not measured
    assert plan.missed_streak == 0 and plan.missed["session"] == 1
