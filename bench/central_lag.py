"""Central lag: how long after the file PostgreSQL holds a row, with shipping on at a steady rate.

One daemon (``python -m archiver run``, shipped defaults, ``ARCHIVER_POSTGRES_URL`` set to a
database of the run's own) and a writer (``python -m bench.writer``) sending new desto-shaped
sessions at 1,000 changes/s, then 2,500 and 5,000 (where the backlog says whether shipping keeps
up with the file: on a 2-core machine shared with PostgreSQL it does not at 5,000), for 10 s each
(smoke: 1 s at 1,000/s only).

This process polls, every ``POLL_S``, how many sessions the file holds (a read-only connection:
the largest ``rowid``, each change a new row) and how many PostgreSQL holds (``count(*)`` of
``desto_archiver.sessions``). The n-th row is in the file at the first poll whose file count
reaches n, and in PostgreSQL at the first poll whose central count does; its lag is the
difference, exact to within a poll period (reported too). The backlog is the file's count less
PostgreSQL's, at each poll.

Target (at 1,000 changes/s): p99 ≤ 1 s. PostgreSQL runs on the same cores as the daemon here.
PostgreSQL: ``$ARCHIVER_BENCH_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432``); when it
cannot be reached the benchmark says so and measures nothing.
"""

from __future__ import annotations

import bisect
import itertools
import time
from typing import Any

import psycopg

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess, max_rowid, percentile, ro_connect
from bench.ship import SERVER, scratch_database

NAME = "central_lag"
RATES = (1_000, 2_500, 5_000)
POLL_S = 0.005
SETTLE_S = 60.0  # the longest this waits, after the last send, for PostgreSQL to hold every row
TARGET_P99_MS = 1000.0


def _central_count(pg: psycopg.Connection[Any]) -> int:
    try:
        row = pg.execute("SELECT count(*) FROM desto_archiver.sessions").fetchone()
    except psycopg.errors.UndefinedTable:  # the shipper has not created its tables yet (autocommit: nothing to undo)
        return 0
    return int(row[0]) if row else 0


def _arrivals(polls: list[tuple[float, int]], first: int, last: int) -> list[float]:
    """For each row number from first to last, the time of the first poll that counted it."""
    counts = [n for _, n in polls]
    times: list[float] = []
    for n in range(first, last + 1):
        i = bisect.bisect_left(counts, n)  # counts only grow
        times.append(polls[i][0] if i < len(polls) else float("nan"))
    return times


def measure(ctx: Context, port: int, db_path: Any, pg: psycopg.Connection[Any], rate: int, seconds: float) -> dict:
    conn = ro_connect(db_path)
    try:
        before = max_rowid(conn)
        ctx.log(f"central lag: {rate:,} changes/s for {seconds:g} s")
        in_file: list[tuple[float, int]] = []
        central: list[tuple[float, int]] = []
        writer = WriterProcess(ctx, port, rate, seconds, ctx.tag())
        result: dict[str, Any] | None = None
        while True:
            t = time.time()
            in_file.append((t, max_rowid(conn)))
            central.append((time.time(), _central_count(pg)))
            if result is None and not writer.running():
                result = writer.result()
            if result is not None:
                target = before + int(result["sent"])
                if central[-1][1] >= target or t > result["wall_last"] + SETTLE_S:
                    break
            time.sleep(POLL_S)
    finally:
        conn.close()
    sent = int(result["sent"])
    # running maxima: a count read a moment before another poll's is never taken as a step back
    in_file = [(t, n) for (t, _), n in zip(in_file, itertools.accumulate((n for _, n in in_file), max), strict=True)]
    central = [(t, n) for (t, _), n in zip(central, itertools.accumulate((n for _, n in central), max), strict=True)]
    filed = _arrivals(in_file, before + 1, before + sent)
    shipped = _arrivals(central, before + 1, before + sent)
    lags = sorted(s - f for f, s in zip(filed, shipped, strict=True) if s == s and f == f)
    backlog = [f - c for (_, f), (_, c) in zip(in_file, central, strict=True)]
    periods = sorted(b[0] - a[0] for a, b in itertools.pairwise(in_file))
    out = {
        "rate": rate,
        "seconds": seconds,
        "sent": sent,
        "achieved_rate": result["achieved_rate"],
        "shipped": len(lags),
        "not_shipped_in_time": sent - len(lags),
        "lag_ms": {
            "p50": percentile(lags, 50) * 1000,
            "p95": percentile(lags, 95) * 1000,
            "p99": percentile(lags, 99) * 1000,
            "max": lags[-1] * 1000 if lags else float("nan"),
        },
        "backlog_rows": {"median": percentile(sorted(backlog), 50), "max": max(backlog, default=0)},
        "poll_period_ms": percentile(periods, 50) * 1000 if periods else None,
    }
    lag = out["lag_ms"]
    ctx.log(
        f"central lag: {rate:,}/s p50 {lag['p50']:.0f} ms, p99 {lag['p99']:.0f} ms, backlog at most "
        f"{out['backlog_rows']['max']:,} rows ({out['not_shipped_in_time']} not shipped in time)"
    )
    return out


def _reachable() -> str | None:
    try:
        with psycopg.connect(f"{SERVER}/postgres", connect_timeout=5):
            return None
    except psycopg.Error as exc:
        return f"PostgreSQL at {SERVER} cannot be reached ({type(exc).__name__}); set ARCHIVER_BENCH_POSTGRES"


def run(ctx: Context) -> None:
    why = _reachable()
    if why is not None:
        ctx.log(f"central lag: {why}")
        ctx.add(Figure(NAME, "p99 at 1,000 changes/s", None, "ms", error=why))
        return
    seconds = 1.0 if ctx.smoke else 10.0
    rates = RATES[:1] if ctx.smoke else RATES
    runs: list[dict[str, Any]] = []
    with (
        ctx.redis(NAME) as server,
        scratch_database() as url,
        DaemonProcess(
            ctx, server, ctx.fresh_dir(NAME), ARCHIVER_POSTGRES_URL=url, ARCHIVER_SOURCE_NAME="bench"
        ) as daemon,
        psycopg.connect(url, autocommit=True) as pg,
    ):
        daemon.start()
        for rate in rates:
            runs.append(measure(ctx, server.port, daemon.db_path, pg, rate, seconds))
        exit_code = daemon.stop()
        problems = daemon.problems()
    ctx.details[NAME] = {"runs": runs, "daemon_exit_code": exit_code, "daemon_problems": problems}
    for out in runs:
        rate = out["rate"]
        for q in ("p50", "p99"):
            targets = [Target("value", "<=", TARGET_P99_MS)] if rate == 1_000 and q == "p99" else []
            ctx.add(Figure(NAME, f"{q} at {rate:,} changes/s", out["lag_ms"][q], "ms", targets=targets))
        ctx.add(Figure(NAME, f"largest backlog at {rate:,} changes/s", out["backlog_rows"]["max"], "rows"))
