"""What the fault tests share: desto's view of a record from Redis and from the archive, the check
that the archive equals Redis and lost nothing, a desto-like writer, the daemon as a process, and
the reliability report each fault scenario adds a row to (the documentation's "Reliability" page).
"""

from __future__ import annotations

import functools
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tests.helpers import (
    REPO,
    atjob_hash,
    daemon_env,
    favorite_hash,
    job_hash,
    log_events,
    now_iso,
    query,
    row,
    session_hash,
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


# An at-job's fields, as desto's AtJobManager writes them; desto has no reader for them, and the
# archive keeps each one as the text Redis holds ('' for a field the hash lacks).
AT_JOB_FIELDS = (
    "job_id",
    "command",
    "request_time",
    "scheduled_time",
    "user",
    "status",
    "creation_time",
    "queue",
    "session_name",
    "script_path",
    "arguments",
    "error_message",
    "execution_result",
)


def atjob_from_redis(fields: dict[str, str]) -> dict[str, str]:
    return {name: fields.get(name, "") for name in AT_JOB_FIELDS}


def atjob_from_row(found: sqlite3.Row) -> dict[str, str]:
    return {name: found[name] for name in AT_JOB_FIELDS}


RECORD_PREFIXES = ("desto:session:", "desto:job:", "desto:favorite:", "desto:atjob:")


@functools.cache
def entities() -> tuple[Entity, ...]:
    """Each record kind, read as desto reads it. desto is imported here, not with this module, so
    the unit tests (which use the launchers and the report, not desto) run without it."""
    from desto.redis.models import DestoJob, DestoSession, FavoriteCommand
    from desto.redis.sqlite_store import SQLiteStore

    return (
        Entity("desto:session:", "sessions", "session_id", DestoSession.from_dict, SQLiteStore._row_to_session),
        Entity("desto:job:", "jobs", "job_id", DestoJob.from_dict, SQLiteStore._row_to_job),
        Entity("desto:favorite:", "favorites", "favorite_id", FavoriteCommand.from_dict, SQLiteStore._row_to_favorite),
        Entity("desto:atjob:", "at_jobs", "at_job_id", atjob_from_redis, atjob_from_row),
    )


def is_record(key: str) -> bool:
    """A session, job, favorite or at-job hash (not one of desto's favorite indexes)."""
    return not key.startswith("desto:favorite:name:") and key.startswith(RECORD_PREFIXES)


def entity_of(key: str) -> tuple[Entity, str]:
    """The record kind and id of a record's key."""
    assert is_record(key), key
    entity = next(e for e in entities() if key.startswith(e.prefix))
    return entity, key[len(entity.prefix) :]


def archived_rows(db_path: Path) -> dict[str, dict[str, sqlite3.Row]]:
    return {e.table: {r[e.id_col]: r for r in query(db_path, f"SELECT * FROM {e.table}")} for e in entities()}


def archived_keys(db_path: Path) -> set[str]:
    return {e.prefix + record_id for e in entities() for record_id in archived_rows(db_path)[e.table]}


def archive_differences(client, db_path: Path, written: Iterable[str] = ()) -> list[str]:
    """How the archive differs from Redis, each record read on both sides the way desto reads it
    (its models from the hash, its SQLiteStore's row readers from the file; at-jobs field by
    field): live records missing, stale or tombstoned, and written records that left Redis but
    are missing from the archive or still look live there. The one comparison every test holds
    the archive to."""
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
    heartbeats in between; favorites created with desto's name index, and used; at-jobs scheduled,
    then finished or cancelled."""

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
        self._pause = threading.Event()
        self._paused = threading.Event()  # the writer has seen the pause: no step is under way
        self._open: list[list[Any]] = []  # [session_id, job_id, stage] of sessions still running
        self._favorites: list[str] = []
        self._atjobs: list[str] = []  # at-jobs still scheduled
        self._atjob_number = self.rng.randrange(1, 1_000_000) * 1000  # at(1)'s job numbers

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

    def hold(self) -> None:
        """Stop writing until :meth:`go_on`; returns once no step is under way."""
        self._pause.set()
        wait_for(lambda: self._paused.is_set() or not self.is_alive(), 10, what="the writer to pause")
        assert not self.errors, f"the writer failed: {self.errors[0]!r}"

    def go_on(self) -> None:
        self._paused.clear()
        self._pause.clear()

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
                if self._pause.is_set():
                    self._paused.set()
                    time.sleep(0.005)
                    continue
                roll = self.rng.random()
                if roll < 0.3 or not self._open:
                    self._create()
                elif roll < 0.72:
                    self._advance()
                elif roll < 0.82:
                    self._heartbeat()
                elif roll < 0.94:
                    self._favorite()
                else:
                    self._atjob()
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

    def _atjob(self) -> None:
        """An `at` job scheduled (desto's AtJobManager: one HMSET, no TTL), or one that was
        scheduled ending: desto marks it finished or cancelled."""
        if self._atjobs and self.rng.random() < 0.5:
            key = self._atjobs.pop(self.rng.randrange(len(self._atjobs)))
            status = self.rng.choice(["finished_internal", "cancelled"])
            self.client.hset(key, mapping={"status": status, "execution_result": f"{status} at {now_iso()}"})
            return
        self._atjob_number += 1
        number = str(self._atjob_number)
        key = f"desto:atjob:{number}"
        self.client.hset(key, mapping=atjob_hash(number, session_name=f"at-{number}"))
        self._atjobs.append(key)
        self._done(key)

    @staticmethod
    def _message(sid: str, name: str, status: str) -> str:
        return json.dumps({"session_id": sid, "session_name": name, "status": status, "timestamp": now_iso()})


# ─── the daemon, as a process ─────────────────────────────────────────────────────────────────────


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    copier: threading.Thread | None = None  # copies the daemon's stderr pipe into ``log``

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

    def close(self) -> None:
        """Kill the daemon if it still runs, reap it, and wait for its last log lines."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.copier is not None:
            self.copier.join(timeout=10)


def spawn_daemon(
    server: RedisServer,
    db_path: Path,
    log: Path,
    *,
    piped: bool = False,
    wrapper: Sequence[str] = (),
    **env: str,
) -> DaemonProcess:
    """``python -m archiver run``; its log lines go to ``log``, written by the daemon itself or, when
    ``piped``, through a pipe the test copies (as a service manager collects a daemon's stderr: the
    daemon's own file-size limit then does not apply to its log). ``wrapper`` is a command the
    daemon is started under, as a user would (``nohup``)."""
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "archiver", "run"],
            cwd=REPO,
            env=daemon_env(server, db_path, **env),
            stdout=log_file,
            stderr=subprocess.PIPE if piped else log_file,
        )
    copier = None
    if piped:
        assert proc.stderr is not None
        copier = threading.Thread(target=_copy_lines, args=(proc.stderr, log), name="daemon-log", daemon=True)
        copier.start()
    return DaemonProcess(proc, log, copier)


