"""``python -m bench.ship``: what shipping into PostgreSQL costs and how fast it goes, each figure a
ratio against a baseline measured in the same run.

1. The write path: ``bench.write_cost``'s rows through the daemon's own write path, with the
   change log's triggers against without them (the cost shipping adds to every write).
2. Shipping: an archive of ``--rows`` new sessions (each with its status-history row) shipped from
   its change log by the daemon's shipper (``Shipper.ship_batch``, batches of 2,000 entries), and
   copied whole by the one-shot (``Shipper.copy_all``), against psycopg's own bulk path for the
   same rows: read them from the file, COPY them into a temporary table, and one
   ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` into tables of the same shape.
3. Live ingest: the daemon as a process, with a writer (``bench.writer``) sending desto-shaped
   sessions faster than it keeps up (``--rate`` for ``--seconds``); the rate is the changes sent
   over the time until the last one is in the file. Shipping on (to a database of the run's own)
   against off; with shipping on, also how long PostgreSQL took to hold every row after the file.

The machine's other work moves a single run a lot: parts 1 and 3 alternate off and on ``--trials``
times (default 3) and compare the medians. PostgreSQL runs on the same cores as the daemon here, so
its own work on the shipped rows is counted against the daemon; a central server elsewhere is not.

PostgreSQL: ``$ARCHIVER_BENCH_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432``); each
part uses a database of its own, dropped afterwards.

    .venv/bin/python -m bench.ship --rows 50000 --rate 20000 --seconds 5 --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from archiver.archive import changelog
from archiver.central.postgres import migrate_pg
from archiver.central.ship import Shipper
from archiver.config import load_settings
from bench import write_cost
from bench.common import Context, DaemonProcess, WriterProcess, fresh_redis, max_rowid, ro_connect

SERVER = os.environ.get("ARCHIVER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    name = f"archiver_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_path(rows: int, folder: Path, trials: int) -> dict[str, Any]:
    """The daemon's write path without and with the change log's triggers, alternately ``trials``
    times each (the machine's other work moves single runs a lot); the medians are compared."""
    off, on = [], []
    for n in range(trials):
        off.append(write_cost.measure(folder / f"off-{n}.db", rows, 8000, 64, change_log=False)["us_per_row"])
        on.append(write_cost.measure(folder / f"on-{n}.db", rows, 8000, 64, change_log=True)["us_per_row"])
    return {
        "rows": rows,
        "trials": trials,
        "us_per_row_without": statistics.median(off),
        "us_per_row_with_change_log": statistics.median(on),
        "ratio": statistics.median(off) / statistics.median(on),
        "runs_without": off,
        "runs_with": on,
    }


def _baseline(url: str, db_path: Path) -> float:
    """psycopg's bulk upsert of the file's sessions and status history: seconds."""
    conn = sqlite3.connect(db_path)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as pg:
        for table, key in (("sessions", "session_id"), ("status_history", "id")):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            quoted = ", ".join(f'"{c}"' for c in columns)
            keys = f"source_name, file_id, {key}" if key == "id" else f"source_name, {key}"
            sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c != key)
            with pg.transaction(), pg.cursor() as cur:
                cur.execute(f"CREATE TEMP TABLE stage (LIKE desto_archiver.{table} INCLUDING DEFAULTS) ON COMMIT DROP")
                with cur.copy(f"COPY stage (source_name, file_id, {quoted}) FROM STDIN") as copy:
                    for row in conn.execute(f"SELECT {quoted} FROM {table}"):
                        copy.write_row(("baseline", "f", *row))
                cur.execute(
                    f"INSERT INTO desto_archiver.{table} SELECT * FROM stage ON CONFLICT ({keys}) DO UPDATE SET {sets}"
                )
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def shipping(rows: int, folder: Path) -> dict[str, Any]:
    db_path = folder / "ship.db"
    write_cost.measure(db_path, rows, 8000, 64, change_log=True)
    conn = sqlite3.connect(db_path)
    log_from = changelog.complete_from(conn)
    assert log_from is not None
    # the log's entries, and the status history's rows (found by number, not logged)
    entries = conn.execute("SELECT count(*) FROM archiver_changes WHERE seq >= ?", (log_from,)).fetchone()[0]
    entries += conn.execute("SELECT count(*) FROM status_history").fetchone()[0]
    shipped_rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sessions", "status_history"))
    conn.close()
    out: dict[str, Any] = {"rows": shipped_rows, "log_entries": entries}
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as pg:
            migrate_pg(pg, "desto_archiver")
        out["baseline_s"] = _baseline(url, db_path)
        settings = load_settings(postgres_url=url, source_name="bench", sqlite_db_path=db_path)
        shipper = Shipper(settings)
        shipper.open()
        assert shipper.pg is not None and shipper.sqlite is not None
        # the daemon's path: a position at the log's start (its marker, whose token marks the log),
        # then batch after batch
        shipper.pg.execute(
            "INSERT INTO desto_archiver.ship_positions (source_name, file_id, position, history_id, head, head_token) "
            "VALUES (%s, %s, %s, 0, %s, %s)",
            ("bench", shipper.file_id, log_from - 1, log_from - 1, changelog.token_at(shipper.sqlite, log_from - 1)),
        )
        started = time.perf_counter()
        shipped = 0
        while n := shipper.ship_batch():
            shipped += n
        out["log_s"] = time.perf_counter() - started
        assert shipped == entries, (shipped, entries)
        shipper.close()
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("DELETE FROM desto_archiver.sessions WHERE source_name = 'bench'")
            pg.execute("DELETE FROM desto_archiver.status_history WHERE source_name = 'bench'")
            pg.execute("DELETE FROM desto_archiver.ship_positions")
        shipper = Shipper(settings)
        shipper.open()
        started = time.perf_counter()
        report = shipper.copy_all()
        out["copy_s"] = time.perf_counter() - started
        shipper.close()
        assert report.copied["sessions"] + report.copied["status_history"] == shipped_rows
    out["baseline_rows_per_s"] = shipped_rows / out["baseline_s"]
    out["log_rows_per_s"] = shipped_rows / out["log_s"]
    out["copy_rows_per_s"] = shipped_rows / out["copy_s"]
    out["log_ratio"] = out["log_rows_per_s"] / out["baseline_rows_per_s"]
    out["copy_ratio"] = out["copy_rows_per_s"] / out["baseline_rows_per_s"]
    return out


