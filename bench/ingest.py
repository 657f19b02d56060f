"""2. Live ingest: the highest rate of desto-shaped changes the daemon sustains with zero loss.

Each trial starts from an empty Redis (``notify-keyspace-events`` reset, so the daemon sets it as
it would on a fresh desto Redis) and a fresh archive file, and runs the daemon as a real process
(``python -m archiver run``) with the shipped defaults (batch 500, flush interval 0.005 s, ...).
When it is ready (its first reconcile is done), a separate writer process
(``python -m bench.writer``) writes distinct session keys, one pipelined HSET of a whole
desto-shaped hash each, at the trial's rate for 30 s (smoke: 3 s). While it writes, the archived
row count is sampled (``max(rowid)`` of ``sessions``, read-only connection) to record the
backlog; after it stops, the count is polled every 5 ms until every key is archived.

A rate is **sustained** when all of these hold:

1. the writer kept its schedule (it sent at >= 95 % of the rate: otherwise the trial says
   nothing about the daemon, and the search stops there, reported as bound by the writer);
2. every change is archived within 2.0 s of the writer's last send (the catch-up: a daemon
   that falls behind by more than ~6 % over 30 s cannot make it);
3. zero loss: the archive holds exactly one ``sessions`` row per key written, and every
   compared row equals the hash Redis holds (a random sample of 2 000 keys; smoke: every key);
4. the daemon stayed clean: no ``redis.disconnected``, ``events.overflow``, failed read or
   write, quarantine, or reconcile other than the first in its log, and it exits 0 on SIGTERM.

The search climbs a doubling ladder (2k, 4k, 8k, 16k, 32k, 64k changes/s; smoke: 1k, 3k) until a
rate fails, then bisects three times, to the nearest 500, between the last rate sustained (or 0)
and the first that failed (smoke: no bisection). The figure is the highest sustained rate (as the
writer achieved it), with its ratio to ceiling 1(a), to 1(b) and to the smaller of the two (the
ceiling).

Ceiling 1(b) is measured over 100 000 rows, but a trial of 30 s at 16 000/s leaves 480 000 rows,
and with desto's random ids SQLite's own upsert slows as the file grows. So the sustained rate is
also compared with ceiling 1(b)'s upsert over as many rows as its trial wrote (into a fresh file,
500 per transaction, as 1(b)): no history rows, no version guard, no Redis, so an upper bound of
the daemon's writing at that size. And the same upsert, in transactions as big as the daemon's
biggest (8 000 rows), over as many rows as a trial at the target rate (40 000/s for 30 s) writes:
when SQLite alone cannot write them at 40 000/s, no archiver of desto's tables can be shown
sustaining the target here.

The machine limit: Redis, the load writer and the daemon run on the same cores. Each trial
records the CPU time each of them spent per change, from the first send until the last change
is archived (Redis' includes serving the daemon's reads). At the sustained rate, the machine's
cores divided by the CPU per change of Redis and the writer alone is a rate that no archiver,
however cheap, could be shown to sustain here; divided by all three, it is the rate at which the
machine runs out of cores, against which the sustained rate is compared.

The ratio target, 0.4 of the ceiling, is checked the same way: SQLite's upsert over as many rows
as a 30 s trial at that rate writes, in the daemon's biggest transactions. Ceiling 1(b) moves
with the machine, so this figure says, for this run, whether SQLite itself could go that fast.
Every record the daemon meets for the first time also gets the status-history row that records
its creation (the archive keeps each record's history from its first sighting), so the same
upsert is also run at that size with that row added to each transaction: SQLite's own write of
what the archive must hold for each new record, still without a version guard or Redis. Last, the
daemon's own write path (``bench.write_cost``) writes as many new records in one thread, with no
Redis and no other thread beside it. SQLite takes one writer at a time, so the time of its
statements alone bounds the daemon however its work were split between threads or processes.

Memory: each trial reads the daemon's peak resident memory (``VmHWM``) when it is ready and
again once every change is archived. The figure at the sustained rate (no target) is the second,
against the first: what a stream of changes costs in memory, the SQLite page cache included.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import redis

from archiver.config import Settings
from archiver.daemon.archive_file import DAEMON_CACHE_MB
from archiver.daemon.fetcher import QUEUE_DEPTH
from bench.ceilings import sqlite_ceiling_at
from bench.common import (
    Context,
    DaemonProcess,
    Figure,
    Target,
    WriterProcess,
    cpu_seconds,
    fresh_redis,
    max_rowid,
    ro_connect,
)
from bench.records import record_id, session_key
from bench.write_cost import measure as measure_write_path
from tests.procfs import vm_hwm_kb
from tests.redis_server import RedisServer

NAME = "ingest"
CATCH_UP_LIMIT_S = 2.0
TARGET_RATE = 40_000
TARGET_RATIO = 0.4  # of the ceiling, min(1a, 1b)
# the daemon's biggest transaction under load: QUEUE_DEPTH batches joined (8,000 keys)
TARGET_TRANSACTION = QUEUE_DEPTH * Settings.FIELDS["batch_size"].default
WRITER_SLACK = 0.95
SAMPLE_PERIOD_S = 0.2
FULL_LADDER = (2_000, 4_000, 8_000, 16_000, 32_000, 64_000)
SMOKE_LADDER = (1_000, 3_000)

_COMPARED = ("session_name", "tmux_session_name", "status", "start_time", "last_heartbeat", "job_ids", "at_job_id")


def compare(server: RedisServer, db_path: Path, ids: list[bytes]) -> list[str]:
    """Rows that differ from the hash Redis holds for their key (desto's reading of each field)."""
    client = redis.Redis(port=server.port, decode_responses=True, socket_timeout=30)
    conn = ro_connect(db_path)
    conn.row_factory = sqlite3.Row
    wrong: list[str] = []
    try:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            pipe = client.pipeline(transaction=False)
            for rid in chunk:
                pipe.hgetall(session_key(rid))
            hashes = pipe.execute()
            names = [rid.decode() for rid in chunk]
            rows = {
                r["session_id"]: r
                for r in conn.execute(
                    f"SELECT * FROM sessions WHERE session_id IN ({', '.join('?' * len(names))})", names
                )
            }
            for name, fields in zip(names, hashes, strict=True):
                row = rows.get(name)
                if row is None:
                    wrong.append(f"{name}: not archived")
                    continue
                for column in _COMPARED:
                    if (fields[column] or None) != (row[column] or None):
                        wrong.append(f"{name}.{column}: archive {row[column]!r}, Redis {fields[column]!r}")
                if (fields["end_time"] or None) != row["end_time"]:
                    wrong.append(f"{name}.end_time: archive {row['end_time']!r}, Redis {fields['end_time']!r}")
                if int(fields["tmux_active"].lower() == "true") != row["tmux_active"]:
                    wrong.append(f"{name}.tmux_active differs")
                if row["gone_at"] is not None:
                    wrong.append(f"{name}: tombstoned while in Redis")
    finally:
        conn.close()
        client.close()
    return wrong


def trial(ctx: Context, server: RedisServer, rate: float, seconds: float, settle_s: float) -> dict[str, Any]:
    """One rate, from a clean Redis and a fresh file; every field of the result is reported."""
    fresh_redis(server)
    tag = ctx.tag()
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "tag": tag}
    ctx.log(f"ingest: {rate:,.0f} changes/s for {seconds:g} s")
    with DaemonProcess(ctx, server, ctx.fresh_dir("ingest")) as daemon:
        daemon.start()
        ready_rss_mb = peak_rss_mb(daemon.pid)
        conn = ro_connect(daemon.db_path)
        try:
            assert server.proc is not None
            redis_pid = server.proc.pid
            redis_cpu0 = cpu_seconds(redis_pid)
            writer = WriterProcess(ctx, server.port, rate, seconds, tag)
            cpu0, t_started = daemon.cpu_seconds(), writer.started["started"]
            samples: list[tuple[float, int]] = []
            while writer.running():
                time.sleep(SAMPLE_PERIOD_S)
                samples.append((time.time(), max_rowid(conn)))
            result = writer.result()
            cpu1 = daemon.cpu_seconds()
            sent, wall_last = int(result["sent"]), float(result["wall_last"])
            caught_at = None
            deadline = wall_last + settle_s
            while time.time() < deadline:
                if max_rowid(conn) >= sent:
                    caught_at = time.time()
                    break
                time.sleep(0.005)
            # each process's CPU per change, from the first send until every change is archived
            cpu_us = {
                "redis_server": (cpu_seconds(redis_pid) - redis_cpu0) / sent * 1e6,
                "load_writer": float(result["cpu_s"]) / sent * 1e6,
                "daemon": (daemon.cpu_seconds() - cpu0) / sent * 1e6,
            }
            archived = int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
            end_rss_mb = peak_rss_mb(daemon.pid)
        finally:
            conn.close()
        backlog = [(t - t_started, max(0, min(sent, round((t - t_started) * rate)) - rows)) for t, rows in samples]
        out.update(
            sent=sent,
            achieved_rate=result["achieved_rate"],
            writer_max_behind=result["max_behind"],
            archived=archived,
            catch_up_s=None if caught_at is None else max(0.0, caught_at - wall_last),
            daemon_cpu_cores=(cpu1 - cpu0) / max(1e-9, result["elapsed_s"]),
            daemon_rss_mb={"ready": ready_rss_mb, "peak": end_rss_mb},
            cpu_us_per_change=cpu_us,
            max_backlog=max((b for _, b in backlog), default=0),
            backlog_at_end=backlog[-1][1] if backlog else 0,
            backlog_samples=[(round(t, 2), b) for t, b in backlog],
        )
        if caught_at is not None:
            ids = [record_id(i, tag) for i in range(sent)]
            if not ctx.smoke and len(ids) > 2000:
                ids = random.Random(rate).sample(ids, 2000)
            wrong = compare(server, daemon.db_path, ids)
            out.update(compared=len(ids), mismatched=len(wrong), mismatch_examples=wrong[:5])
        out["exit_code"] = daemon.stop()
        out["problems"] = daemon.problems()
    out["lost"] = None if caught_at is None else sent - archived
    reasons = []
    if out["achieved_rate"] < WRITER_SLACK * rate:
        reasons.append("writer-bound")
    if out["catch_up_s"] is None or out["catch_up_s"] > CATCH_UP_LIMIT_S:
        reasons.append("catch-up over 2 s" if out["catch_up_s"] is not None else f"not caught up after {settle_s:g} s")
    if out["lost"]:
        reasons.append(f"{out['lost']} lost")
    if out.get("mismatched"):
        reasons.append(f"{out['mismatched']} rows differ")
    if out["problems"]:
        reasons.append("log: " + ", ".join(sorted(set(out["problems"]))))
    if out["exit_code"] != 0:
        reasons.append(f"exit code {out['exit_code']}")
    out["sustained"] = not reasons
    out["why_not"] = reasons
    catch_up = "—" if out["catch_up_s"] is None else f"{out['catch_up_s']:.2f} s"
    ctx.log(
        f"ingest: {rate:,.0f}/s -> {'sustained' if not reasons else 'NOT sustained: ' + '; '.join(reasons)} "
        f"(catch-up {catch_up}, max backlog {out['max_backlog']:,}, daemon CPU {out['daemon_cpu_cores']:.2f} cores, "
        f"peak RSS {out['daemon_rss_mb']['peak'] or 0:.0f} MB)"
    )
    return out