def _copy_lines(source: IO[bytes], log: Path) -> None:
    with source, open(log, "ab", buffering=0) as out:
        for line in source:
            out.write(line)


def start_ready(start: Callable[..., DaemonProcess], server: RedisServer, db_path: Path, **env: str) -> DaemonProcess:
    """A daemon that has subscribed and finished its first reconcile."""
    daemon = start(server, db_path, **env)
    daemon.wait_reconcile("start")
    return daemon


def pubsub_clients(client) -> dict[str, str]:
    return {c["name"]: c["id"] for c in client.client_list(_type="pubsub")}


# ─── the reliability report ──────────────────────────────────────────────────────────────────────

FULL_SIZE = os.environ.get("RELIABILITY_FULL", "") not in ("", "0")


@dataclass
class Reliability:
    """One row of the reliability table: a fault, how it was injected, and what the archive held after."""

    fault: str
    injection: str
    records_written: int | None = None  # distinct records the workload wrote to Redis
    records_in_archive: int | None = None  # how many of them the archive holds (live or tombstoned)
    lost: int | None = None  # written, and not in the archive
    measured: dict[str, Any] = field(default_factory=dict)  # what else the scenario measured

    def count(self, db_path: Path, written: Iterable[str]) -> None:
        written = set(written)
        held = len(written & archived_keys(db_path))
        self.records_written, self.records_in_archive, self.lost = len(written), held, len(written) - held

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def settle(report: Reliability, client, db_path: Path, written: Iterable[str], timeout: float = 15.0) -> None:
    """The end of every fault scenario: wait until the archive equals Redis for every live record and
    holds every record written, then count what the archive holds for the report (also on failure)."""
    written = set(written)
    try:
        assert_archive_equals_redis(client, db_path, written, timeout)
    finally:
        report.count(db_path, written)
    assert report.lost == 0, f"{report.lost} record(s) lost"
