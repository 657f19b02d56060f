"""Fault injection: the archive stays complete, and equal to Redis, through crashes and restarts of
the archiver, restarts and freezes of Redis, dropped connections, a locked file, the file removed
or replaced under the daemon, Redis' clock set back, and key expiry.

Redis' clock cannot be set back from here (redis-server does not start under libfaketime), so that
scenario moves the file instead: every read it holds an hour ahead, as a clock that ran an hour
fast leaves it, before the daemon starts again against Redis at the right time.

Every scenario ends with the same check: each desto session, job and favorite hash in Redis has an
archived row that desto's own readers turn into the same object desto's ``from_dict`` makes of the
hash, and every record ever written is in the archive (tombstoned when its key is gone). Each
scenario also adds a row to the reliability report (the "Reliability" page's table).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families

from archiver.archive.backup import backup
from archiver.archive.store import DAMAGED_ADVICE
from tests.fault_helpers import (
    KEYSPACE_PATTERN,
    archived,
    archived_keys,
    assert_archive_equals_redis,
    desto_view,
    entity_of,
    heartbeat,
    notify_flags,
    pubsub_clients,
    settle,
    start_ready,
    utc,
    write_favorite,
    write_job,
    write_session,
)
from tests.helpers import (
    REPO,
    daemon_env,
    daemon_thread,
    damage_pages,
    integrity,
    log_events,
    move_versions_ahead,
    now_iso,
    query,
    settings_for,
    wait_for,
)
from tests.redis_server import free_port

# ─── 1. the archiver killed and restarted under load ─────────────────────────────────────────────


@pytest.mark.slow
def test_sigkill_and_restart_under_load_loses_nothing(redis_server, redis, db_path, daemons, writers, reliability):
    report = reliability("archiver killed under load", "SIGKILL x3 mid-stream, restarted after each")
    writer = writers(redis_server, seed=1)
    daemon = start_ready(daemons, redis_server, db_path)
    for _ in range(3):
        writer.wait_steps(150)  # mid-stream
        daemon.signal(signal.SIGKILL)
        assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
        at_kill = archived_keys(db_path)
        writer.wait_steps(60)  # written while nobody archives
        missed = writer.written() - at_kill
        assert missed, "the writer created nothing while the archiver was down"
        desto_keys = sum(1 for _ in redis.scan_iter(match="desto:*", count=1000))

        daemon = daemons(redis_server, db_path)
        caught_up = daemon.wait_reconcile("start")
        # The start's reconcile alone brought every record created during the downtime in.
        not_in = [k for k in missed if archived(db_path, k) is None]
        assert not not_in, f"{len(not_in)} record(s) from the downtime missing after reconcile: {not_in[:5]}"
        assert caught_up["keys_scanned"] >= desto_keys
        assert sum(caught_up["written"].values()) >= len(missed), caught_up
        assert caught_up["quarantined"] == 0

    written = writer.finish()
    assert len(written) > 300
    settle(report, redis, db_path, written, timeout=20)
    assert daemon.proc.poll() is None
    assert not daemon.events("record.quarantined")


# ─── 2. Redis restarted with its data (AOF) ──────────────────────────────────────────────────────


def test_redis_restart_with_aof_renews_notifications_and_reconciles(fresh_redis, db_path, daemons, reliability):
    report = reliability("Redis restarted, data kept (AOF)", "clean restart of redis-server under the daemon")
    client = fresh_redis.client()
    try:
        keys = [write_session(client)[0], write_job(client)[0], write_favorite(client)[0]]
        daemon = start_ready(daemons, fresh_redis, db_path, ARCHIVER_RECONCILE_INTERVAL="300")
        assert_archive_equals_redis(client, db_path, keys)
        assert daemon.events("archiver.started")[0]["notify_flags_found"] == ""
        assert not daemon.events("notifications.set")

        fresh_redis.restart()
        daemon.wait_log("redis.reconnected")
        daemon.wait_reconcile("reconnect")
        order = [e["event"] for e in log_events(daemon.log)]
        assert "redis.disconnected" in order
        assert order.index("redis.disconnected") < order.index("redis.reconnected"), order
        assert client.dbsize() == 5  # three records and two favorite indexes: the AOF kept them

        # The restarted Redis came back without the flags (CONFIG SET is not persisted): set again.
        renewed = daemon.events("notifications.set")
        assert len(renewed) == 1 and renewed[0]["flags_found"] == "", renewed
        flags = notify_flags(client)
        assert "K" in flags and (set("hgxe") <= set(flags) or "A" in flags), flags

        # Only a keyspace notification can bring this in quickly: the next reconcile is minutes away.
        client.hset(keys[0], mapping={"status": "finished", "end_time": now_iso()})
        new_job = write_job(client, session_id=keys[0].rsplit(":", 1)[1])[0]
        wait_for(lambda: archived(db_path, new_job) is not None, 3, what="a job written after the restart")
        wait_for(lambda: archived(db_path, keys[0])["status"] == "finished", 3, what="the session's new status")
        settle(report, client, db_path, [*keys, new_job], timeout=3)
        assert len(daemon.events("reconcile.done")) == 2
        assert daemon.proc.poll() is None
    finally:
        client.close()


# ─── 3. Redis restarted empty ────────────────────────────────────────────────────────────────────


def test_redis_restart_without_persistence_tombstones_as_missing(volatile_redis, db_path, daemons, reliability):
    report = reliability("Redis restarted empty (no persistence)", "restart of redis-server without AOF or RDB")
    client = volatile_redis.client()
    try:
        records = [write_session(client), write_job(client, status="finished", exit_code="0"), write_favorite(client)]
        daemon = start_ready(daemons, volatile_redis, db_path)
        keys = [key for key, _ in records]
        assert_archive_equals_redis(client, db_path, keys)

        volatile_redis.restart()
        assert client.dbsize() == 0
        daemon.wait_log("redis.reconnected")
        done = daemon.wait_reconcile("reconnect")
        assert done["tombstoned"] == 3, done

        for key, record in records:
            from_redis, from_archive, found = desto_view(key, record, db_path)
            assert from_archive == from_redis, key
            assert found["gone_reason"] == "missing", key
            assert found["gone_at"] is not None
            assert utc(found["gone_at"]) >= utc(found["last_seen_at"])
        history = query(
            db_path, "SELECT event FROM status_history WHERE record_id = ? ORDER BY id", (entity_of(keys[0])[1],)
        )
        events = [r["event"] for r in history]
        assert events[-1] == "missing", events
        settle(report, client, db_path, keys, timeout=1)
    finally:
        client.close()


# ─── 4. no notifications (CONFIG refused, or not allowed): fallback reconciliation ───────────────


@pytest.mark.parametrize("variant", ["config-refused", "notifications-off"])
def test_without_notifications_fallback_reconciles_keep_the_archive_complete(
    variant, request, db_path, daemons, reliability
):
    if variant == "config-refused":
        server = request.getfixturevalue("configless_redis")
        env = {}
        report = reliability("notifications unavailable: CONFIG refused", "CONFIG renamed away, as on managed Redis")
    else:
        server = request.getfixturevalue("volatile_redis")
        env = {"ARCHIVER_CONFIGURE_NOTIFICATIONS": "false"}
        report = reliability("notifications off", "notify-keyspace-events empty; the archiver may not set it")
    client = server.client()
    try:
        if variant == "config-refused":
            with pytest.raises(redis_lib.ResponseError, match="unknown command"):
                client.config_get("notify-keyspace-events")
        else:
            assert notify_flags(client) == ""
        daemon = start_ready(daemons, server, db_path, ARCHIVER_FALLBACK_RECONCILE_INTERVAL="1", **env)
        warning = daemon.wait_log("notifications.unavailable")[0]
        assert "notify-keyspace-events" in warning["action"] and "K" in warning["action"], warning

        # Written with no message on desto's channels, and Redis sends no keyspace events.
        key, record = write_job(client)
        wait_for(lambda: archived(db_path, key) is not None, 5, what="a job archived by a fallback reconcile")
        from_redis, from_archive, _ = desto_view(key, record, db_path)
        assert from_archive == from_redis

        client.delete(key)
        wait_for(lambda: archived(db_path, key)["gone_at"] is not None, 5, what="the deleted job's tombstone")
        assert archived(db_path, key)["gone_reason"] == "missing"  # nobody saw it leave

        later, _ = write_session(client)
        timers = len(daemon.events("reconcile.done", reason="timer"))
        daemon.wait_reconcile("timer", count=timers + 2)
        settle(report, client, db_path, [key, later], timeout=5)
        assert len(daemon.events("notifications.unavailable")) == 1
        assert daemon.proc.poll() is None
        assert heartbeat(db_path)["notifications"] is False
        if variant == "notifications-off":
            assert notify_flags(client) == ""  # left as the operator set it
    finally:
        client.close()


def test_a_write_pause_during_a_fallback_reconcile_does_not_stop_the_reconciles(
    configless_redis, db_path, daemons, reliability
):
    """What a failover does (CLIENT PAUSE ... WRITE) while notifications are off and reconciles on
    a 1 s timer keep the archive complete: SCAN and TIME still answer, the read of the pass's page
    times out. That pass must be read again once Redis writes again, and the timer go on: a
    session written after the pause is archived."""
    report = reliability(
        "write pause during a fallback reconcile",
        "CLIENT PAUSE 2500 WRITE (as a failover does) x2, notifications unavailable, reconciles every 1 s",
    )
    client = configless_redis.client()
    try:
        daemon = start_ready(
            daemons,
            configless_redis,
            db_path,
            ARCHIVER_FALLBACK_RECONCILE_INTERVAL="1",
            ARCHIVER_SOCKET_TIMEOUT="1",
        )
        written = []
        for _ in range(2):
            key, _ = write_session(client)
            written.append(key)
            wait_for(lambda key=key: archived(db_path, key) is not None, 5, what="a session archived by a reconcile")

            def timeouts() -> int:  # a read that failed, or one made again on fewer keys
                return len(daemon.events("redis.read_failed")) + len(daemon.events("redis.read_slow"))

            before = timeouts()
            client.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
            wait_for(lambda before=before: timeouts() > before, 5, what="a reconcile's read timed out")
            time.sleep(2.6)  # the pause is over
        later, _ = write_session(client)  # no notification, no message on desto's channels
        written.append(later)
        wait_for(lambda: archived(db_path, later) is not None, 8, what="a session written after the pauses archived")
        settle(report, client, db_path, written, timeout=5)
        assert daemon.proc.poll() is None
        # a read held up by the pause is not a slow key: nothing good is put in quarantine
        assert daemon.events("redis.key_not_read") == [] and daemon.events("record.quarantined") == []
    finally:
        client.close()


# ─── 5. SIGTERM, SIGINT and SIGHUP flush what is pending ─────────────────────────────────────────


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_signal_flushes_pending_batch(signum, redis_server, redis, db_path, daemons, reliability):
    name = signal.Signals(signum).name
    report = reliability(f"{name} with a batch pending", f"{name} while a change waits for its flush")
    daemon = start_ready(daemons, redis_server, db_path, ARCHIVER_FLUSH_INTERVAL="30", ARCHIVER_BATCH_SIZE="1000")
    key, record = write_job(redis, status="finished", exit_code="3", end_time=now_iso())

    def pending() -> bool:
        beat = heartbeat(db_path)
        return beat is not None and beat["pid"] == daemon.pid and beat["pending"] >= 1

    wait_for(pending, 5, what="the heartbeat to report the event as pending")
    assert archived(db_path, key) is None  # received, not flushed yet

    sent = time.monotonic()
    daemon.signal(signum)
    assert daemon.proc.wait(timeout=5) == 0
    assert time.monotonic() - sent < 5

    from_redis, from_archive, _ = desto_view(key, record, db_path)
    assert from_archive == from_redis
    stopped = daemon.events("archiver.stopped")
    assert len(stopped) == 1
    assert stopped[0]["flushed_at_stop"] >= 1, stopped[0]
    assert stopped[0]["left_for_next_start"] == 0
    settle(report, redis, db_path, [key], timeout=1)


@pytest.mark.parametrize(
    ("wrapper", "signum"),
    [(["nohup"], signal.SIGHUP), (["sh", "-c", "trap '' INT; exec \"$@\"", "sh"], signal.SIGINT)],
    ids=["nohup-SIGHUP", "background-SIGINT"],
)
def test_inherited_ignored_signal_stays_ignored(wrapper, signum, redis_server, redis, db_path, daemons):
    """``nohup desto-archiver run &``: the terminal closing must not stop a daemon started to
    outlive it; nor must Ctrl-C in the shell that started it in the background."""
    daemon = start_ready(daemons, redis_server, db_path, wrapper=wrapper)
    daemon.signal(signum)
    key, _ = write_session(redis)
    wait_for(lambda: archived(db_path, key) is not None, 5, what="the daemon archiving on after the signal")
    assert daemon.proc.poll() is None
    assert not daemon.events("archiver.stopped")
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=5) == 0


# ─── 6. one daemon per file ──────────────────────────────────────────────────────────────────────


def test_second_daemon_on_same_file_is_refused(redis_server, redis, db_path, daemons, reliability):
    report = reliability("second daemon on the same file", "a second `desto-archiver run` on the archive")
    first = start_ready(daemons, redis_server, db_path)
    second = daemons(redis_server, db_path)
    assert second.proc.wait(timeout=15) == 1
    message = second.log.read_text()
    assert str(db_path) in message and f"pid {first.pid}" in message, message
    assert "already running" in message
    assert not second.events("archiver.started")

    assert first.proc.poll() is None
    key, _ = write_session(redis)
    wait_for(lambda: archived(db_path, key) is not None, 5, what="the first daemon archiving on")
    wait_for(lambda: heartbeat(db_path)["pid"] == first.pid, 2, what="the first daemon's heartbeat")
    settle(report, redis, db_path, [key], timeout=5)


# ─── 7. the pub/sub connection killed by the server ──────────────────────────────────────────────


@pytest.mark.slow
def test_pubsub_connection_killed_reconnects_without_loss(redis_server, redis, db_path, daemons, writers, reliability):
    report = reliability("pub/sub connection killed", "CLIENT KILL TYPE pubsub x3 under load")
    writer = writers(redis_server, seed=7)
    daemon = start_ready(daemons, redis_server, db_path)
    for n in range(1, 4):
        writer.wait_steps(100)
        assert redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        daemon.wait_log("redis.disconnected", count=n)
        daemon.wait_log("redis.reconnected", count=n)
        daemon.wait_reconcile("reconnect", count=n)
    writer.wait_steps(100)
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=20)
    assert heartbeat(db_path)["reconnects"] == 3
    assert daemon.proc.poll() is None


# ─── 8. Redis frozen: a half-open connection ─────────────────────────────────────────────────────


@pytest.mark.slow
def test_frozen_redis_half_open_connection_is_replaced(fresh_redis, db_path, daemons, reliability):
    report = reliability("Redis frozen (half-open connection)", "SIGSTOP of redis-server until the daemon notices")
    client = fresh_redis.client()
    try:
        daemon = start_ready(
            daemons,
            fresh_redis,
            db_path,
            ARCHIVER_HEALTH_CHECK_INTERVAL="1",
            ARCHIVER_SOCKET_TIMEOUT="1",
            ARCHIVER_RECONCILE_INTERVAL="300",
        )
        before, _ = write_session(client)
        assert_archive_equals_redis(client, db_path, [before], timeout=5)

        fresh_redis.freeze()
        try:
            frozen_at = time.monotonic()
            daemon.wait_log("redis.disconnected", timeout=10)
            assert time.monotonic() - frozen_at > 1  # noticed by a health check that got no reply
        finally:
            fresh_redis.thaw()
        daemon.wait_log("redis.reconnected", timeout=15)
        daemon.wait_reconcile("reconnect", timeout=15)

        client.hset(before, mapping={"status": "failed", "end_time": now_iso()})
        after, _ = write_job(client, session_id=before.rsplit(":", 1)[1])
        settle(report, client, db_path, [before, after], timeout=3)
        assert daemon.proc.poll() is None
    finally:
        client.close()


# ─── 9. the SQLite file locked by another writer ─────────────────────────────────────────────────


@pytest.mark.slow
def test_locked_sqlite_does_not_stall_the_listener(tight_redis, db_path, daemons, reliability):
    report = reliability("SQLite file locked by another writer", "BEGIN IMMEDIATE held 5 s during 60,000 changes")
    client = tight_redis.client()
    idle = tight_redis.client(client_name="idle-subscriber").pubsub()
    try:
        daemon = start_ready(daemons, tight_redis, db_path, ARCHIVER_SQLITE_BUSY_TIMEOUT="1")
        # A subscriber that never reads: the burst below is big enough for Redis to drop it.
        idle.psubscribe(KEYSPACE_PATTERN)
        wait_for(lambda: "idle-subscriber" in pubsub_clients(client), 5, what="the idle subscriber")
        listener_id = pubsub_clients(client)["desto-archiver-events"]
        before = [write_session(client)[0] for _ in range(3)]
        assert_archive_equals_redis(client, db_path, before, timeout=5)

        blocker = sqlite3.connect(db_path, timeout=10, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            held_from = time.monotonic()
            # While the file is locked: 200 jobs written once (no later event brings them back), then
            # 60,000 heartbeats on the sessions over 3 s, which the listener must keep reading.
            jobs = [write_job(client, status="finished", end_time=now_iso(), exit_code="0")[0] for _ in range(200)]
            for n in range(60):
                pipe = client.pipeline(transaction=False)
                for i in range(1000):
                    pipe.hset(before[i % len(before)], "last_heartbeat", now_iso())
                pipe.execute()
                time.sleep(max(0.0, held_from + (n + 1) * 0.05 - time.monotonic()))
            daemon.wait_log("store.write_failed", timeout=5)
            assert all(archived(db_path, key) is None for key in jobs)  # readers still read; nothing landed
            time.sleep(max(0.0, held_from + 5 - time.monotonic()))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        recovered = daemon.wait_log("archiver.recovered", timeout=10)[0]
        assert recovered["after"] == "sqlite"
        settle(report, client, db_path, [*before, *jobs], timeout=15)

        clients = pubsub_clients(client)
        assert "idle-subscriber" not in clients, "the burst did not fill a subscriber's output buffer"
        assert clients.get("desto-archiver-events") == listener_id, clients  # same connection throughout
        assert not daemon.events("redis.disconnected")
        assert heartbeat(db_path)["reconnects"] == 0
        assert daemon.proc.poll() is None
    finally:
        idle.close()
        client.close()


# ─── 10. expiry and deletion become tombstones ───────────────────────────────────────────────────


def test_expired_and_deleted_keys_become_tombstones(redis_server, redis, db_path):
    with daemon_thread(settings_for(redis_server, db_path)):
        skey, session = write_session(redis, status="finished", end_time=now_iso(), tmux_active="False")
        jkey, job = write_job(redis, session_id=session["session_id"], status="failed", exit_code="2")
        wait_for(lambda: archived(db_path, skey) and archived(db_path, jkey), 5, what="both records archived")

        expire_from = datetime.now(UTC)
        redis.pexpire(skey, 300)
        redis.delete(jkey)
        wait_for(lambda: archived(db_path, jkey)["gone_at"] is not None, 5, what="the deleted job's tombstone")
        wait_for(lambda: archived(db_path, skey)["gone_at"] is not None, 5, what="the expired session's tombstone")

        for key, record, reason in ((skey, session, "expired"), (jkey, job, "deleted")):
            from_redis, from_archive, found = desto_view(key, record, db_path)
            assert from_archive == from_redis, key  # every field kept
            assert found["gone_reason"] == reason, key
            assert expire_from - timedelta(seconds=1) <= utc(found["gone_at"]) <= datetime.now(UTC), found["gone_at"]
            history = query(
                db_path, "SELECT event FROM status_history WHERE record_id = ? ORDER BY id", (entity_of(key)[1],)
            )
            assert history[-1]["event"] == reason, [h["event"] for h in history]
        session_row = archived(db_path, skey)
        assert utc(session_row["gone_at"]) >= expire_from + timedelta(milliseconds=250)  # when the TTL ran out
        assert_archive_equals_redis(redis, db_path, [skey, jkey], timeout=2)


# ─── 11. the archive's file removed or replaced under the daemon ─────────────────────────────────


def test_archive_removed_under_the_daemon_is_started_again_from_redis(
    redis_server, redis, db_path, daemons, writers, reliability
):
    report = reliability(
        "archive file removed, twice",
        "`rm desto.db` (its WAL and shared memory left in place) under a desto-like writer, twice",
    )
    writer = writers(redis_server, seed=11)
    daemon = start_ready(daemons, redis_server, db_path)
    for n in range(1, 3):
        writer.wait_steps(100)
        db_path.unlink()
        lost = daemon.wait_log("archive.file_lost", count=n, timeout=5)[n - 1]
        assert lost["reason"] == "removed"
        # the removed file's own log, which the next opener of the path would take for its own
        assert sorted(lost["removed"]) == ["desto.db-shm", "desto.db-wal"]
        daemon.wait_reconcile("reopened", count=n, timeout=15)
    writer.wait_steps(100)
    written = writer.finish()

    settle(report, redis, db_path, written, timeout=20)
    assert integrity(db_path) == "ok"
    wait_for(lambda: heartbeat(db_path)["pid"] == daemon.pid, 10, what="the daemon's heartbeat in the new file")
    report.measured["reopened"] = len(daemon.events("archive.reopened"))
    assert daemon.proc.poll() is None


def test_a_restore_moved_over_the_archive_is_opened_and_brought_up_to_date(
    redis_server, redis, db_path, daemons, reliability, tmp_path
):
    report = reliability(
        "archive replaced by a restore",
        "a copy made earlier by `desto-archiver backup` moved over the archive (`mv`) while the daemon runs",
    )
    daemon = start_ready(daemons, redis_server, db_path)
    gone_key, _ = write_session(redis, status="finished", end_time=now_iso())
    kept = [write_session(redis)[0] for _ in range(2)]
    assert_archive_equals_redis(redis, db_path, [gone_key, *kept], timeout=5)
    redis.delete(gone_key)
    wait_for(lambda: archived(db_path, gone_key)["gone_at"] is not None, 5, what="the deleted session's tombstone")

    copy = tmp_path / "backup.db"
    backup(db_path, copy)
    # A row only the copy holds: after the move, the path must name the copy, not the lost file's log.
    conn = sqlite3.connect(copy)
    conn.execute("INSERT INTO archiver_state (name, value, updated_at) VALUES ('restored_from', 'the backup', '')")
    conn.commit()
    conn.close()
    later = [write_session(redis)[0] for _ in range(2)]
    assert_archive_equals_redis(redis, db_path, later, timeout=5)  # into the file about to be replaced

    os.replace(copy, db_path)
    lost = daemon.wait_log("archive.file_lost", timeout=5)[0]
    assert lost["reason"] == "replaced"
    assert sorted(lost["removed"]) == ["desto.db-shm", "desto.db-wal"]
    daemon.wait_reconcile("reopened", timeout=10)

    settle(report, redis, db_path, [gone_key, *kept, *later], timeout=10)
    assert query(db_path, "SELECT value FROM archiver_state WHERE name = 'restored_from'")[0]["value"] == "the backup"
    assert archived(db_path, gone_key)["gone_reason"] == "deleted"  # history only the copy held
    assert integrity(db_path) == "ok"
    report.measured["reopened"] = len(daemon.events("archive.reopened"))
    assert daemon.proc.poll() is None


def test_a_file_moved_over_the_archive_that_is_not_sqlite_stops_the_daemon_with_the_reason(
    redis_server, redis, db_path, daemons, tmp_path
):
    daemon = start_ready(daemons, redis_server, db_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    os.replace(notes, db_path)
    assert daemon.proc.wait(timeout=10) == 1
    text = daemon.log.read_text()
    assert daemon.events("archive.file_lost", reason="replaced")
    assert f"cannot use {db_path}" in text and "is it a SQLite file" in text, text
    assert daemon.events("archiver.stopped")
    assert db_path.read_text() == "not a database\n" * 100  # left as it was


# ─── 12. Redis' clock set back ───────────────────────────────────────────────────────────────────


def test_redis_clock_behind_the_archive_loses_no_change(redis_server, redis, db_path, daemons, writers, reliability):
    """A clock corrected after running fast, or a Redis on another host: every read the archive holds
    is dated after every read Redis' clock can date now."""
    report = reliability(
        "Redis' clock an hour behind the archive",
        "every read in the archive moved an hour ahead with the daemon stopped (as reads made while Redis' clock "
        "ran an hour fast leave it), then the daemon started again under a desto-like writer",
    )
    writer = writers(redis_server, seed=13)
    first = start_ready(daemons, redis_server, db_path)
    writer.wait_steps(150)
    first.signal(signal.SIGTERM)
    assert first.proc.wait(timeout=10) == 0
    moved = archived_keys(db_path)
    move_versions_ahead(db_path, 3600)

    second = start_ready(daemons, redis_server, db_path)
    writer.wait_steps(300)
    written = writer.finish()
    # Changes to records read before, by the faster clock, are applied: the sessions the writer
    # moved on, finished or failed since are in their last state.
    settle(report, redis, db_path, written, timeout=20)
    assert len(moved) > 50 and moved < written

    [behind] = second.events("redis.clock_behind")
    assert 3500 < behind["behind_s"] <= 3600, behind
    # The times written stay Redis' own: nothing read by the second daemon is dated an hour on.
    newest_seen = utc(query(db_path, "SELECT max(last_seen_at) FROM sessions")[0][0])
    assert newest_seen < datetime.now(UTC) + timedelta(minutes=1)
    report.measured["behind by, s"] = round(behind["behind_s"])
    assert second.proc.poll() is None


