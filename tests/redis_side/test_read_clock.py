"""The version each read gets (read_clock.ReadClock): Redis' clock while it goes forward, and a clock
that keeps going forward when Redis' goes back, so no later change is taken for an older one.

No Redis here: the clock is given Redis' times as the reads would bring them. The daemon's and the
backfill's behaviour across such a step, with a real Redis and a real file, is in test_faults.py.
"""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from archiver.redis_side import read_clock as read_clock_module
from archiver.redis_side.read_clock import ReadClock

pytestmark = pytest.mark.unit

HOUR = 3_600_000_000
T0 = 1_795_000_000_000_000


def in_thread(clock: ReadClock, *times: int) -> list[int]:
    """The versions of reads made at ``times``, one after another, by a thread of their own."""
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.extend(clock.version(t) for t in times))
    thread.start()
    thread.join()
    return out


def test_while_redis_clock_goes_forward_a_version_is_the_time_of_the_read() -> None:
    clock = ReadClock()
    with capture_logs() as logs:
        assert [clock.version(t) for t in (T0, T0, T0 + 5, T0 + HOUR)] == [T0, T0, T0 + 5, T0 + HOUR]
    assert clock.offset_us == 0
    assert logs == []


def test_a_clock_set_back_keeps_the_versions_going_forward_from_the_newest() -> None:
    clock = ReadClock()
    before = [clock.version(T0 + HOUR), clock.version(T0 + HOUR + 10)]
    with capture_logs() as logs:
        after = [clock.version(T0 + 20), clock.version(T0 + 30), clock.version(T0 + 30)]
    assert before == [T0 + HOUR, T0 + HOUR + 10]
    # the first read after the step comes right after the newest version, and the spacing of
    # the later reads is Redis' own
    assert after == [T0 + HOUR + 11, T0 + HOUR + 21, T0 + HOUR + 21]
    assert clock.offset_us == HOUR - 9
    [warning] = logs
    assert warning["event"] == "redis.clock_behind" and warning["log_level"] == "warning"
    assert warning["behind_s"] == (HOUR - 9) / 1e6
    assert warning["versions_ahead_s"] == (HOUR - 9) / 1e6


def test_each_step_back_adds_to_how_far_the_versions_run_ahead() -> None:
    clock = ReadClock()
    clock.version(T0 + 2 * HOUR)
    first = clock.version(T0 + HOUR)  # back an hour
    second = clock.version(T0)  # and another
    assert first == T0 + 2 * HOUR + 1 and second == T0 + 2 * HOUR + 2
    assert clock.offset_us == 2 * HOUR + 2
    assert clock.version(T0 + 1) == T0 + 2 * HOUR + 3


def test_reads_of_two_threads_returning_out_of_order_are_not_taken_for_a_step() -> None:
    """The fetcher and the main thread (a reconcile's sweep) read in turn: a read that started
    first may come back last. Only a thread's own earlier read tells that Redis' clock went back."""
    clock = ReadClock()
    assert clock.version(T0 + 1_000) == T0 + 1_000
    with capture_logs() as logs:
        assert in_thread(clock, T0 + 400, T0 + 1_500) == [T0 + 400, T0 + 1_500]
    assert clock.offset_us == 0 and logs == []


def test_a_step_seen_by_two_threads_moves_the_versions_once() -> None:
    clock = ReadClock()
    in_thread_versions = []

    def other() -> None:
        in_thread_versions.append(clock.version(T0 + HOUR))  # before the step
        done_before.set()
        stepped.wait()
        in_thread_versions.append(clock.version(T0 + 2_000))  # after it, later than this thread's read

    done_before, stepped = threading.Event(), threading.Event()
    thread = threading.Thread(target=other)
    thread.start()
    done_before.wait()
    clock.version(T0 + HOUR + 50)
    with capture_logs() as logs:
        assert clock.version(T0 + 1_000) == T0 + HOUR + 51
        stepped.set()
        thread.join()
    assert in_thread_versions == [T0 + HOUR, T0 + HOUR + 1_051]
    assert clock.offset_us == HOUR + 51 - 1_000
    assert [entry["event"] for entry in logs] == ["redis.clock_behind"]


def test_the_first_read_is_checked_against_the_newest_version_in_the_file() -> None:
    """A restart after the clock was set back: no earlier read of this process to compare with,
    but the file holds reads made by the faster clock."""
    behind = ReadClock()
    behind.note_file(T0 + HOUR)
    with capture_logs() as logs:
        assert behind.version(T0) == T0 + HOUR + 1
    assert behind.version(T0 + 7) == T0 + HOUR + 8
    assert [entry["behind_s"] for entry in logs] == [(HOUR + 1) / 1e6]

    on_time = ReadClock()
    on_time.note_file(T0 - 1)
    on_time.note_file(None)  # a file with no read yet changes nothing
    with capture_logs() as logs:
        assert on_time.version(T0) == T0
    assert on_time.offset_us == 0 and logs == []


def test_a_file_is_checked_by_the_first_read_after_it_is_noted_only() -> None:
    """A file opened again (a restore moved into place) is checked once, by the next read."""
    clock = ReadClock()
    assert clock.version(T0) == T0
    clock.note_file(T0 - 5)
    assert clock.version(T0 + 1) == T0 + 1
    clock.note_file(T0 + HOUR)
    assert clock.version(T0 + 2) == T0 + HOUR + 1
    assert clock.version(T0 + 3) == T0 + HOUR + 2


def test_small_steps_back_are_logged_once_a_minute_and_big_ones_at_once(monkeypatch) -> None:
    """Two servers a few milliseconds apart, read in turn (a failover back and forth, a proxy),
    step back at every other read: each step is handled, and the log is not flooded."""
    now = [1_000.0]
    monkeypatch.setattr(read_clock_module.time, "monotonic", lambda: now[0])
    clock = ReadClock()
    versions = []
    with capture_logs() as logs:
        for i in range(0, 100, 2):
            versions += [clock.version(T0 + i * 1_000), clock.version(T0 + i * 1_000 - 5_000)]
        assert [entry["steps"] for entry in logs] == [1]
        now[0] += 30
        clock.version(T0 - HOUR)  # a second's step or more is told at once, with the small ones before it
        now[0] += 60
        clock.version(T0 - HOUR - 5_000)
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert [entry["steps"] for entry in logs] == [1, 50, 1]
    assert logs[1]["behind_s"] > 3600
