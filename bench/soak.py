"""7. Memory over time: the daemon's resident memory under steady traffic.

A daemon runs for months, so its memory must not grow with the number of changes it has seen. The
daemon (``python -m archiver run``) archives 1 000 changes/s for 240 s (smoke: 8 s) from the load
writer, which rewrites 2 000 session keys in turn (``--keys``): each change updates a live record,
as desto's heartbeats do, so the archive keeps its size and SQLite's page cache cannot grow with
it. Its full reconcile runs every 30 s (smoke: 2 s) instead of every 300, so the run goes through
several of them too. Its ``VmRSS`` (``/proc/<pid>/status``) and the WAL's size (SQLite maps an
index of the WAL, which grows with it until the daemon starts it over) are read every 5 s (smoke:
0.5 s).

The baseline is its RSS once the first fifth of the run is over (the warm-up: SQLite's cache, the
read-ahead queue and Python's allocator filled); the figure is its RSS at the end, and the ratio
says whether it grew. Target: flat, taken as ≤ 1.10. Also reported: the growth over the rest of
the run per million changes (a least-squares slope), the daemon's RSS when it was ready, its CPU
per change, and that every key's last change reached the archive.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess, ro_connect
from bench.ingest import compare
from bench.records import record_id
from tests.procfs import status_kb

NAME = "soak"
RATE = 1_000
KEYS = 2_000
SECONDS, SMOKE_SECONDS = 240.0, 8.0
RECONCILE_S, SMOKE_RECONCILE_S = 30, 2
WARM_UP_SHARE = 0.2


def slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``points`` (x, y); 0 for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024


def size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else 0.0


def run(ctx: Context) -> None:
    seconds, period = (SMOKE_SECONDS, 0.5) if ctx.smoke else (SECONDS, 5.0)
    tag = ctx.tag()
    reconcile_s = SMOKE_RECONCILE_S if ctx.smoke else RECONCILE_S
    env = {"ARCHIVER_RECONCILE_INTERVAL": str(reconcile_s)}
    with ctx.redis(NAME) as server, DaemonProcess(ctx, server, ctx.fresh_dir(NAME), **env) as daemon:
        daemon.start()
        ready_mb = rss_mb(daemon.pid)
        wal = Path(f"{daemon.db_path}-wal")
        ctx.log(f"soak: {RATE:,} changes/s over {KEYS:,} keys for {seconds:g} s, the daemon's RSS every {period:g} s")
        writer = WriterProcess(ctx, server.port, RATE, seconds, tag, keys=KEYS)
        started = time.monotonic()
        cpu0 = daemon.cpu_seconds()
        samples: list[tuple[float, float]] = []  # (changes sent by then, RSS MB)
        wal_mb: list[float] = []  # the WAL's size at each sample: SQLite maps an index of it
        while writer.running():
            time.sleep(period)
            elapsed = time.monotonic() - started
            if elapsed < seconds:  # the end's own sample is taken once every change is archived
                samples.append((elapsed * RATE, rss_mb(daemon.pid)))
                wal_mb.append(size_mb(wal))
        result = writer.result()
        sent = int(result["sent"])
        ids = [record_id(i, tag) for i in range(min(sent, KEYS))]
        deadline, wrong = time.monotonic() + 10, compare(server, daemon.db_path, ids)
        while wrong and time.monotonic() < deadline:
            time.sleep(0.1)
            wrong = compare(server, daemon.db_path, ids)
        cpu_us = (daemon.cpu_seconds() - cpu0) / sent * 1e6
        conn = ro_connect(daemon.db_path)
        try:
            rows = int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
        finally:
            conn.close()
        end_mb = rss_mb(daemon.pid)
        wal_mb.append(size_mb(wal))
        db_mb = size_mb(daemon.db_path)
        samples.append((float(sent), end_mb))
        exit_code = daemon.stop()
        problems = [p for p in daemon.problems() if p != "reconcile.done (timer)"]  # asked for here
        reconciles = len([e for e in daemon.events() if e.get("event") == "reconcile.done"])
    warm_at = WARM_UP_SHARE * sent
    after_warm_up = [s for s in samples if s[0] >= warm_at]
    warm_mb = after_warm_up[0][1]
    growth = slope(after_warm_up) * 1e6  # MB per million changes
    details: dict[str, Any] = {
        "rate": RATE,
        "keys": KEYS,
        "seconds": seconds,
        "sent": sent,
        "achieved_rate": result["achieved_rate"],
        "ready_rss_mb": ready_mb,
        "warm_rss_mb": warm_mb,
        "end_rss_mb": end_mb,
        "growth_mb_per_million": growth,
        "cpu_us_per_change": cpu_us,
        "db_mb": db_mb,
        "samples": [(round(x), round(mb, 2)) for x, mb in samples],
        "wal_mb": [round(mb, 1) for mb in wal_mb],
        "reconcile_interval_s": reconcile_s,
        "reconciles": reconciles,
        "rows": rows,  # the file's sessions: the keys, however many changes
        "compared": len(ids),
        "mismatched": len(wrong),
        "mismatch_examples": wrong[:5],
        "daemon_exit_code": exit_code,
        "daemon_problems": problems,
    }
    ctx.details[NAME] = details
    ctx.log(
        f"soak: RSS {ready_mb:.1f} MB ready, {warm_mb:.1f} after the warm-up, {end_mb:.1f} at the end "
        f"({growth:+.2f} MB per million changes); {len(wrong)} of {len(ids):,} keys differ from Redis"
    )
    if wrong or rows != len(ids) or exit_code != 0 or problems:
        raise RuntimeError(f"soak: the archive or the daemon went wrong: {details}")
    ctx.add(
        Figure(
            NAME,
            f"daemon RSS after {sent:,} changes to {KEYS:,} records",
            end_mb,
            "MB",
            baseline=warm_mb,
            baseline_name=f"after the first {WARM_UP_SHARE:.0%} of them",
            targets=[Target("ratio", "<=", 1.10)],
        )
    )
    ctx.add(Figure(NAME, "daemon RSS growth after the warm-up, per million changes", growth, "MB"))
    ctx.add(Figure(NAME, "daemon RSS when ready", ready_mb, "MB"))
    ctx.add(Figure(NAME, "daemon CPU per change", cpu_us, "µs"))
