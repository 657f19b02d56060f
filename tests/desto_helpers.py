"""desto's own classes against the test Redis, and the comparison the archive is held to: desto's
``SQLiteStore`` reading the archive returns exactly what desto's models read from Redis."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py
from desto.redis import DestoJob, DestoManager, DestoRedisClient, DestoSession, SessionStatus, SQLiteStore
from desto.redis.models import FavoriteCommand
from loguru import logger

from archiver.log import configure
from tests.fault_helpers import assert_archive_equals_redis, atjob_from_row
from tests.helpers import query, wait_for

RECORD_TABLES = {"session": "sessions", "job": "jobs", "favorite": "favorites", "atjob": "at_jobs"}
ID_COLUMNS = {"sessions": "session_id", "jobs": "job_id", "favorites": "favorite_id", "at_jobs": "at_job_id"}


def desto_client(server) -> DestoRedisClient:
    """desto's own Redis client, as desto builds it from REDIS_HOST/REDIS_PORT/REDIS_DB."""
    client = DestoRedisClient(config={"host": "127.0.0.1", "port": server.port, "db": 0, "enabled": True})
    assert client.is_connected(), "desto could not reach the test Redis"
    return client


def start_session(
    manager: DestoManager,
    r: redis_py.Redis,
    name: str,
    command: str,
    script_path: str,
    status: SessionStatus | None = None,
) -> tuple[DestoSession, DestoJob]:
    """``start_session_with_job``; for a session that runs, also wait for its first heartbeat.

    desto's heartbeat thread rewrites the whole session hash (read, modify, HSET) right after the
    session starts and then every 5 s: waiting for that first write keeps the session's next
    changes clear of it, as they are in a real session, which runs for a while.
    """
    session, job = manager.start_session_with_job(name, command, script_path, status=status)
    if status != SessionStatus.SCHEDULED:
        key = f"desto:session:{session.session_id}"
        started_beat = session.last_heartbeat.isoformat()
        wait_for(lambda: r.hget(key, "last_heartbeat") != started_beat, 10, what=f"first heartbeat of {name}")
    return session, job


def redis_session(r: redis_py.Redis, session_id: str) -> DestoSession:
    return DestoSession.from_dict(r.hgetall(f"desto:session:{session_id}"))


def redis_job(r: redis_py.Redis, job_id: str) -> DestoJob:
    return DestoJob.from_dict(r.hgetall(f"desto:job:{job_id}"))


def redis_favorite(r: redis_py.Redis, favorite_id: str) -> FavoriteCommand:
    return FavoriteCommand.from_dict(r.hgetall(f"desto:favorite:{favorite_id}"))


@dataclass
class RedisView:
    """Every desto record in Redis, read with desto's own models (at-jobs as their raw hash)."""

    sessions: dict[str, DestoSession] = field(default_factory=dict)
    jobs: dict[str, DestoJob] = field(default_factory=dict)
    favorites: dict[str, FavoriteCommand] = field(default_factory=dict)
    atjobs: dict[str, dict[str, str]] = field(default_factory=dict)
    indexes: list[str] = field(default_factory=list)  # desto's favorite name index and favorites set
    unknown: list[str] = field(default_factory=list)  # anything else under desto:

    def ids(self, table: str) -> set[str]:
        records: dict[str, Any] = {
            "sessions": self.sessions,
            "jobs": self.jobs,
            "favorites": self.favorites,
            "at_jobs": self.atjobs,
        }[table]
        return set(records)


def read_redis(r: redis_py.Redis) -> RedisView:
    view = RedisView()
    for key in r.scan_iter(match="desto:*", count=1000):
        if key == "desto:favorites:all" or key.startswith("desto:favorite:name:"):
            view.indexes.append(key)
            continue
        prefix, _, record_id = key.removeprefix("desto:").partition(":")
        if prefix not in RECORD_TABLES or not record_id:
            view.unknown.append(key)
            continue
        fields = r.hgetall(key)
        if not fields:  # deleted between SCAN and HGETALL
            continue
        if prefix == "session":
            view.sessions[record_id] = DestoSession.from_dict(fields)
        elif prefix == "job":
            view.jobs[record_id] = DestoJob.from_dict(fields)
        elif prefix == "favorite":
            view.favorites[record_id] = FavoriteCommand.from_dict(fields)
        else:
            view.atjobs[record_id] = fields
    return view


def archived_favorites(store: SQLiteStore) -> dict[str, FavoriteCommand]:
    return {favorite.favorite_id: favorite for favorite in store.get_all_favorites()}


def archived_atjob(db_path: Path, at_job_id: str) -> dict[str, str] | None:
    rows = query(db_path, "SELECT * FROM at_jobs WHERE at_job_id = ?", (at_job_id,))
    return atjob_from_row(rows[0]) if rows else None


def settle(r: redis_py.Redis, db_path: Path, timeout: float = 15.0) -> RedisView:
    """Wait until the archive equals Redis (failing with what differs); Redis as it then was."""
    assert_archive_equals_redis(r, db_path, (), timeout)
    return read_redis(r)


@dataclass(frozen=True)
class HistoryEntry:
    event: str
    status: str | None
    previous_status: str | None
    detail: str | None
    desto_timestamp: str | None
    source: str


def history(db_path: Path, kind: str, record_id: str) -> list[HistoryEntry]:
    rows = query(
        db_path,
        "SELECT event, status, previous_status, detail, desto_timestamp, source FROM status_history "
        "WHERE kind = ? AND record_id = ? ORDER BY id",
        (kind, record_id),
    )
    return [HistoryEntry(*row) for row in rows]


def transitions(db_path: Path, kind: str, record_id: str) -> list[tuple[str | None, str | None]]:
    """The status changes recorded for a record, as (status, previous status)."""
    return [
        (entry.status, entry.previous_status)
        for entry in history(db_path, kind, record_id)
        if entry.event in ("first_seen", "status")
    ]


def renames(db_path: Path, favorite_id: str) -> list[dict[str, str]]:
    return [json.loads(e.detail or "{}") for e in history(db_path, "favorite", favorite_id) if e.event == "renamed"]


@contextmanager
def desto_log() -> Iterator[list[str]]:
    """desto's loguru errors, and its debug reports of a failed SQLite write, while the block runs."""
    captured: list[str] = []

    def sink(message: Any) -> None:
        record = message.record
        text = str(record["message"])
        if record["level"].no >= 40 or "SQLite archive failed" in text:
            captured.append(f"{record['level'].name} {record['name']}: {text}")

    sink_id = logger.add(sink, level="DEBUG")
    try:
        yield captured
    finally:
        logger.remove(sink_id)


def sqlite_failures(captured: list[str]) -> list[str]:
    return [line for line in captured if "SQLite" in line]


@contextmanager
def archiver_log() -> Iterator[list[dict[str, Any]]]:
    """The daemon's log events (its JSON lines, parsed), as they are written, while the block runs."""
    events: list[dict[str, Any]] = []

    class Lines(io.TextIOBase):
        def write(self, text: str) -> int:
            for line in text.splitlines():
                with suppress(ValueError):
                    events.append(json.loads(line))
            return len(text)

    configure("json", "debug", stream=Lines())
    try:
        yield events
    finally:
        configure("json", "debug")


def problems(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event.get("level") in ("warning", "error", "critical")]
