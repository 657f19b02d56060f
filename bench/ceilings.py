"""1. Ceilings: what a Python process can do at best against this Redis and this SQLite, same run.

(a) redis-py (hiredis parser, ``decode_responses=False`` as the archiver) reading desto-shaped
    session hashes (``tests.helpers.session_hash``) with pipelined HGETALL, 500 per pipeline:
    keys/s.
(b) sqlite3 upserting the same rows into the archive's own schema (the file created by
    ``archiver.archive.store.Store.open``, so WAL and ``synchronous=NORMAL`` as the daemon has them):
    ``executemany`` of ``INSERT ... ON CONFLICT(session_id) DO UPDATE`` into ``sessions``, one
    ``BEGIN IMMEDIATE`` transaction per 500 rows, into a fresh file (the rows are new, as in the
    live-ingest and backfill benchmarks): rows/s. The rows are built before the clock starts.

Each is run several times (full: 3) and the best pass is the ceiling: a ceiling is an upper
bound, and on a noisy machine the best pass is the one least disturbed. The ceiling of a Python
archiver is the smaller of the two; the other benchmarks divide by these.

For reference (no target), the same keys are also read through the archiver's own read path,
``archiver.redis_side.source.Source.fetch`` (one Lua script per 500 keys: TIME, then TYPE + HGETALL + PTTL
per key), whose one reply per batch avoids redis-py's per-command pipeline cost.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from archiver.archive.store import Store
from archiver.archive.writer import HISTORY_INSERT, insert_columns
from archiver.config import load_settings
from archiver.kinds import Kind
from archiver.models import sqlite_utc
from archiver.redis_side.source import Source
from bench.common import Context, Figure, median
from bench.records import load_records, record_id, session_key

NAME = "ceilings"
BATCH = 500

SESSION_COLUMNS = insert_columns(Kind.SESSION)  # the order session_row builds its values in
_KEEP_ON_UPDATE = {"session_id", "created_at", "first_seen_at"}
UPSERT = (
    f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) VALUES ({', '.join('?' * len(SESSION_COLUMNS))}) "
    "ON CONFLICT(session_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in SESSION_COLUMNS if c not in _KEEP_ON_UPDATE)
)


def sqlite_ceiling_at(
    path: Path, rows: int, per_transaction: int = 500, bulk: bool = False, history: bool = False
) -> float:
    """Ceiling 1(b)'s upsert over ``rows`` rows, generated one transaction's worth at a time
    (memory stays flat) off the clock, as 1(b)'s rows are built before its clock starts.
    ``bulk``: as a first backfill loads a file, the secondary indexes dropped first and built
    at the end (``Store.defer_indexes``/``restore_indexes``), the building timed too.
    ``history``: each row also gets the status-history row that records its creation, in the
    same transaction and in id order, as the archiver's writer adds them: what the archive must
    hold for every new record."""
    store = Store.open(path)
    conn = store.conn
    rng = random.Random(rows)
    tail = ("2026-11-26 10:00:00", "2026-11-26 10:00:00", 1, "x", "x", None, None, "running")
    stamp = "2026-11-26T10:00:00.000000"
    elapsed = 0.0
    try:
        started = time.perf_counter()
        if bulk:
            store.defer_indexes()
        for done in range(0, rows, per_transaction):
            elapsed += time.perf_counter() - started
            batch = []
            for _ in range(min(per_transaction, rows - done)):
                sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                batch.append((sid, f"s-{sid[:8]}", f"s-{sid[:8]}", "running", stamp, None, stamp, "", 1, "", *tail))
            created = (
                sorted(("session", row[0], "first_seen", "running", None, None, stamp, None, "redis") for row in batch)
                if history
                else []
            )
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(UPSERT, batch)
            if created:
                conn.executemany(HISTORY_INSERT, created)
            conn.execute("COMMIT")
        if bulk:
            store.restore_indexes()
        elapsed += time.perf_counter() - started
        stored = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sessions", "status_history")]
    finally:
        store.close()
    if stored != [rows, rows if history else 0]:
        raise AssertionError(f"{rows} rows upserted, {stored} rows in sessions and status_history")
    assert len(SESSION_COLUMNS) == 18
    return rows / elapsed


def session_row(fields: dict[bytes, bytes], read_at_us: int) -> tuple[Any, ...]:
    """One HGETALL reply as a row of the archive's ``sessions`` table."""
    f = {k.decode(): v.decode() for k, v in fields.items()}
    seen = sqlite_utc(read_at_us)
    return (
        f["session_id"],
        f["session_name"],
        f["tmux_session_name"],
        f["status"],
        f["start_time"] or None,
        f["end_time"] or None,
        f["last_heartbeat"] or None,
        f["job_ids"],
        1 if f["tmux_active"].lower() == "true" else 0,
        f["at_job_id"],
        seen,
        seen,
        read_at_us,
        seen,
        seen,
        None,
        None,
        f["status"],
    )