def _ingest(ctx: Context, server: Any, rate: float, seconds: float, url: str | None) -> dict[str, Any]:
    fresh_redis(server)
    env = {"ARCHIVER_POSTGRES_URL": url, "ARCHIVER_SOURCE_NAME": "bench"} if url else {}
    with DaemonProcess(ctx, server, ctx.fresh_dir("ship-ingest"), **env) as daemon:
        daemon.start()
        conn = ro_connect(daemon.db_path)
        writer = WriterProcess(ctx, server.port, rate, seconds, ctx.tag())
        first = float(writer.started["started"])
        result = writer.result()
        sent = int(result["sent"])
        while max_rowid(conn) < sent:
            time.sleep(0.005)
        done = time.time()
        conn.close()
        out: dict[str, Any] = {"sent": sent, "achieved_send_rate": result["achieved_rate"]}
        out["rate"] = sent / (done - first)
        if url:
            with psycopg.connect(url) as pg:
                while True:
                    row = pg.execute("SELECT count(*) FROM desto_archiver.sessions").fetchone()
                    if row is not None and row[0] >= sent:
                        break
                    time.sleep(0.02)
            out["postgres_behind_file_s"] = time.time() - done
        out["exit_code"] = daemon.stop()
    return out


def ingest(rate: float, seconds: float, folder: Path, trials: int) -> dict[str, Any]:
    """Shipping off and on, alternately ``trials`` times each; the ratio of the median rates."""
    ctx = Context(smoke=False, workdir=folder)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        with ctx.redis("ship") as server, scratch_database() as url:
            for _ in range(trials):
                runs["off"].append(_ingest(ctx, server, rate, seconds, None))
                with psycopg.connect(url, autocommit=True) as pg:  # each trial ships into an empty database
                    pg.execute("DROP SCHEMA IF EXISTS desto_archiver CASCADE")
                runs["on"].append(_ingest(ctx, server, rate, seconds, url))
    finally:
        ctx.procs.stop_all()
    off = statistics.median(r["rate"] for r in runs["off"])
    on = statistics.median(r["rate"] for r in runs["on"])
    behind = statistics.median(r["postgres_behind_file_s"] for r in runs["on"])
    return {
        "trials": trials,
        "off": {"rate": off, "runs": runs["off"]},
        "on": {"rate": on, "postgres_behind_file_s": behind, "runs": runs["on"]},
        "ratio": on / off,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ship", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="sessions in the shipped archive and write path")
    parser.add_argument("--rate", type=float, default=20_000, help="live ingest: changes/s the writer sends")
    parser.add_argument("--seconds", type=float, default=5, help="live ingest: how long it sends")
    parser.add_argument("--trials", type=int, default=3, help="write path and live ingest: runs of each, alternated")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ship-") as folder:
        base = Path(folder)
        (base / "w").mkdir()
        (base / "s").mkdir()
        (base / "i").mkdir()
        results = {
            "write_path": write_path(args.rows, base / "w", args.trials),
            "shipping": shipping(args.rows, base / "s"),
            "ingest": ingest(args.rate, args.seconds, base / "i", args.trials),
        }
    w, s, i = results["write_path"], results["shipping"], results["ingest"]
    print(
        f"write path, {w['rows']:,} new sessions (median of {w['trials']}): {w['us_per_row_without']:.1f} µs/row "
        "without the change log, "
        f"{w['us_per_row_with_change_log']:.1f} with it: ratio {w['ratio']:.2f}"
    )
    print(
        f"shipping {s['rows']:,} rows (sessions + status history): psycopg COPY + upsert "
        f"{s['baseline_rows_per_s']:,.0f} rows/s; the daemon's shipper from the log {s['log_rows_per_s']:,.0f} "
        f"rows/s (ratio {s['log_ratio']:.2f}); the one-shot copy {s['copy_rows_per_s']:,.0f} rows/s "
        f"(ratio {s['copy_ratio']:.2f})"
    )
    print(
        f"live ingest, {args.rate:,.0f}/s sent for {args.seconds:g} s (median of {i['trials']}): "
        f"{i['off']['rate']:,.0f} changes/s archived "
        f"without shipping, {i['on']['rate']:,.0f} with it: ratio {i['ratio']:.2f} (target >= 0.9); PostgreSQL "
        f"held every row {i['on']['postgres_behind_file_s']:.2f} s after the file"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