def peak_rss_mb(pid: int) -> float | None:
    """The daemon's peak RSS so far; None once it has died (a failed trial, reported as such)."""
    try:
        return vm_hwm_kb(pid) / 1024
    except (OSError, RuntimeError):
        return None


def trial_seconds(ctx: Context) -> float:
    return 3.0 if ctx.smoke else 30.0


def search(ctx: Context, server: RedisServer) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    ladder = SMOKE_LADDER if ctx.smoke else FULL_LADDER
    seconds = trial_seconds(ctx)
    settle = 10.0 if ctx.smoke else 15.0
    steps = 0 if ctx.smoke else 3
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    failed: dict[str, Any] | None = None
    for rate in ladder:
        t = trial(ctx, server, rate, seconds, settle)
        trials.append(t)
        if t["sustained"]:
            best = t
            continue
        failed = t
        break
    if failed is not None and "writer-bound" not in failed["why_not"]:
        lo = best["rate"] if best else 0.0
        hi = failed["rate"]
        for _ in range(steps):
            mid = round((lo + hi) / 2 / 500) * 500
            if mid <= lo or mid >= hi:
                break
            t = trial(ctx, server, mid, seconds, settle)
            trials.append(t)
            if t["sustained"]:
                best, lo = t, mid
            else:
                hi = mid
    return best, trials