def redis_pass(client: redis.Redis, keys: list[bytes]) -> tuple[float, list[Any]]:
    replies: list[Any] = []
    t0 = time.perf_counter()
    for start in range(0, len(keys), BATCH):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + BATCH]:
            pipe.hgetall(key)
        replies.extend(pipe.execute())
    elapsed = time.perf_counter() - t0
    return len(keys) / elapsed, replies


def fetch_pass(source: Source, keys: list[bytes]) -> float:
    t0 = time.perf_counter()
    read = 0
    for start in range(0, len(keys), BATCH):
        read += sum(1 for f in source.fetch(keys[start : start + BATCH]) if f.redis_type == "hash")
    elapsed = time.perf_counter() - t0
    if read != len(keys):
        raise AssertionError(f"Source.fetch read {read} hashes of {len(keys)}")
    return len(keys) / elapsed


def sqlite_pass(path: Path, rows: list[tuple[Any, ...]]) -> float:
    store = Store.open(path)
    conn = store.conn
    try:
        t0 = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(UPSERT, rows[start : start + BATCH])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        stored = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    finally:
        store.close()
    if stored != len(rows):
        raise AssertionError(f"the sqlite ceiling stored {stored} rows of {len(rows)}")
    return len(rows) / elapsed


def run(ctx: Context) -> None:
    n = 5_000 if ctx.smoke else 100_000
    passes = 1 if ctx.smoke else 3
    tag = ctx.tag()
    details: dict[str, Any] = {"keys": n, "passes": passes, "batch": BATCH}
    ctx.details[NAME] = details
    with ctx.redis(NAME) as server:
        ctx.log(f"ceilings: loading {n:,} session hashes")
        load_records(server.port, 0, n, tag, jobs=False, ttl=False)
        keys = [session_key(record_id(i, tag)) for i in range(n)]
        client = redis.Redis(port=server.port, decode_responses=False, socket_timeout=30)
        try:
            redis_rates = []
            replies: list[Any] = []
            for _ in range(passes):
                rate, replies = redis_pass(client, keys)
                redis_rates.append(rate)
        finally:
            client.close()
        source = Source(load_settings(redis_url=server.url))
        try:
            fetch_rates = [fetch_pass(source, keys) for _ in range(passes)]
        finally:
            source.close()
    if len(replies) != n or not all(len(r) == 10 for r in replies):
        raise AssertionError("the redis ceiling did not read every hash whole")
    read_at = time.time_ns() // 1000
    rows = [session_row(r, read_at) for r in replies]
    ctx.log(f"ceilings: redis {max(redis_rates):,.0f} keys/s; sqlite upserts of {n:,} rows")
    sqlite_rates = [sqlite_pass(ctx.fresh_dir("ceiling-sqlite") / "desto.db", rows) for _ in range(passes)]
    details.update(redis_keys_per_s=redis_rates, sqlite_rows_per_s=sqlite_rates, fetch_keys_per_s=fetch_rates)

    a, b = max(redis_rates), max(sqlite_rates)
    ctx.ceilings.update(redis=a, sqlite=b, min=min(a, b))
    spread = "" if passes == 1 else "best of {}; median {}"
    ctx.add(
        Figure(
            NAME,
            "1(a) redis-py pipelined HGETALL, 500 per pipeline",
            a,
            "keys/s",
            note=spread.format(passes, f"{median(redis_rates):,.0f}"),
        )
    )
    ctx.add(
        Figure(
            NAME,
            "1(b) sqlite3 upsert into sessions, 500 per transaction",
            b,
            "rows/s",
            note=spread.format(passes, f"{median(sqlite_rates):,.0f}"),
        )
    )
    ctx.add(
        Figure(
            NAME,
            "for reference: the archiver's Source.fetch (Lua), 500 per call",
            max(fetch_rates),
            "keys/s",
            baseline=a,
            baseline_name="1(a)",
            note=spread.format(passes, f"{median(fetch_rates):,.0f}"),
        )
    )
    ctx.log(f"ceilings: sqlite {b:,.0f} rows/s; Source.fetch {max(fetch_rates):,.0f} keys/s")
