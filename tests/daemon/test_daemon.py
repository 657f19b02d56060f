"""The daemon against a real Redis: what lands, what is quarantined, what is never archived."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import archiver
from tests.fault_helpers import heartbeat, start_ready
from tests.helpers import (
    atjob_hash,
    count,
    daemon_thread,
    favorite_hash,
    job_hash,
    query,
    row,
    session_hash,
    settings_for,
    wait_for,
)


def test_bad_records_are_quarantined_while_good_ones_around_them_land(redis_server, redis, db_path: Path) -> None:
    raw = redis_server.client(decode_responses=False)
    good_before = [session_hash() for _ in range(3)]
    for record in good_before:
        redis.hset(f"desto:session:{record['session_id']}", mapping=record)
    bad = {
        "unknown status": ("desto:session:s-bad-status", session_hash("s-bad-status", status="paused")),
        "bad time": ("desto:job:j-bad-time", job_hash("j-bad-time", start_time="half past ten")),
        "bad number": ("desto:job:j-bad-exit", job_hash("j-bad-exit", exit_code="one")),
        "bad count": ("desto:favorite:f-bad-count", favorite_hash("f-bad-count", use_count="many")),
    }
    # Keys of other types raise no hash notification: the reconcile (here, the first one) finds them.
    redis.set("desto:session:s-string", "not a hash")
    redis.rpush("desto:job:j-list", "a", "b")
    redis.set("desto:status:nightly", "running")  # a desto: key that fits no record kind
    with daemon_thread(settings_for(redis_server, db_path)):
        for key, record in bad.values():
            redis.hset(key, mapping=record)
        utf8 = {k.encode(): v.encode() for k, v in session_hash("s-latin1").items()}
        utf8[b"session_name"] = b"r\xe9sum\xe9"
        raw.hset(b"desto:session:s-latin1", mapping=utf8)
        good_after = [job_hash() for _ in range(3)]
        for record in good_after:
            redis.hset(f"desto:job:{record['job_id']}", mapping=record)
        wait_for(lambda: count(db_path, "quarantine") == 8, what="8 quarantined keys")
        wait_for(lambda: count(db_path, "jobs") == 3 and count(db_path, "sessions") == 3, what="good records")

    quarantined = {r["key_text"]: r for r in query(db_path, "SELECT * FROM quarantine")}
    assert "unknown status 'paused'" in quarantined["desto:session:s-bad-status"]["reason"]
    assert "start_time: not an ISO time" in quarantined["desto:job:j-bad-time"]["reason"]
    assert "exit_code: not an integer" in quarantined["desto:job:j-bad-exit"]["reason"]
    assert "use_count: not an integer" in quarantined["desto:favorite:f-bad-count"]["reason"]
    assert "not valid UTF-8" in quarantined["desto:session:s-latin1"]["reason"]
    assert b"r\xe9sum\xe9" in quarantined["desto:session:s-latin1"]["payload"]  # the raw bytes, kept whole
    assert "wrong Redis type: string" in quarantined["desto:session:s-string"]["reason"]
    assert "wrong Redis type: list" in quarantined["desto:job:j-list"]["reason"]
    assert quarantined["desto:status:nightly"]["kind"] is None
    assert all(r["payload"] for r in quarantined.values())
    for record in good_before:
        assert row(db_path, "sessions", "session_id", record["session_id"])["status"] == "running"
    for key in ("s-bad-status", "s-latin1", "s-string"):
        assert row(db_path, "sessions", "session_id", key) is None


def test_desto_indexes_are_never_archived_nor_quarantined(redis_server, redis, db_path: Path) -> None:
    fav = favorite_hash()
    with daemon_thread(settings_for(redis_server, db_path)):
        redis.hset(f"desto:favorite:{fav['favorite_id']}", mapping=fav)
        redis.set(f"desto:favorite:name:{fav['name']}", fav["favorite_id"])
        redis.sadd("desto:favorites:all", fav["favorite_id"])
        wait_for(lambda: row(db_path, "favorites", "favorite_id", fav["favorite_id"]), what="favorite archived")
    assert count(db_path, "favorites") == 1
    assert count(db_path, "quarantine") == 0


def test_favorite_names_swapped_in_one_transaction(redis_server, redis, db_path: Path) -> None:
    a, b = favorite_hash(name="build"), favorite_hash(name="test")
    with daemon_thread(settings_for(redis_server, db_path)):
        for f in (a, b):
            redis.hset(f"desto:favorite:{f['favorite_id']}", mapping=f)
        wait_for(lambda: count(db_path, "favorites") == 2)
        with redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"desto:favorite:{a['favorite_id']}", "name", "test")
            pipe.hset(f"desto:favorite:{b['favorite_id']}", "name", "build")
            pipe.execute()

        def swapped() -> bool:
            names = {r["favorite_id"]: r["name"] for r in query(db_path, "SELECT * FROM favorites")}
            return names == {a["favorite_id"]: "test", b["favorite_id"]: "build"}

        wait_for(swapped, what="names swapped in the archive")


def test_atjobs_are_archived_with_their_status_history(redis_server, redis, db_path: Path) -> None:
    record = atjob_hash("41")
    with daemon_thread(settings_for(redis_server, db_path)):
        redis.hset("desto:atjob:41", mapping=record)
        wait_for(lambda: row(db_path, "at_jobs", "at_job_id", "41"), what="at-job archived")
        redis.hset("desto:atjob:41", "status", "cancelled")
        wait_for(lambda: row(db_path, "at_jobs", "at_job_id", "41")["status"] == "cancelled")
    archived = row(db_path, "at_jobs", "at_job_id", "41")
    assert archived["session_name"] == "nightly" and archived["scheduled_time"] == record["scheduled_time"]
    events = query(db_path, "SELECT event, status FROM status_history WHERE kind = 'atjob' ORDER BY id")
    assert [tuple(e) for e in events] == [("first_seen", "scheduled"), ("status", "cancelled")]


def test_records_written_before_start_are_archived_by_the_first_reconcile(redis_server, redis, db_path) -> None:
    records = [session_hash() for _ in range(50)]
    for record in records:
        redis.hset(f"desto:session:{record['session_id']}", mapping=record)
        redis.expire(f"desto:session:{record['session_id']}", 7 * 86400 - 3600)  # created an hour ago
    with daemon_thread(settings_for(redis_server, db_path)):
        assert count(db_path, "sessions") == 50  # ready means reconciled once
    created = query(db_path, "SELECT created_at, first_seen_at FROM sessions LIMIT 1")[0]
    # desto's History tab orders by created_at: dated from desto's TTL, an hour before the first sight
    assert created["created_at"] < created["first_seen_at"].replace("T", " ")[:19]


def test_notification_flags_are_a_union_with_what_was_set(redis_server, redis, db_path: Path) -> None:
    redis.config_set("notify-keyspace-events", "Ez")
    with daemon_thread(settings_for(redis_server, db_path)):
        flags = redis.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set("EzKghxe") <= set(flags)
    redis.config_set("notify-keyspace-events", "KEA")
    with capture_logs() as logs, daemon_thread(settings_for(redis_server, db_path)):
        pass
    assert redis.config_get("notify-keyspace-events")["notify-keyspace-events"] == "AKE"
    started = next(e for e in logs if e["event"] == "archiver.started")
    assert started["notify_flags_found"] == "AKE" and started["notify_flags_set"] is None


def test_start_and_reconcile_log_lines(redis_server, redis, db_path: Path) -> None:
    redis.hset("desto:job:j1", mapping=job_hash("j1"))
    settings = settings_for(redis_server, db_path, redis_url=f"redis://:pw-not-shown@127.0.0.1:{redis_server.port}/0")
    redis.config_set("requirepass", "pw-not-shown")
    try:
        with capture_logs() as logs, daemon_thread(settings):
            pass
    finally:
        redis_server.client(password="pw-not-shown").config_set("requirepass", "")
    assert "pw-not-shown" not in json.dumps(logs)
    started = next(e for e in logs if e["event"] == "archiver.started")
    assert started["redis"] == f"redis://127.0.0.1:{redis_server.port}/0"
    assert started["db"] == str(db_path)
    assert started["version"] == archiver.__version__ and started["sqlite"] == sqlite3.sqlite_version
    assert started["notify_flags_found"] == "" and set(started["notify_flags_set"]) == set("Kghxe")
    done = next(e for e in logs if e["event"] == "reconcile.done")
    assert done["reason"] == "start" and done["keys_scanned"] == 1 and done["written"] == {"job": 1}
    assert isinstance(done["duration_s"], float)
    stopped = next(e for e in logs if e["event"] == "archiver.stopped")
    assert stopped["written"] == {"job": 1} and stopped["reconciles"] == 1


def test_an_event_burst_beyond_the_dirty_limit_is_reconciled_not_lost(redis_server, redis, db_path: Path) -> None:
    settings = settings_for(redis_server, db_path, max_dirty=20, flush_interval=5, batch_size=1000)
    ids = [str(uuid.uuid4()) for _ in range(500)]
    with capture_logs() as logs, daemon_thread(settings):
        with redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hset(f"desto:job:{jid}", mapping=job_hash(jid))
            pipe.execute()
        wait_for(lambda: count(db_path, "jobs") == 500, timeout=20, what="all 500 jobs archived")
        wait_for(
            lambda: any(e["event"] == "reconcile.done" and e["reason"] == "overflow" for e in logs),
            what="the reconcile that replaced the forgotten keys",
        )
    assert any(e["event"] == "events.overflow" for e in logs)


def test_the_page_cache_is_the_daemons_own_size_unless_set(redis_server, redis, db_path: Path) -> None:
    with daemon_thread(settings_for(redis_server, db_path)) as daemon:
        assert daemon.store is not None
        assert daemon.store.conn.execute("PRAGMA cache_size").fetchone()[0] == -64 * 1024
    with daemon_thread(settings_for(redis_server, db_path, sqlite_cache_mb=16)) as daemon:
        assert daemon.store is not None
        assert daemon.store.conn.execute("PRAGMA cache_size").fetchone()[0] == -16 * 1024


@pytest.mark.parametrize("umask", [None, "0007"], ids=["by-default", "ARCHIVER_UMASK=0007"])
def test_archive_files_are_the_owner_s_and_group_s_not_sqlites_own_0644(
    redis_server, redis, db_path: Path, daemons, umask: str | None
):
    """The archive holds command lines: by default (whatever umask the process was started with:
    the usual 0022 here), as under the image's ARCHIVER_UMASK=0007 and the unit's UMask=0007,
    others may not read it, while desto, in the archiver's group, still writes it."""
    previous = os.umask(0o022)
    try:
        proc = start_ready(daemons, redis_server, db_path, **({"ARCHIVER_UMASK": umask} if umask else {})).proc
    finally:
        os.umask(previous)
    try:
        redis.hset("desto:job:j1", mapping=job_hash("j1"))
        wait_for(lambda: count(db_path, "jobs") == 1)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in db_path.parent.iterdir()}
        expected = {"desto.db": 0o660, "desto.db-wal": 0o660, "desto.db-shm": 0o660, "desto.db.archiver-lock": 0o660}
        assert modes == expected, {k: oct(v) for k, v in modes.items()}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_frozen_redis_never_holds_up_the_writer_s_thread(fresh_redis, db_path: Path) -> None:
    """Every read from Redis but the subscription is the reading thread's: the timer's look at the
    notification flags and a reconcile's sweep too. So while Redis does not answer (frozen, a
    slow disk under its fork), the writing thread goes on: its heartbeat (and systemd's watchdog,
    which would otherwise kill the daemon) keeps coming, and the file stays current for readers."""
    client = fresh_redis.client()
    for _ in range(50):  # archived rows for the sweeps to look at
        record = session_hash()
        client.hset(f"desto:session:{record['session_id']}", mapping=record)
    settings = settings_for(
        fresh_redis,
        db_path,
        reconcile_interval=0.3,  # a reconcile is always under way or due: the freeze meets one
        heartbeat_interval=0.1,
        socket_timeout=8,  # longer than the freeze: a read waits for it to end
        health_check_interval=8,  # nor does the listener reconnect meanwhile
    )
    beats: list[tuple[float, int]] = []

    def look() -> None:
        beat = heartbeat(db_path)
        if beat is not None and (not beats or beat["at_us"] != beats[-1][1]):
            beats.append((time.monotonic(), beat["at_us"]))

    with daemon_thread(settings):
        wait_for(lambda: count(db_path, "sessions") == 50, what="the sessions archived")
        fresh_redis.freeze()
        try:
            frozen_at = time.monotonic()
            while time.monotonic() - frozen_at < 3.0:
                look()
                time.sleep(0.05)
        finally:
            fresh_redis.thaw()
        done = wait_for(lambda: heartbeat(db_path)["reconciles"], what="reconciles counted")
        wait_for(
            lambda: heartbeat(db_path)["reconciles"] > done + 1, 10, what="reconciles on the timer after the freeze"
        )
    during = [at for at, _ in beats if at >= frozen_at]
    gaps = [b - a for a, b in zip([frozen_at, *during], during, strict=False)]
    assert len(during) >= 10 and max(gaps) < 1.0, f"heartbeats during a 3 s freeze: {len(during)}, gaps {gaps}"
    client.close()


