"""The reliability suite: a desto-like workload, a fault injected into it, then the promise checked:
the archive equals Redis for every live record and no record ever written is missing.

Each scenario adds a row to the reliability report (``reliability`` fixture, see conftest.py), from
which ``scripts/reliability_table.py`` writes the "Reliability" page's table (docs/reliability.md). The sizes below are
small by default, for CI; ``RELIABILITY_FULL=1`` runs the full ones.

How the faults are made:

- archiver crash: SIGKILL at random moments, and at moments the daemon holds SQLite's write lock
  (seen from outside with ``fcntl(F_GETLK)`` on the WAL index, which names the holder's pid), so
  the kill lands inside a write transaction;
- slow subscriber: Redis' pub/sub output buffer limit set to 64 kB hard, and the burst written in
  MULTI/EXEC blocks of 1,000 changes, whose notifications Redis queues at once;
- disk full: the daemon's own file-size limit (``RLIMIT_FSIZE``, set from outside with
  ``prlimit``) lowered to zero bytes, so every write to the archive fails (SQLite reports an I/O
  error), then raised again; the daemon's log goes through a pipe, as under a service manager or a
  container runtime, or to a file on the same full disk;
- slow disk: another process shares the file and holds its write lock 40 ms of every 50 ms, so
  the daemon's transactions wait for the lock most of the time.
"""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.fault_helpers import (
    DESTO_TTL,
    FULL_SIZE,
    DaemonProcess,
    heartbeat,
    settle,
    start_ready,
)
from tests.helpers import (
    integrity,
    job_hash,
    lock_holder,
    log_events,
    now_iso,
    session_hash,
    wait_for,
    write_lock_holder,
)
from tests.procfs import vm_hwm_kb
from tests.redis_server import RedisServer

KILLS = 20
PRELOAD = 10_000 if FULL_SIZE else 2_000  # records in Redis before the first start: a long first reconcile
BURST = 100_000 if FULL_SIZE else 20_000  # changes in a burst
SLOW_DISK_BURST = 100_000 if FULL_SIZE else 6_000  # changes in a burst on a slow disk
# The keys a hot burst changes again and again. A hot key is read about once per commit of the
# writer (one per 50 ms on the slow disk), so the reads coalesced depend on how long the burst
# lasts: 30 changes per key leave room for a machine slow enough to stretch it to half a second.
HOT_KEYS = 1_000 if FULL_SIZE else 200
MEMORY_BOUND_MB = 200  # the daemon's peak resident memory (VmHWM) through a burst

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900 if FULL_SIZE else 120)]


# ─── workloads ───────────────────────────────────────────────────────────────────────────────────

_STATUSES = ("running", "finished", "failed")


def record_keys(count: int) -> list[str]:
    """``count`` new record keys, sessions and jobs alternating."""
    return [f"desto:{'session' if i % 2 == 0 else 'job'}:{uuid.uuid4()}" for i in range(count)]


def burst(client, keys: list[str], changes: int, *, transaction: bool = False, block: int = 1_000) -> None:
    """``changes`` HSETs spread over ``keys`` in pipelines of ``block``: the first change of each key
    creates it whole, with desto's 7-day TTL; the others change its status and times."""
    pipe = client.pipeline(transaction=transaction)
    for i in range(changes):
        key = keys[i % len(keys)]
        kind, record_id = key.split(":")[1:]
        if i < len(keys):
            record = session_hash(record_id) if kind == "session" else job_hash(record_id)
            pipe.hset(key, mapping=record)
            pipe.expire(key, DESTO_TTL)
        else:
            at = now_iso()
            time_field = "last_heartbeat" if kind == "session" else "end_time"
            pipe.hset(key, mapping={"status": _STATUSES[i % len(_STATUSES)], time_field: at})
        if (i + 1) % block == 0:
            pipe.execute()
    pipe.execute()


