"""Fault injection: the archive stays complete, and equal to Redis, through crashes and restarts of
the archiver, restarts and freezes of Redis, dropped connections, a locked file, and key expiry.

Every scenario ends with the same check: each desto session, job and favorite hash in Redis has an
archived row that desto's own readers turn into the same object desto's ``from_dict`` makes of the
hash, and every record ever written is in the archive (tombstoned when its key is gone).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from desto.redis.models import DestoJob, DestoSession, FavoriteCommand
from desto.redis.sqlite_store import SQLiteStore

from tests.helpers import (
    daemon_thread,
    favorite_hash,
    job_hash,
    log_events,
    now_iso,
    query,
    row,
    session_hash,
    settings_for,
    start_daemon_process,
    wait_for,
)
from tests.redis_server import RedisServer

DESTO_TTL = 604800  # desto sets EXPIRE 7 days once, when it creates a session or job
KEYSPACE_PATTERN = "__keyspace@0__:desto:*"


# ─── desto's view of a record, from Redis and from the archive ───────────────────────────────────


@dataclass(frozen=True)
class Entity:
    prefix: str
    table: str
    id_col: str
    from_redis: Callable[[dict[str, str]], Any]  # desto's from_dict
    from_row: Callable[[sqlite3.Row], Any]  # desto's SQLiteStore reader


ENTITIES = (
    Entity("desto:session:", "sessions", "session_id", DestoSession.from_dict, SQLiteStore._row_to_session),
    Entity("desto:job:", "jobs", "job_id", DestoJob.from_dict, SQLiteStore._row_to_job),
    Entity("desto:favorite:", "favorites", "favorite_id", FavoriteCommand.from_dict, SQLiteStore._row_to_favorite),
)


def is_record(key: str) -> bool:
    """A session, job or favorite hash (not one of desto's favorite indexes)."""
    return not key.startswith("desto:favorite:name:") and key.startswith(tuple(e.prefix for e in ENTITIES))


def entity_of(key: str) -> tuple[Entity, str]:
    """The record kind and id of a session, job or favorite key."""
    assert is_record(key), key
    entity = next(e for e in ENTITIES if key.startswith(e.prefix))
    return entity, key[len(entity.prefix) :]


def archived_rows(db_path: Path) -> dict[str, dict[str, sqlite3.Row]]:
    return {e.table: {r[e.id_col]: r for r in query(db_path, f"SELECT * FROM {e.table}")} for e in ENTITIES}


def archived_keys(db_path: Path) -> set[str]:
    return {e.prefix + record_id for e in ENTITIES for record_id in archived_rows(db_path)[e.table]}


def archive_differences(client, db_path: Path, written: Iterable[str]) -> list[str]:
    """How the archive differs from Redis: live records missing, stale or tombstoned, and written
    records that left Redis but are missing from the archive or still look live there."""
    keys = [k for k in client.scan_iter(match="desto:*", count=1000) if is_record(k)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    hashes = dict(zip(keys, pipe.execute(), strict=True))
    archived = archived_rows(db_path)
    problems = []
    live = set()
    for key, fields in hashes.items():
        if not fields:
            continue  # left Redis between SCAN and read
        live.add(key)
        entity, record_id = entity_of(key)
        found = archived[entity.table].get(record_id)
        if found is None:
            problems.append(f"{key}: in Redis, not in the archive")
            continue
        if found["gone_at"] is not None:
            problems.append(f"{key}: in Redis, but tombstoned ({found['gone_reason']}) in the archive")
        wanted, got = entity.from_redis(fields), entity.from_row(found)
        if wanted != got:
            problems.append(f"{key}: Redis has {wanted}, the archive has {got}")
    for key in sorted(set(written) - live):
        entity, record_id = entity_of(key)
        found = archived[entity.table].get(record_id)
        if found is None:
            problems.append(f"{key}: written, gone from Redis, and not in the archive")
        elif found["gone_at"] is None:
            problems.append(f"{key}: gone from Redis, live in the archive")
    return problems


def assert_archive_equals_redis(client, db_path: Path, written: Iterable[str] = (), timeout: float = 15.0) -> None:
    """Wait until the archive equals Redis for every live record and holds every record written."""
    written = set(written)
    last: list[str] = []

    def equal() -> bool:
        last[:] = archive_differences(client, db_path, written)
        return not last

    try:
        wait_for(equal, timeout, interval=0.1, what="the archive to equal Redis")
    except AssertionError as exc:
        shown = "\n  ".join(last[:15])
        raise AssertionError(f"{exc}; {len(last)} difference(s):\n  {shown}") from None


def desto_view(key: str, fields: dict[str, str], db_path: Path) -> tuple[Any, Any, sqlite3.Row]:
    """(desto's object from the hash, desto's object from the archived row, the row)."""
    entity, record_id = entity_of(key)
    found = row(db_path, entity.table, entity.id_col, record_id)
    assert found is not None, f"{key} is not in the archive"
    return entity.from_redis(fields), entity.from_row(found), found


def archived(db_path: Path, key: str) -> sqlite3.Row | None:
    entity, record_id = entity_of(key)
    return row(db_path, entity.table, entity.id_col, record_id)


def heartbeat(db_path: Path) -> dict[str, Any] | None:
    found = row(db_path, "archiver_state", "name", "heartbeat")
    return json.loads(found["value"]) if found is not None else None


def notify_flags(client) -> str:
    return str(client.config_get("notify-keyspace-events")["notify-keyspace-events"])


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ─── desto, writing ───────────────────────────────────────────────────────────────────────────────


def write_session(client, **fields: str) -> tuple[str, dict[str, str]]:
    record = session_hash(**fields)
    key = f"desto:session:{record['session_id']}"
    client.hset(key, mapping=record)
    client.expire(key, DESTO_TTL)
    return key, record


def write_job(client, **fields: str) -> tuple[str, dict[str, str]]:
    record = job_hash(**fields)
    key = f"desto:job:{record['job_id']}"
    client.hset(key, mapping=record)
    client.expire(key, DESTO_TTL)
    return key, record


def write_favorite(client, **fields: str) -> tuple[str, dict[str, str]]:
    record = favorite_hash(**fields)
    key = f"desto:favorite:{record['favorite_id']}"
    client.hset(key, mapping=record)
    client.set(f"desto:favorite:name:{record['name']}", record["favorite_id"])
    client.sadd("desto:favorites:all", record["favorite_id"])
    return key, record


class DestoWriter(threading.Thread):
    """Writes records as desto 0.7.0 does, a few hundred changes a second: each session and its
    first job created whole with the 7-day TTL and a message on desto's channels, then moved through their statuses
    (job queued, running, finished or failed; session starting, running, finished or failed) with
    heartbeats in between; favorites created with desto's name index, and used."""

    def __init__(self, server: RedisServer, seed: int, pause: float = 0.003) -> None:
        super().__init__(name="desto-writer", daemon=True)
        self.client = server.client()
        self.rng = random.Random(seed)
        self.pause = pause
        self.errors: list[BaseException] = []
        self._written: set[str] = set()
        self._steps = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._open: list[list[Any]] = []  # [session_id, job_id, stage] of sessions still running
        self._favorites: list[str] = []

    @property
    def steps(self) -> int:
        with self._lock:
            return self._steps

    def written(self) -> set[str]:
        with self._lock:
            return set(self._written)

    def wait_steps(self, more: int, timeout: float = 15.0) -> None:
        target = self.steps + more
        wait_for(lambda: self.steps >= target or self.errors, timeout, what=f"the writer to reach step {target}")
        assert not self.errors, f"the writer failed: {self.errors[0]!r}"

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.client.close()

    def finish(self) -> set[str]:
        """Stop writing; every record key written."""
        self.halt()
        assert not self.is_alive(), "the writer did not stop"
        assert not self.errors, f"the writer failed: {self.errors[0]!r}"
        return self.written()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                roll = self.rng.random()
                if roll < 0.3 or not self._open:
                    self._create()
                elif roll < 0.75:
                    self._advance()
                elif roll < 0.85:
                    self._heartbeat()
                else:
                    self._favorite()
                with self._lock:
                    self._steps += 1
                time.sleep(self.pause)
        except BaseException as exc:  # surfaced to the test by finish()/wait_steps()
            self.errors.append(exc)

    def _done(self, *keys: str) -> None:
        with self._lock:
            self._written.update(keys)

    def _create(self) -> None:
        session = session_hash(status="starting", start_time="", last_heartbeat="", tmux_active="False")
        sid = session["session_id"]
        job = job_hash(session_id=sid, status="queued", start_time="")
        session["job_ids"] = job["job_id"]
        skey, jkey = f"desto:session:{sid}", f"desto:job:{job['job_id']}"
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(skey, mapping=session)
        pipe.expire(skey, DESTO_TTL)
        pipe.hset(jkey, mapping=job)
        pipe.expire(jkey, DESTO_TTL)
        pipe.publish("desto:session_updates", self._message(sid, session["session_name"], "starting"))
        pipe.execute()
        self._done(skey, jkey)
        self._open.append([sid, job["job_id"], 0])

    def _advance(self) -> None:
        i = self.rng.randrange(len(self._open))
        sid, jid, stage = self._open[i]
        skey, jkey = f"desto:session:{sid}", f"desto:job:{jid}"
        now = now_iso()
        pipe = self.client.pipeline(transaction=False)
        if stage == 0:  # desto starts the job, then the session
            pipe.hset(jkey, mapping={"status": "running", "start_time": now})
            pipe.publish("desto:job_updates", json.dumps({"job_id": jid, "session_id": sid, "status": "running"}))
            pipe.hset(skey, mapping={"status": "running", "start_time": now, "last_heartbeat": now})
            pipe.hset(skey, "tmux_active", "True")
            pipe.publish("desto:session_updates", self._message(sid, f"s-{sid[:8]}", "running"))
        elif stage == 1:  # the job ends
            failed = self.rng.random() < 0.3
            status = "failed" if failed else "finished"
            pipe.hset(
                jkey,
                mapping={
                    "status": status,
                    "end_time": now,
                    "exit_code": "1" if failed else "0",
                    "error_message": "exit status 1" if failed else "",
                },
            )
            pipe.publish(
                "desto:job_updates",
                json.dumps({"job_id": jid, "session_id": sid, "status": status, "timestamp": now}),
            )
        else:  # the session ends
            status = self.rng.choice(["finished", "failed"])
            pipe.hset(skey, mapping={"status": status, "end_time": now, "tmux_active": "False"})
            pipe.publish("desto:session_updates", self._message(sid, f"s-{sid[:8]}", status))
        pipe.execute()
        if stage == 2:
            self._open.pop(i)
        else:
            self._open[i][2] += 1

    def _heartbeat(self) -> None:
        sid = self.rng.choice(self._open)[0]
        self.client.hset(f"desto:session:{sid}", "last_heartbeat", now_iso())

    def _favorite(self) -> None:
        if not self._favorites or self.rng.random() < 0.4:
            key, _ = write_favorite(self.client)
            self._favorites.append(key)
            self._done(key)
            return
        key = self.rng.choice(self._favorites)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "use_count", 1)
        pipe.hset(key, "last_used_at", now_iso())
        pipe.execute()

    @staticmethod
    def _message(sid: str, name: str, status: str) -> str:
        return json.dumps({"session_id": sid, "session_name": name, "status": status, "timestamp": now_iso()})


@pytest.fixture
def writers() -> Iterator[Callable[..., DestoWriter]]:
    started: list[DestoWriter] = []

    def start(server: RedisServer, seed: int = 0) -> DestoWriter:
        writer = DestoWriter(server, seed)
        started.append(writer)
        writer.start()
        return writer

    yield start
    for writer in started:
        if writer.is_alive():
            writer.halt()


# ─── the daemon, as a process ─────────────────────────────────────────────────────────────────────


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """The log events called ``name`` whose fields include ``fields``, in order."""
        if not self.log.exists():
            return []
        return [
            e for e in log_events(self.log) if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_log(self, name: str, count: int = 1, timeout: float = 15.0, **fields: Any) -> list[dict[str, Any]]:
        """Wait for ``count`` such events; fail at once if the daemon exits first."""

        def logged() -> list[dict[str, Any]] | None:
            hits = self.events(name, **fields)
            if len(hits) >= count:
                return hits
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before logging {name} {fields}")
            return None

        return wait_for(logged, timeout, what=f"log event {name} {fields} x{count} in {self.log}")

    def wait_reconcile(self, reason: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        """The ``count``-th reconcile.done with ``reason``."""
        return self.wait_log("reconcile.done", count, timeout, reason=reason)[count - 1]

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Starts ``python -m archiver run`` processes; kills whatever is left at the end, and prints
    each one's log (shown by pytest when the test fails)."""
    started: list[DaemonProcess] = []

    def start(server: RedisServer, db_path: Path, **env: str) -> DaemonProcess:
        log = tmp_path / f"daemon-{len(started)}.log"
        daemon = DaemonProcess(start_daemon_process(server, db_path, log, **env), log)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.wait(timeout=10)
        text = daemon.log.read_text() if daemon.log.exists() else ""
        print(f"--- {daemon.log.name} (pid {daemon.pid}, exit {daemon.proc.returncode}) ---\n{text[-6000:]}")


def start_ready(start: Callable[..., DaemonProcess], server: RedisServer, db_path: Path, **env: str) -> DaemonProcess:
    """A daemon that has subscribed and finished its first reconcile."""
    daemon = start(server, db_path, **env)
    daemon.wait_reconcile("start")
    return daemon


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server without persistence: a restart empties it."""
    server = RedisServer(tmp_path / "volatile-redis", appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def configless_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that refuses CONFIG (as managed Redis services do), notifications off."""
    server = RedisServer(tmp_path / "configless-redis", extra=["--rename-command", "CONFIG", ""]).start()
    yield server
    server.stop()


# ─── 1. the archiver killed and restarted under load ─────────────────────────────────────────────


@pytest.mark.slow
def test_sigkill_and_restart_under_load_loses_nothing(redis_server, redis, db_path, daemons, writers):
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
    assert_archive_equals_redis(redis, db_path, written, timeout=20)
    assert daemon.proc.poll() is None
    assert not daemon.events("record.quarantined")


# ─── 2. Redis restarted with its data (AOF) ──────────────────────────────────────────────────────


def test_redis_restart_with_aof_renews_notifications_and_reconciles(fresh_redis, db_path, daemons):
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
        assert_archive_equals_redis(client, db_path, [*keys, new_job], timeout=3)
        assert len(daemon.events("reconcile.done")) == 2
        assert daemon.proc.poll() is None
    finally:
        client.close()


# ─── 3. Redis restarted empty ────────────────────────────────────────────────────────────────────


def test_redis_restart_without_persistence_tombstones_as_missing(volatile_redis, db_path, daemons):
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
        assert_archive_equals_redis(client, db_path, keys, timeout=1)
    finally:
        client.close()


# ─── 4. no notifications and no CONFIG: fallback reconciliation ─────────────────────────────────


def test_config_refused_falls_back_to_frequent_reconciles(configless_redis, db_path, daemons):
    client = configless_redis.client()
    try:
        with pytest.raises(redis_lib.ResponseError, match="unknown command"):
            client.config_get("notify-keyspace-events")
        daemon = start_ready(daemons, configless_redis, db_path, ARCHIVER_FALLBACK_RECONCILE_INTERVAL="1")
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
        assert_archive_equals_redis(client, db_path, [key, later], timeout=5)
        assert len(daemon.events("notifications.unavailable")) == 1
        assert daemon.proc.poll() is None
        assert heartbeat(db_path)["notifications"] is False
    finally:
        client.close()


# ─── 5. SIGTERM and SIGINT flush what is pending ─────────────────────────────────────────────────


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_flushes_pending_batch(signum, redis_server, redis, db_path, daemons):
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
    assert_archive_equals_redis(redis, db_path, [key], timeout=1)


# ─── 6. one daemon per file ──────────────────────────────────────────────────────────────────────


def test_second_daemon_on_same_file_is_refused(redis_server, redis, db_path, daemons):
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
    assert_archive_equals_redis(redis, db_path, [key], timeout=5)


# ─── 7. the pub/sub connection killed by the server ──────────────────────────────────────────────


@pytest.mark.slow
def test_pubsub_connection_killed_reconnects_without_loss(redis_server, redis, db_path, daemons, writers):
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
    assert_archive_equals_redis(redis, db_path, written, timeout=20)
    assert heartbeat(db_path)["reconnects"] == 3
    assert daemon.proc.poll() is None


# ─── 8. Redis frozen: a half-open connection ─────────────────────────────────────────────────────


@pytest.mark.slow
def test_frozen_redis_half_open_connection_is_replaced(fresh_redis, db_path, daemons):
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
        assert_archive_equals_redis(client, db_path, [before, after], timeout=3)
        assert daemon.proc.poll() is None
    finally:
        client.close()


# ─── 9. the SQLite file locked by another writer ─────────────────────────────────────────────────


@pytest.fixture
def tight_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that drops a subscriber whose unread output passes 256 kB."""
    server = RedisServer(tmp_path / "tight-redis").start()
    client = server.client()
    client.config_set("client-output-buffer-limit", "pubsub 256kb 64kb 1")
    client.close()
    yield server
    server.stop()


def pubsub_clients(client) -> dict[str, str]:
    return {c["name"]: c["id"] for c in client.client_list(_type="pubsub")}


@pytest.mark.slow
def test_locked_sqlite_does_not_stall_the_listener(tight_redis, db_path, daemons):
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
        assert_archive_equals_redis(client, db_path, [*before, *jobs], timeout=15)

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