def test_an_idle_daemon_sleeps_until_asked_and_every_thread_ends_with_it(redis_server, redis, db_path: Path) -> None:
    """Idle, the daemon's threads sleep until something is due (the subscription's health check
    every ARCHIVER_HEALTH_CHECK_INTERVAL, here an hour): a stop must still reach each of them at
    once, and a change wake them, or a stop would wait for the longest sleep."""
    settings = settings_for(redis_server, db_path, health_check_interval=3600, heartbeat_interval=3600)
    with daemon_thread(settings) as daemon:
        redis.hset("desto:session:idle-1", mapping=session_hash("idle-1"))
        wait_for(lambda: row(db_path, "sessions", "session_id", "idle-1"), 10, what="the change archived")
        threads = [daemon.workers.listener, daemon.workers.fetcher, daemon.store.checkpointer]  # type: ignore[union-attr]
    left = [t.name for t in threads if t is not None and t.is_alive()]
    assert left == [], f"still running after the daemon stopped: {left}"


def test_a_quiet_daemon_gives_back_the_memory_a_burst_took(fresh_redis, db_path: Path, monkeypatch) -> None:
    """A burst fills SQLite's page cache (64 MB by default) and the heap; once nothing has come
    for a while the daemon gives it back (SQLite's cache, the allocator's free heap), once per
    quiet spell, and says so with its memory before and after. How much comes back is measured by
    the idle benchmark; here, that it happens, and only after a write."""
    import archiver.daemon.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_QUIET_S", 1.0)
    settings = settings_for(fresh_redis, db_path, heartbeat_interval=0.2)
    with capture_logs() as logs, daemon_thread(settings):
        for _ in range(200):
            s = session_hash()
            fresh_redis.client().hset(f"desto:session:{s['session_id']}", mapping=s)
        wait_for(lambda: count(db_path, "sessions") == 200, 30)
        wait_for(lambda: [e for e in logs if e["event"] == "memory.given_back"], 15, what="the memory given back")
        time.sleep(1.5)  # quiet on: given back once, not at each heartbeat
    given = [e for e in logs if e["event"] == "memory.given_back"]
    assert len(given) == 1, given
    assert given[0]["quiet_s"] >= 1.0 and given[0]["rss_mb"] > 0 and given[0]["now_mb"] > 0, given