def run(ctx: Context) -> None:
    with ctx.redis(NAME) as server:
        best, trials = search(ctx, server)
    ctx.details[NAME] = {"trials": trials, "best_rate": best["rate"] if best else None}
    value = best["achieved_rate"] if best else None
    note = "" if best else "no rate of the ladder was sustained"
    ceilings = ctx.ceilings
    ctx.add(
        Figure(
            NAME,
            "highest sustained rate (zero loss, catch-up ≤ 2 s)",
            value,
            "changes/s",
            baseline=ceilings.get("min"),
            baseline_name="ceiling min(1a, 1b)",
            targets=[Target("value", ">=", TARGET_RATE), Target("ratio", ">=", TARGET_RATIO)],
            note=note,
        )
    )
    ctx.add(Figure(NAME, "sustained rate vs ceiling 1(a)", value, "changes/s", ceilings.get("redis"), "1(a)"))
    ctx.add(Figure(NAME, "sustained rate vs ceiling 1(b)", value, "changes/s", ceilings.get("sqlite"), "1(b)"))
    if best:
        rows = int(best["sent"])
        ctx.log(f"ingest: SQLite's ceiling at {rows:,} rows")
        at_size = sqlite_ceiling_at(ctx.fresh_dir("ingest-sqlite-ceiling") / "desto.db", rows)
        ctx.details[NAME]["sqlite_ceiling_at_sustained_size"] = {"rows": rows, "rows_per_s": at_size}
        ctx.add(
            Figure(
                NAME,
                "sustained rate vs 1(b)'s upsert over as many rows as its trial wrote",
                value,
                "changes/s",
                at_size,
                f"1(b) over {rows:,} rows",
            )
        )
        ctx.add(Figure(NAME, "daemon CPU at the sustained rate", best["daemon_cpu_cores"], "cores"))
        rss = best["daemon_rss_mb"]
        ctx.add(
            Figure(NAME, "daemon peak RSS at the sustained rate", rss["peak"], "MB", rss["ready"], "when it was ready")
        )
        add_machine_limit(ctx, best, value)
    rows = round(TARGET_RATE * trial_seconds(ctx))
    add_sqlite_at_rate(
        ctx, "target", TARGET_RATE, f"the {rows:,} rows a trial at {TARGET_RATE:,}/s writes", "the target rate"
    )
    if ceilings.get("min"):
        ratio = f"{TARGET_RATIO:g} of the ceiling"
        rate = TARGET_RATIO * float(ceilings["min"])
        what = f"the rows a trial at {ratio} writes"
        add_sqlite_at_rate(ctx, "ratio", rate, what, ratio)
        add_sqlite_at_rate(ctx, "ratio_with_history", rate, what, ratio, history=True)
        add_write_path_at_rate(ctx, "ratio", rate, what, ratio)
    failing = [t for t in trials if not t["sustained"] and (not best or t["rate"] > best["rate"])]
    if failing:
        first_fail = min(failing, key=lambda t: t["rate"])
        ctx.add(
            Figure(
                NAME,
                "lowest rate tried that was not sustained",
                first_fail["rate"],
                "changes/s",
                note="; ".join(first_fail["why_not"]),
            )
        )