# ─── 13. the archive's file damaged ──────────────────────────────────────────────────────────────


def test_a_damaged_archive_is_named_and_replaced_as_the_readme_says(
    redis_server, redis, db_path, daemons, reliability, tmp_path
):
    report = reliability(
        "archive damaged",
        "the pages of the sessions table and its index overwritten with garbage, the daemon stopped; started on "
        "it, then the file moved away as the documentation says and the daemon started again",
    )
    keys = [write_session(redis)[0] for _ in range(30)]
    first = start_ready(daemons, redis_server, db_path)
    assert_archive_equals_redis(redis, db_path, keys)
    first.signal(signal.SIGTERM)
    assert first.proc.wait(timeout=10) == 0
    roots = query(db_path, "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'sessions' AND rootpage > 0")
    for (page,) in roots:
        damage_pages(db_path, page)

    damaged = daemons(redis_server, db_path, ARCHIVER_SHUTDOWN_TIMEOUT="2")  # its last flush cannot succeed
    failed = damaged.wait_log("store.write_failed")[0]
    assert failed["error"] == "database disk image is malformed", failed
    assert failed["action"] == DAMAGED_ADVICE
    checked = subprocess.run(
        [sys.executable, "-m", "archiver", "check", "--integrity"],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1 and "Traceback" not in checked.stderr, checked.stderr
    assert re.search(r"integrity\s+FAIL", checked.stdout) and "the archive's file is damaged" in checked.stdout
    assert damaged.proc.poll() is None  # waiting for the file to be mended, not in a restart loop
    assert not damaged.events("record.quarantined")  # the file's fault is not put on the records
    damaged.signal(signal.SIGTERM)
    assert damaged.proc.wait(timeout=15) == 0

    # What the documentation says (Operations, 'A damaged file'): move the file away with its -wal
    # and -shm, start again: Redis holds the last 7 days, and the first reconcile brings them into
    # the new file.
    kept = tmp_path / "damaged"
    kept.mkdir()
    for side in ("", "-wal", "-shm"):
        if Path(f"{db_path}{side}").exists():
            os.replace(f"{db_path}{side}", kept / f"desto.db{side}")
    start_ready(daemons, redis_server, db_path)
    settle(report, redis, db_path, keys, timeout=10)
    assert integrity(db_path) == "ok"


# ─── 14. changes the notifications missed, counted ───────────────────────────────────────────────

NO_MISSED = {"session": 0, "job": 0, "favorite": 0, "atjob": 0}


def missed_metrics(port: int) -> tuple[dict[str, float], float]:
    """desto_archiver_missed_changes_total by kind, and the streak gauge."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    by_kind, streak = {}, -1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "desto_archiver_missed_changes_total":
                by_kind[sample.labels["kind"]] = sample.value
            elif sample.name == "desto_archiver_missed_changes_streak":
                streak = sample.value
    return by_kind, streak


@pytest.mark.slow
def test_changes_made_while_the_subscription_is_down_are_counted_as_missed(
    redis_server, redis, db_path, daemons, writers
):
    """The subscription dropped and kept down (the default user may not subscribe for a while): the
    changes made in that known window, and only those, are what the reconnect's reconcile counts,
    while desto's load runs again during that reconcile."""
    port = free_port()
    writer = writers(redis_server, seed=14)
    daemon = start_ready(daemons, redis_server, db_path, ARCHIVER_METRICS_PORT=str(port))
    sessions = [write_session(redis)[0] for _ in range(5)]
    jobs = [write_job(redis)[0] for _ in range(2)]
    writer.wait_steps(200)
    writer.hold()
    assert_archive_equals_redis(redis, db_path, [*sessions, *jobs], timeout=10)  # every notification has landed
    try:
        redis.execute_command("ACL", "SETUSER", "default", "resetchannels")
        redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        daemon.wait_log("redis.disconnected")
        # the known window: nothing but these 10 changes while no notification reaches the daemon
        for key in sessions:
            redis.hset(key, "last_heartbeat", now_iso())
        for key in jobs:
            redis.delete(key)
        favorites = [write_favorite(redis)[0] for _ in range(3)]
    finally:
        redis.execute_command("ACL", "SETUSER", "default", "allchannels")
    daemon.wait_log("redis.reconnected")
    writer.go_on()
    done = daemon.wait_reconcile("reconnect")
    assert done["missed_changes"] == {"session": 5, "job": 2, "favorite": 3, "atjob": 0}, done
    assert missed_metrics(port) == ({"session": 5.0, "job": 2.0, "favorite": 3.0, "atjob": 0.0}, 1.0)
    warned = daemon.wait_log("notifications.missed_changes")[0]
    assert warned["missed_changes"] == {"session": 5, "job": 2, "favorite": 3}

    checked = subprocess.run(
        [sys.executable, "-m", "archiver", "check", "--no-verify", "--json"],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    finding = next(c for c in json.loads(checked.stdout)["checks"] if c["check"] == "missed changes")
    assert finding["status"] == "warn" and "10 change(s)" in finding["detail"], finding
    assert checked.returncode == 0, checked.stdout  # a warning: the reconcile archived them
    stats = subprocess.run(
        [sys.executable, "-m", "archiver", "stats", "--json"],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(stats.stdout)["last_reconcile_missed_changes"] == done["missed_changes"]
    written = writer.finish()
    assert_archive_equals_redis(redis, db_path, [*written, *sessions, *jobs, *favorites], timeout=15)


@pytest.mark.slow
def test_with_nothing_dropped_reconciles_under_load_count_no_missed_change(
    redis_server, redis, db_path, daemons, writers
):
    """The same load, reconciles every half second: changes a reconcile reads before their
    notification is handled are not missed ones, and the count stays 0."""
    port = free_port()
    writer = writers(redis_server, seed=15)
    daemon = start_ready(
        daemons, redis_server, db_path, ARCHIVER_METRICS_PORT=str(port), ARCHIVER_RECONCILE_INTERVAL="0.5"
    )
    daemon.wait_reconcile("timer", count=8, timeout=30)
    written = writer.finish()
    timers = daemon.events("reconcile.done", reason="timer")
    assert [t["missed_changes"] for t in timers] == [NO_MISSED] * len(timers)
    assert missed_metrics(port) == ({kind: 0.0 for kind in NO_MISSED}, 0.0)
    assert not daemon.events("notifications.missed_changes")
    print("timer reconciles' writes under load:", [sum(t["written"].values()) for t in timers])
    assert_archive_equals_redis(redis, db_path, written, timeout=15)
