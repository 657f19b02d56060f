"""7. desto's History tab on a large archive: the queries its tab runs, through desto 0.7.0's own
``SQLiteStore``, on an archive with the archiver's indexes for them and on the same archive
without.

The archive is built as a user builds it: Redis is loaded with desto-shaped sessions (full:
1 000 000; smoke: 10 000), each with a job, every 5th failed, every 50th running, the rest
finished, with desto's TTL; ``python -m archiver backfill --json`` writes a fresh file. The same
backfill writes a second fresh file in a process where the archive's History-tab indexes
(``archiver.archive.schema.DESTO_READ_INDEXES``) are left out: that file is today's baseline for the
queries, and the two backfills' keys/s give the indexes' cost on the write path (the runs
alternate, full: two of each, and each side's median is taken). Target: ratio ≥ 0.95.

Each query is desto's own method, on a store opened on the file (desto's connection, its
pragmas): ``get_all_sessions(limit=20)`` (page 1), ``offset=10 000`` (smoke 1 000),
``status="failed"``, ``get_session_count()`` and ``("failed")``, and ``search_sessions`` by a
name, as the tab's search box sends it. One call warms the cache, then the median of 7 calls
is taken, in ms, the two files taking turns call by call. Targets: ≤ 10 ms (the offset page
≤ 20 ms; the search reads every name, as desto's ``LIKE '%…%'`` must, and has none), and no
slower than without the indexes (ratio ≤ 1.05, the noise of a shared machine; not for figures
under 1 ms). The indexes' size comes from SQLite's
``dbstat``.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archiver.archive.schema import DESTO_READ_INDEXES
from bench.common import Context, Figure, Target, archiver_env
from bench.records import RawRedis, _hset, _template, expire_command, iso_now, job_command, record_id
from tests.helpers import session_hash
from tests.redis_server import RedisServer

NAME = "desto_tab"
FULL_SESSIONS, SMOKE_SESSIONS = 1_000_000, 10_000
CALLS = 7
_ID, _TIME = "I" * 36, "T" * 26
SESSION_TEMPLATES = {
    status: _template(
        _hset(f"desto:session:{_ID}", session_hash(_ID, status=status, start_time=_TIME, last_heartbeat=_TIME))
    )
    for status in ("finished", "failed", "running")
}
# a backfill whose archive lacks the History-tab indexes: the baseline file and write path
_WITHOUT = (
    "import sys, archiver.archive.schema as schema; schema.DESTO_READ_INDEXES = (); "
    "from archiver.commands.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _status(i: int) -> str:
    return "running" if i % 50 == 0 else "failed" if i % 5 == 0 else "finished"


def load_sessions(port: int, count: int, tag: str, batch: int = 2_000) -> None:
    """``count`` sessions with a job each, in pipelines of raw commands."""
    ts = iso_now()
    with RawRedis(port) as conn:
        for first in range(0, count, batch):
            commands = []
            for i in range(first, min(first + batch, count)):
                sid, jid = record_id(2 * i, tag), record_id(2 * i + 1, tag)
                commands += [
                    SESSION_TEMPLATES[_status(i)] % {b"id": sid, b"short": sid[:8], b"ts": ts},
                    expire_command(b"desto:session:" + sid),
                    job_command(jid, sid, ts),
                    expire_command(b"desto:job:" + jid),
                ]
            conn.pipeline(commands, len(commands))


def backfill(ctx: Context, server: RedisServer, indexes: bool) -> tuple[Path, dict[str, Any]]:
    directory = ctx.fresh_dir(f"{NAME}-{'indexed' if indexes else 'plain'}")
    db_path = directory / "desto.db"
    command = [sys.executable, "-m", "archiver"] if indexes else [sys.executable, "-c", _WITHOUT]
    done = subprocess.run(
        [*command, "backfill", "--json"],
        env=archiver_env(server, db_path),
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the backfill exited with {done.returncode}: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return db_path, report


def index_sizes(db_path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {
            name: int(conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = ?", (name,)).fetchone()[0])
            for name, _ in DESTO_READ_INDEXES
        }
    finally:
        conn.close()


def query_times(files: dict[str, Path], offset: int) -> dict[str, dict[str, float]]:
    """desto's tab queries on each file, by file: the median ms of CALLS calls after a warm-up.
    The files take turns call by call, so a slow moment of the machine falls on both alike."""
    from desto.redis import SQLiteStore

    stores = {name: SQLiteStore(str(path)) for name, path in files.items()}

    def queries(store: Any) -> dict[str, Callable[[], Any]]:
        return {
            "page 1": lambda: store.get_all_sessions(limit=20),
            f"page at offset {offset:,}": lambda: store.get_all_sessions(limit=20, offset=offset),
            "failed, page 1": lambda: store.get_all_sessions(status="failed", limit=20),
            "count": lambda: store.get_session_count(),
            "count failed": lambda: store.get_session_count("failed"),
            "search by name": lambda: store.search_sessions("s-0000", limit=20),
        }

    calls = {name: queries(store) for name, store in stores.items()}
    times: dict[str, dict[str, float]] = {name: {} for name in files}
    try:
        for query in next(iter(calls.values())):
            samples: dict[str, list[float]] = {name: [] for name in files}
            for name in files:
                if not calls[name][query]() and query != "search by name":
                    raise RuntimeError(
                        f"desto's store read nothing for {query!r} (it logs and returns empty on errors)"
                    )
            for _ in range(CALLS):
                for name in files:
                    t0 = time.perf_counter()
                    calls[name][query]()
                    samples[name].append((time.perf_counter() - t0) * 1000)
            for name in files:
                times[name][query] = statistics.median(samples[name])
    finally:
        for store in stores.values():
            store.close()
    return times


def run(ctx: Context) -> None:
    sessions = SMOKE_SESSIONS if ctx.smoke else FULL_SESSIONS
    offset = 1_000 if ctx.smoke else 10_000
    rounds = 1 if ctx.smoke else 2
    with ctx.redis(NAME) as server:
        ctx.log(f"{NAME}: loading {sessions:,} sessions with a job each")
        load_sessions(server.port, sessions, ctx.tag())
        rates: dict[bool, list[float]] = {True: [], False: []}
        files: dict[bool, Path] = {}
        for r in range(rounds):
            for indexes in (True, False) if r % 2 == 0 else (False, True):
                path, report = backfill(ctx, server, indexes)
                how = "with" if indexes else "without"
                ctx.log(f"{NAME}: backfill {how} the indexes: {report['keys_per_s']:,.0f} keys/s")
                if report["written"].get("session", 0) != sessions:
                    raise RuntimeError(f"the backfill wrote {report['written']} for {sessions:,} sessions")
                rates[indexes].append(float(report["keys_per_s"]))
                files.setdefault(indexes, path)
    measured = query_times({"with": files[True], "without": files[False]}, offset)
    with_ix, without_ix = measured["with"], measured["without"]
    sizes = index_sizes(files[True])
    ctx.details[NAME] = {
        "sessions": sessions,
        "jobs": sessions,
        "keys_per_s_with_indexes": rates[True],
        "keys_per_s_without": rates[False],
        "ms_with_indexes": with_ix,
        "ms_without": without_ix,
        "index_bytes": sizes,
    }
    size = f"{sessions // 1_000_000}M" if sessions >= 1_000_000 else f"{sessions // 1000}k"
    for name, ms in with_ix.items():
        limit = 20.0 if name.startswith("page at offset") else 10.0
        # a search by name reads every name (desto's LIKE '%…%'), so it has no fixed limit, only
        # "no slower than without"; a figure of microseconds has no meaningful ratio
        targets = [] if name == "search by name" else [Target("value", "<=", limit)]
        if without_ix[name] >= 1.0:
            targets.append(Target("ratio", "<=", 1.05))
        ctx.add(
            Figure(
                NAME,
                f"desto's tab at {size} sessions: {name}",
                ms,
                "ms",
                baseline=without_ix[name],
                baseline_name="without the indexes",
                targets=targets,
            )
        )
    with_rate, without_rate = statistics.median(rates[True]), statistics.median(rates[False])
    ctx.add(
        Figure(
            NAME,
            f"backfill of {size} sessions with jobs, with the indexes",
            with_rate,
            "keys/s",
            baseline=without_rate,
            baseline_name="without the indexes",
            targets=[Target("ratio", ">=", 0.95)],
        )
    )
    ctx.add(
        Figure(
            NAME,
            f"the indexes' size at {size} sessions",
            sum(sizes.values()) / 1e6,
            "MB",
            note=", ".join(f"{n}: {b / 1e6:.1f} MB" for n, b in sizes.items()),
        )
    )