def add_sqlite_at_rate(ctx: Context, name: str, rate: float, what: str, rate_name: str, history: bool = False) -> None:
    """SQLite's own upsert over as many rows as a trial at ``rate`` writes, in the daemon's biggest
    transactions: when SQLite alone cannot write them that fast, no archiver of desto's tables
    could be shown sustaining ``rate`` on this machine. ``history``: each new record's first
    status-history row is written too, which bounds any archiver that keeps the archive's history."""
    rows = round(rate * trial_seconds(ctx))
    added = " and their first history rows" if history else ""
    ctx.log(f"ingest: SQLite's own upsert over {what}{added} ({rows:,} rows)")
    path = ctx.fresh_dir(f"ingest-sqlite-{name}") / "desto.db"
    rows_per_s = sqlite_ceiling_at(path, rows, TARGET_TRANSACTION, history=history)
    ctx.details[NAME][f"sqlite_ceiling_at_{name}_size"] = {"rows": rows, "rate": rate, "rows_per_s": rows_per_s}
    ctx.add(
        Figure(
            NAME,
            f"SQLite's own upsert over {what}{added}",
            rows_per_s,
            "records/s" if history else "rows/s",
            rate,
            rate_name,
            note=f"{rows:,} rows, {TARGET_TRANSACTION:,} per transaction, "
            + ("each with its status-history row" if history else "sessions rows only"),
        )
    )