def kill_inside_write_transaction(daemon: DaemonProcess, db_path: Path, timeout: float) -> None:
    """SIGKILL the daemon the moment it is seen holding the write lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if write_lock_holder(db_path) == daemon.pid:
            daemon.signal(signal.SIGKILL)
            return
        if daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({daemon.proc.returncode}) before it wrote")
        time.sleep(0.0002)
    raise AssertionError(f"the daemon never held the write lock within {timeout} s")


# ─── 1. the archiver killed at 20 points of a busy workload ──────────────────────────────────────


def test_sigkill_at_twenty_points_of_a_busy_workload_loses_nothing(
    redis_server, redis, db_path, daemons, writers, reliability
):
    report = reliability(
        "archiver killed, 20 times",
        f"SIGKILL at {KILLS // 2} random moments and {KILLS // 2} moments inside a write transaction, "
        f"restarted after each; desto-like writer plus {PRELOAD:,} records to reconcile",
    )
    preloaded = record_keys(PRELOAD)
    burst(redis, preloaded, PRELOAD)
    writer = writers(redis_server, seed=20, pause=0.001)
    rng = random.Random(20)
    env = {"ARCHIVER_BATCH_SIZE": "2000"}  # large transactions: a kill often lands inside one
    daemon = daemons(redis_server, db_path, **env)
    inside = 0
    for n in range(KILLS):
        if n % 2:
            kill_inside_write_transaction(daemon, db_path, timeout=15)
            inside += 1
        else:
            time.sleep(rng.uniform(0.05, 1.0))  # start-up, the first reconcile, or streaming
            assert daemon.proc.poll() is None, f"the daemon exited ({daemon.proc.returncode}) on its own"
            daemon.signal(signal.SIGKILL)
        assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
        assert integrity(db_path) == "ok"
        daemon = daemons(redis_server, db_path, **env)
    daemon.wait_reconcile("start", timeout=60)
    written = writer.finish()
    report.measured.update(kills=KILLS, inside_a_write_transaction=inside)
    settle(report, redis, db_path, written | set(preloaded), timeout=60)
    assert daemon.proc.poll() is None
    assert not daemon.events("record.quarantined")
    assert integrity(db_path) == "ok"


# ─── 2. the pub/sub connection dropped by Redis: a slow subscriber ───────────────────────────────


@pytest.fixture
def small_buffer_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that drops a subscriber as soon as 64 kB of its messages wait unsent."""
    server = RedisServer(tmp_path / "small-buffer-redis").start()
    client = server.client()
    client.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
    client.close()
    yield server
    server.stop()


