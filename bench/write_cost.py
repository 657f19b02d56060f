"""``python -m bench.write_cost``: where the daemon's writing time goes, per statement, in one thread.

The live-ingest and backfill benchmarks measure whole processes; this one isolates the store. It
opens a fresh archive (``Store.open``, the daemon's settings and page cache), normalizes
``--rows`` new desto-shaped session records in memory (no Redis), and applies them through the
daemon's own write path (``archiver.daemon.reconcile.write_batch``) in transactions of
``--per-transaction`` rows. Every statement the store runs is timed, and the cost per row of
each kind of statement (the version guard's SELECT, the inserts, the status-history rows, the
COMMIT, the WAL's restart) is printed with the total; what is left is Python. Each transaction's
rows are built off the clock.

    .venv/bin/python -m bench.write_cost --rows 300000 --per-transaction 8000
    .venv/bin/python -m bench.write_cost --rows 600000 --per-transaction 8000   # a bigger file

With desto's random ids each commit rewrites index pages spread over the whole file, so the cost
per row grows with the file and falls with the transaction's size; run it at several of each.
``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from archiver.archive import changelog
from archiver.archive.erase import note
from archiver.archive.store import Store
from archiver.daemon.archive_file import DAEMON_CACHE_MB
from archiver.daemon.reconcile import write_batch
from archiver.keys import classify
from archiver.kinds import Kind
from archiver.models import Fetched, Outcome, normalize
from bench.records import DESTO_TTL_SECONDS, record_id, session_key
from tests.helpers import session_hash

_TTL_MS = DESTO_TTL_SECONDS * 1000
_STAMP = "2026-11-27T05:00:00.123456"


class TimedConnection:
    """The store's connection, with each statement's time added to its kind's total."""

    def __init__(self, conn: sqlite3.Connection, totals: Counter[str]) -> None:
        self._conn, self._totals = conn, totals

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        cursor = self._conn.execute(sql, *args)
        if sql.lstrip().upper().startswith("SELECT"):
            cursor = _Rows(cursor.fetchall())  # the rows are read here, not by the caller
        self._totals[statement_kind(sql)] += time.perf_counter() - started
        return cursor

    def executemany(self, sql: str, params: Iterable[Any]) -> Any:
        started = time.perf_counter()
        cursor = self._conn.executemany(sql, params)
        self._totals[statement_kind(sql)] += time.perf_counter() - started
        return cursor


class _Rows(list[Any]):
    """A SELECT's rows, read already: iterated or fetched as from a cursor."""

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> list[Any]:
        return list(self)


def statement_kind(sql: str) -> str:
    """A short name for a statement: its verb and table (``INSERT sessions``, ``COMMIT``, ...)."""
    words = sql.replace("(", " ").split()
    verb = words[0].upper()
    if verb in ("INSERT", "SELECT", "DELETE"):
        upper = [word.upper() for word in words]
        marker = "INTO" if verb == "INSERT" else "FROM"
        if marker in upper[:-1]:
            return f"{verb} {words[upper.index(marker) + 1]}"
    if verb in ("UPDATE", "PRAGMA") and len(words) > 1:
        return f"{verb} {words[1]}"
    return verb


def outcomes(start: int, count: int, read_at_us: int) -> list[Outcome]:
    out = []
    for i in range(start, start + count):
        rid = record_id(i, "beef")
        record = session_hash(rid.decode(), start_time=_STAMP, last_heartbeat=_STAMP)
        flat = [part.encode() for pair in record.items() for part in pair]
        key = session_key(rid)
        out.append(normalize(classify(key), Fetched(key, "hash", flat, _TTL_MS, read_at_us + i, read_at_us + i)))
    return out


def measure(
    path: Path, rows: int, per_transaction: int, cache_mb: int, erased: int = 0, change_log: bool = False
) -> dict[str, Any]:
    """Each transaction's records are normalized off the clock, one transaction at a time (memory
    stays flat at any ``rows``); only ``write_batch`` is timed. ``erased``: ids noted as erased
    first (other than the rows'), as a Clear History of that many records leaves them, so every
    new row is looked up among them. ``change_log``: with the triggers that keep the change log for
    shipping to PostgreSQL."""
    read_at_us = time.time_ns() // 1000
    store = Store.open(path, cache_mb=cache_mb)
    changelog.set_enabled(store.conn, change_log)
    if erased:
        with store.transaction() as conn:
            note(conn, ((Kind.SESSION, record_id(i, "dead").decode()) for i in range(erased)), "desto", read_at_us)
    totals: Counter[str] = Counter()
    store.conn = TimedConnection(store.conn, totals)  # type: ignore[assignment]
    elapsed = 0.0
    try:
        for start in range(0, rows, per_transaction):
            batch = outcomes(start, min(per_transaction, rows - start), read_at_us)
            started = time.perf_counter()
            write_batch(store, batch)
            elapsed += time.perf_counter() - started
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        written = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    if written != rows:
        raise AssertionError(f"{rows} rows applied, {written} in the file")
    per_row = {kind: seconds / rows * 1e6 for kind, seconds in totals.most_common()}
    return {
        "rows": rows,
        "per_transaction": per_transaction,
        "cache_mb": cache_mb,
        "erased": erased,
        "us_per_row": elapsed / rows * 1e6,
        "statements_us_per_row": per_row,
        "python_us_per_row": elapsed / rows * 1e6 - sum(per_row.values()),
        "file_mb": path.stat().st_size / 1e6,
        "change_log": change_log,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="new session records to write")
    parser.add_argument("--per-transaction", type=int, default=8_000, help="rows per transaction")
    parser.add_argument("--cache-mb", type=int, default=DAEMON_CACHE_MB, help="SQLite's page cache")
    parser.add_argument("--erased", type=int, default=0, help="erased ids in the file before the writes")
    parser.add_argument("--change-log", action="store_true", help="with the change log's triggers (shipping on)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="write-cost-") as folder:
        result = measure(
            Path(folder) / "desto.db", args.rows, args.per_transaction, args.cache_mb, args.erased, args.change_log
        )
    print(
        f"{result['rows']:,} new session records, {result['per_transaction']:,} per transaction, "
        f"{result['cache_mb']} MB page cache, {result['erased']:,} erased ids: {result['us_per_row']:.1f} µs per row "
        f"(file {result['file_mb']:.0f} MB){', change log on' if args.change_log else ''}"
    )
    for kind, us in result["statements_us_per_row"].items():
        print(f"  {us:6.1f} µs  {kind}")
    print(f"  {result['python_us_per_row']:6.1f} µs  Python (normalizing is not included)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