def add_write_path_at_rate(ctx: Context, name: str, rate: float, what: str, rate_name: str) -> None:
    """The daemon's own write path (``bench.write_cost``: normalized records through
    ``write_batch``, in one thread, no Redis) over as many new records as a trial at ``rate``
    writes. SQLite takes one writer at a time, so however the daemon's work were split between
    threads or processes, its statements run one after another: their time alone (the WAL's
    restarts left out, which a checkpointing thread mostly takes over) bounds the rate of any
    such split."""
    rows = round(rate * trial_seconds(ctx))
    ctx.log(f"ingest: the daemon's write path over {what} ({rows:,} records)")
    found = measure_write_path(
        ctx.fresh_dir(f"ingest-write-path-{name}") / "desto.db", rows, TARGET_TRANSACTION, DAEMON_CACHE_MB
    )
    statements = found["statements_us_per_row"]
    restarts = statements.get("PRAGMA wal_checkpoint", 0.0)
    sql_rate = 1e6 / (sum(statements.values()) - restarts)
    path_rate = 1e6 / (found["us_per_row"] - restarts)
    ctx.details[NAME][f"write_path_at_{name}_size"] = {
        "rows": rows,
        "rate": rate,
        "statements_records_per_s": sql_rate,
        "write_path_records_per_s": path_rate,
        "measured": found,
    }
    ctx.add(
        Figure(
            NAME,
            f"the daemon's write path over {what}, one thread: its SQLite statements alone",
            sql_rate,
            "records/s",
            rate,
            rate_name,
            note=f"{rows:,} records, {TARGET_TRANSACTION:,} per transaction; the whole write path, its Python "
            f"included: {path_rate:,.0f} records/s",
        )
    )


def add_machine_limit(ctx: Context, best: dict[str, Any], sustained: float | None) -> None:
    """What the machine itself allows: Redis, the load writer and the daemon share its cores, so
    their CPU per change (measured at the sustained rate) bounds the rate any archiver on this
    machine could be shown to sustain."""
    cpu = best["cpu_us_per_change"]
    cores = os.cpu_count() or 1
    for name, label in (("redis_server", "redis-server"), ("load_writer", "load writer"), ("daemon", "daemon")):
        ctx.add(Figure(NAME, f"CPU per change at the sustained rate: {label}", cpu[name], "µs"))
    others = cpu["redis_server"] + cpu["load_writer"]
    ctx.add(
        Figure(
            NAME,
            f"machine limit: redis-server and the load writer alone fill {cores} cores",
            cores * 1e6 / others,
            "changes/s",
            note="an archiver that cost nothing could not be shown faster than this here",
        )
    )
    ctx.add(
        Figure(
            NAME,
            f"sustained rate vs the machine limit of all three processes ({cores} cores)",
            sustained,
            "changes/s",
            baseline=cores * 1e6 / (others + cpu["daemon"]),
            baseline_name="cores / CPU per change",
        )
    )