def test_subscriber_dropped_for_its_output_buffer_is_detected_and_reconciled(
    small_buffer_redis, db_path, daemons, reliability
):
    keys = record_keys(BURST // 5)
    report = reliability(
        "pub/sub dropped by Redis (slow subscriber)",
        f'client-output-buffer-limit "pubsub 64kb 32kb 1"; burst of {BURST:,} changes to {len(keys):,} keys '
        "in MULTI/EXEC blocks of 1,000",
    )
    client = small_buffer_redis.client()
    try:
        daemon = start_ready(daemons, small_buffer_redis, db_path)
        burst(client, keys, BURST, transaction=True)
        dropped = daemon.wait_log("redis.disconnected", timeout=15)
        closed = [
            line
            for line in small_buffer_redis.logfile.read_text().splitlines()
            if "name=desto-archiver-events" in line and "output buffer limits" in line
        ]
        assert closed, "Redis did not drop the archiver's subscriber for its output buffer"

        def reconciled_after_the_last_drop() -> bool:
            events = [e["event"] if e["event"] != "reconcile.done" else e["reason"] for e in log_events(daemon.log)]
            if events.count("redis.disconnected") != events.count("redis.reconnected"):
                return False  # still disconnected
            last = len(events) - 1 - events[::-1].index("redis.reconnected")
            return "reconnect" in events[last:]

        wait_for(reconciled_after_the_last_drop, 60, what="a reconcile after the last reconnection")
        report.measured.update(drops=len(daemon.events("redis.disconnected")), first_error=dropped[0]["error"])
        settle(report, client, db_path, keys, timeout=60)
        assert daemon.proc.poll() is None
    finally:
        client.close()


# ─── 3. disk full ────────────────────────────────────────────────────────────────────────────────


@contextmanager
def file_size_limit(pid: int, limit: int) -> Iterator[None]:
    """Lower ``pid``'s RLIMIT_FSIZE (soft) to ``limit`` bytes; raise it back on the way out."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        with suppress(ProcessLookupError):  # the daemon died meanwhile: the test says so
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


@pytest.mark.parametrize("log_to", ["pipe", "file-on-the-full-disk"])
def test_disk_full_is_logged_retried_and_recovered(log_to, redis_server, redis, db_path, daemons, writers, reliability):
    """With its log collected through a pipe (a service manager, a container runtime), the daemon
    logs the failure; with its log a file on the full disk it cannot, and must still survive."""
    full_for = 3.0
    piped = log_to == "pipe"
    report = reliability(
        "disk full" + ("" if piped else ", log file on the same disk"),
        f"the daemon's RLIMIT_FSIZE lowered to 0 bytes for {full_for:g} s under a desto-like writer, then raised; "
        + ("its stderr is a pipe" if piped else "its stderr is a file, which it cannot write either"),
    )
    daemon = start_ready(daemons, redis_server, db_path, piped=piped)
    writer = writers(redis_server, seed=3, pause=0.002)
    writer.wait_steps(200)

    def alive() -> None:
        if daemon.proc.poll() is not None:
            report.measured["daemon_exit_status"] = daemon.proc.returncode
            raise AssertionError(f"the daemon died while the disk was full (exit status {daemon.proc.returncode})")

    with file_size_limit(daemon.pid, 0):
        full_from = time.monotonic()
        if piped:
            failed = daemon.wait_log("store.write_failed", timeout=10)[0]
            assert failed["error"], failed
            report.measured["error"] = failed["error"]
        during = writer.steps
        while time.monotonic() - full_from < full_for:
            alive()
            time.sleep(0.1)
        assert writer.steps > during, "nothing was written while the disk was full"
        alive()
    recovered = daemon.wait_log("archiver.recovered", timeout=15)[0]
    assert recovered["after"] == "sqlite", recovered
    assert recovered["failures"] >= 2, recovered  # it kept retrying while the disk was full
    report.measured["failures_before_recovery"] = recovered["failures"]
    writer.wait_steps(100)
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=30)
    alive()
    assert heartbeat(db_path)["failing"] is None


# ─── 4. a burst on a slow disk ───────────────────────────────────────────────────────────────────


@contextmanager
def slow_disk(db_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding the archive's write lock 40 ms of every 50 ms."""
    with lock_holder(db_path, hold_s=0.040, gap_s=0.010) as holder:
        yield holder


@pytest.mark.parametrize("spread", ["hot-keys", "one-key-per-change"])
def test_burst_on_a_slow_disk_keeps_memory_bounded_and_loses_nothing(
    spread, redis_server, redis, db_path, daemons, reliability
):
    keys = record_keys(HOT_KEYS if spread == "hot-keys" else SLOW_DISK_BURST)
    report = reliability(
        f"burst of {SLOW_DISK_BURST:,} changes to {len(keys):,} keys, slow disk",
        f"another process holds the file's write lock 40 ms of every 50 ms; peak RSS bound {MEMORY_BOUND_MB} MB",
    )
    daemon = start_ready(daemons, redis_server, db_path)
    with slow_disk(db_path):
        started = time.monotonic()
        burst(redis, keys, SLOW_DISK_BURST)
        settle(report, redis, db_path, keys, timeout=600 if FULL_SIZE else 60)
        caught_up = time.monotonic() - started
    peak = vm_hwm_kb(daemon.pid) / 1024
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=15) == 0
    stopped = daemon.events("archiver.stopped")[0]
    report.measured.update(
        peak_RSS_MB=round(peak),
        seconds_to_catch_up=round(caught_up, 1),
        events=stopped["events"],
        keys_read=stopped["keys_read"],
        dirty_set_overflows=len(daemon.events("events.overflow")),
    )
    assert peak < MEMORY_BOUND_MB, f"the daemon's peak RSS was {peak:.0f} MB"
    if spread == "hot-keys":  # the changes were coalesced: far fewer reads than changes
        assert stopped["keys_read"] < SLOW_DISK_BURST / 2, stopped
