"""4. Backfill: ``desto-archiver backfill`` over 100 000 and 1 000 000 records (smoke: 2 000 and
10 000), keys/s and peak RSS.

Redis is loaded with desto-shaped records, half sessions and half jobs (``tests.helpers``
shapes), each with desto's 7-day TTL, through raw pipelines of HSET + EXPIRE; the larger size
adds records to the smaller one's. For each size the backfill runs as its own process
(``python -m archiver backfill --json``, so ``archiver.commands.backfill.backfill``) into a fresh file.

- keys/s: the backfill's own report (keys read / its elapsed time, interpreter start-up
  excluded); the process's wall time is in the details. Ratio against ceiling 1(a) (pipelined
  HGETALL of the same shapes). Target: ≥ 50 000 keys/s.
- peak RSS: the backfill process's own high-water mark (``VmHWM``), read by the process itself
  once the backfill is done (``python -m bench.peak_rss``, which runs ``python -m archiver``
  in-process): exact, not sampled. The smaller size's baseline is a process that only imports
  ``archiver.commands.backfill`` (the fixed cost of Python and its libraries); the larger size's
  baseline is the smaller size's RSS, so the ratio says whether memory grows with the
  keyspace. Targets at the larger size: ≤ 100 MB and ratio ≤ 1.2 (flat).

Zero loss is checked: the report's keys read and rows written, and the rows in the file, must
all equal the number of records loaded.

A second baseline shows which ceiling stops a backfill: SQLite itself, at the same size. Ceiling
1(b) is measured on 100 000 rows; the same upsert (sessions rows with random uuid4-shaped ids,
500 per transaction, into a fresh archive file) slows down as desto's random-keyed indexes
outgrow SQLite's page cache, so each size is also compared with that upsert over as many rows.
A first backfill into an empty file loads it as a bulk load: its secondary indexes dropped
first and built at the end, and up to 5 000 keys per transaction; the third comparison is with
the same upsert done that way (index building included in its time). Those two write only
sessions rows, where the backfill also writes the status-history row that records each
record's creation: they bound it from above. The fourth comparison is the bulk load with that
row added: SQLite's own write of what the archive must hold for each new record.

The machine limit: the backfill process and redis-server (serving its SCAN and reads) share the
machine's cores; their CPU time per key, measured over each run, divided into the cores is the
rate at which the machine runs out of CPU, however the work were spread over threads or
processes. The CPU time of a process that only imports the backfill is taken off the backfill's.

The two-process limit: after the smaller size's run, the same keys are backfilled again by this
process, in one thread, stage by stage (``stage_costs``): SCAN, the atomic read, normalizing and
writing (a bulk load into a fresh file), each timed in CPU per key, plus pickling each page's rows
and unpickling them, which a reading process and a writing process would add between them. The
machine's cores divided by all of that and redis-server's CPU per key is the fastest a backfill
split over two processes could go here, however well they shared the cores; it is compared with
the 50 000 keys/s target.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from archiver.archive.store import Store
from archiver.commands.backfill import BACKFILL_CACHE_MB
from archiver.config import Settings, load_settings
from archiver.daemon.reconcile import Reconcile, records_of, write_batch
from archiver.models import normalize
from archiver.redis_side.source import Source
from bench.ceilings import sqlite_ceiling_at
from bench.common import Context, Figure, Target, archiver_env, cpu_seconds
from bench.records import load_records
from tests.redis_server import RedisServer

NAME = "backfill"
TARGET_KEYS_PER_S = 50_000
BULK_PER_TRANSACTION = 5_000  # the backfill's transactions: ten pages of 500 keys
FULL_SIZES = (100_000, 1_000_000)
SMOKE_SIZES = (2_000, 10_000)


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def measured_run(ctx: Context, directory: Path, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <args>`` under ``bench.peak_rss``; what it measured of itself."""
    rss_file = directory / "peak-rss.json"
    stdout_path, stderr_path = directory / "stdout.txt", directory / "stderr.txt"
    with open(stdout_path, "wb") as out_file, open(stderr_path, "wb") as err_file:
        proc = ctx.procs.spawn(
            [sys.executable, "-m", "bench.peak_rss", str(rss_file), *args],
            env=env,
            stdout=out_file,
            stderr=err_file,
            stdin=subprocess.DEVNULL,
        )
        try:
            code = proc.wait(timeout=3600)
        finally:
            ctx.procs.stop(proc)
    if code != 0:
        raise RuntimeError(f"python -m {' '.join(args)} exited with {code}:\n{stderr_path.read_text()[-2000:]}")
    measured: dict[str, Any] = json.loads(rss_file.read_text())
    return measured


def import_only(ctx: Context) -> dict[str, Any]:
    """A Python process that imports ``archiver.commands.backfill`` (and so what it uses), and stops: its
    peak RSS and CPU time are the fixed costs of Python and the libraries."""
    return measured_run(ctx, ctx.fresh_dir("backfill-imports"), ["archiver.commands.backfill"])


def backfill_once(ctx: Context, server: RedisServer, size: int, start_cpu_s: float) -> dict[str, Any]:
    directory = ctx.fresh_dir(NAME)
    db_path = directory / "desto.db"
    ctx.log(f"backfill: {size:,} records")
    assert server.proc is not None
    redis_cpu0 = cpu_seconds(server.proc.pid)
    measured = measured_run(ctx, directory, ["archiver", "backfill", "--json"], env=archiver_env(server, db_path))
    redis_cpu = cpu_seconds(server.proc.pid) - redis_cpu0
    rss_mb = float(measured["vm_hwm_kb"]) / 1024
    cpu_s = max(0.0, float(measured["cpu_s"]) - start_cpu_s)  # the start-up's imports left out
    report = json.loads((directory / "stdout.txt").read_text())
    conn = sqlite3.connect(db_path)
    try:
        rows = sum(int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in ("sessions", "jobs"))
    finally:
        conn.close()
    written = sum(report["written"].values())
    out = {
        "records": size,
        "keys_read": report["keys_read"],
        "written": written,
        "rows": rows,
        "lost": size - rows,
        "keys_per_s": report["keys_per_s"],
        "elapsed_s": report["elapsed_s"],
        "peak_rss_mb": rss_mb,
        "cpu_us_per_key": {
            "backfill": cpu_s / size * 1e6,
            "redis_server": redis_cpu / size * 1e6,
        },
        "backfill_cores": cpu_s / report["elapsed_s"],
        "report": report,
    }
    ctx.log(f"backfill: {size:,} records at {report['keys_per_s']:,.0f} keys/s, peak RSS {rss_mb:.1f} MB")
    if not (report["keys_read"] == written == rows == size):
        raise AssertionError(f"backfill of {size} records: read {report['keys_read']}, wrote {written}, rows {rows}")
    return out


STAGES = ("scan", "read", "normalize", "write", "pickle send", "pickle receive")


def stage_costs(server: RedisServer, db_path: Path, records: int) -> dict[str, float]:
    """The backfill's work, stage by stage, in one thread of this process: CPU time per key
    (``time.process_time``) of SCAN, the atomic read, normalizing, and writing (a bulk load into
    a fresh file, as a first backfill does, its indexes built at the end), plus what a split into
    a reading and a writing process would add: pickling each page's rows and unpickling them."""
    # the shipped batch size, whatever this process' environment says (as the backfill run's)
    batch_size = Settings.FIELDS["batch_size"].default
    settings = load_settings(redis_url=server.url, sqlite_db_path=db_path, batch_size=batch_size)
    source = Source(settings)
    store = Store.open(db_path, cache_mb=BACKFILL_CACHE_MB)
    totals: Counter[str] = Counter()
    clock = time.process_time

    def write(rows: list[Any]) -> None:
        started = clock()
        write_batch(store, rows)
        totals["write"] += clock() - started

    try:
        store.defer_indexes()
        rec = Reconcile(source, settings.batch_size, "bench")
        joined: list[Any] = []
        read = 0
        while True:
            started = clock()
            keys = rec.next_scan_keys()
            wanted = records_of(keys)
            totals["scan"] += clock() - started
            if not keys:
                break
            started = clock()
            fetched = source.fetch([key for key, _ in wanted])
            totals["read"] += clock() - started
            started = clock()
            outcomes = [normalize(parsed, f) for (_, parsed), f in zip(wanted, fetched, strict=True)]
            totals["normalize"] += clock() - started
            started = clock()
            sent = pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)
            totals["pickle send"] += clock() - started
            started = clock()
            joined += pickle.loads(sent)
            totals["pickle receive"] += clock() - started
            read += len(outcomes)
            if len(joined) >= BULK_PER_TRANSACTION:
                write(joined)
                joined = []
        if joined:
            write(joined)
        started = clock()
        store.restore_indexes()
        totals["write"] += clock() - started
    finally:
        store.close()
        source.close()
    if read != records:
        raise AssertionError(f"the stage measurement read {read} keys of {records}")
    return {stage: totals[stage] / records * 1e6 for stage in STAGES}


def add_two_process_limit(ctx: Context, label: str, stages: dict[str, float], redis_us: float) -> None:
    """The best a backfill split into a reading and a writing process could do on this machine:
    its cores, divided by the CPU per key of both processes and of redis-server."""
    for stage in STAGES:
        ctx.add(Figure(NAME, f"CPU per key over {label}, one thread: {stage}", stages[stage], "µs"))
    per_key = sum(stages.values()) + redis_us
    cores = os.cpu_count() or 1
    ctx.add(
        Figure(
            NAME,
            f"two-process backfill limit over {label} ({cores} cores / CPU per key of its stages and redis-server)",
            cores * 1e6 / per_key,
            "keys/s",
            baseline=TARGET_KEYS_PER_S,
            baseline_name="the target",
            note=f"{per_key:.1f} µs per key in all, with redis-server's {redis_us:.1f}",
        )
    )


def run(ctx: Context) -> None:
    sizes = SMOKE_SIZES if ctx.smoke else FULL_SIZES
    tag = ctx.tag()
    runs: list[dict[str, Any]] = []
    imports = import_only(ctx)
    base_rss = float(imports["vm_hwm_kb"]) / 1024
    with ctx.redis(NAME) as server:
        loaded = 0
        for size in sizes:
            ctx.log(f"backfill: loading records {loaded:,}..{size:,}")
            load_records(server.port, loaded, size - loaded, tag, jobs=True, ttl=True)
            loaded = size
            runs.append(backfill_once(ctx, server, size, float(imports["cpu_s"])))
            if size == sizes[0]:
                ctx.log(f"backfill: the stages' CPU per key over {size:,} records, in one thread")
                stages = stage_costs(server, ctx.fresh_dir("backfill-stages") / "desto.db", size)
    ceilings_at, bulk_at, bulk_history_at = {}, {}, {}
    for size in sizes:
        ctx.log(f"backfill: SQLite's ceiling at {size:,} rows")
        ceilings_at[size] = sqlite_ceiling_at(ctx.fresh_dir("backfill-sqlite-ceiling") / "desto.db", size)
        ctx.log(f"backfill: SQLite's bulk-load ceiling at {size:,} rows, without and with history rows")
        bulk_at[size] = sqlite_ceiling_at(
            ctx.fresh_dir("backfill-sqlite-bulk") / "desto.db", size, BULK_PER_TRANSACTION, bulk=True
        )
        bulk_history_at[size] = sqlite_ceiling_at(
            ctx.fresh_dir("backfill-sqlite-bulk-history") / "desto.db",
            size,
            BULK_PER_TRANSACTION,
            bulk=True,
            history=True,
        )
    ctx.details[NAME] = {
        "runs": runs,
        "import_only_rss_mb": base_rss,
        "sqlite_ceiling_at": ceilings_at,
        "sqlite_bulk_ceiling_at": bulk_at,
        "sqlite_bulk_with_history_ceiling_at": bulk_history_at,
        "stage_cpu_us_per_key": stages,
    }
    redis_ceiling = ctx.ceilings.get("redis")
    for out in runs:
        ctx.add(
            Figure(
                NAME,
                f"keys/s over {_label(out['records'])} records",
                out["keys_per_s"],
                "keys/s",
                baseline=redis_ceiling,
                baseline_name="ceiling 1(a)",
                targets=[Target("value", ">=", TARGET_KEYS_PER_S)],
            )
        )
    compared = (
        ("SQLite's ceiling", ceilings_at, "1(b) over"),
        ("SQLite's bulk load", bulk_at, "bulk load of"),
        ("SQLite's bulk load with history rows", bulk_history_at, "bulk load, with history, of"),
    )
    for what, baselines, baseline_name in compared:
        for out in runs:
            label = _label(out["records"])
            ctx.add(
                Figure(
                    NAME,
                    f"keys/s over {label} records vs {what} at that size",
                    out["keys_per_s"],
                    "keys/s",
                    baseline=baselines[out["records"]],
                    baseline_name=f"{baseline_name} {label} rows",
                )
            )
    cores = os.cpu_count() or 1
    for out in runs:
        cpu = out["cpu_us_per_key"]
        label = _label(out["records"])
        ctx.add(Figure(NAME, f"CPU per key over {label}: the backfill process", cpu["backfill"], "µs"))
        ctx.add(Figure(NAME, f"CPU per key over {label}: redis-server", cpu["redis_server"], "µs"))
        ctx.add(Figure(NAME, f"backfill process CPU over {label}", out["backfill_cores"], "cores"))
        ctx.add(
            Figure(
                NAME,
                f"keys/s over {label} records vs the machine limit ({cores} cores / CPU per key of both)",
                out["keys_per_s"],
                "keys/s",
                baseline=cores * 1e6 / (cpu["backfill"] + cpu["redis_server"]),
                baseline_name="cores / CPU per key",
            )
        )
    small, large = runs[0], runs[-1]
    add_two_process_limit(ctx, _label(small["records"]), stages, small["cpu_us_per_key"]["redis_server"])
    ctx.add(
        Figure(
            NAME,
            f"peak RSS over {_label(small['records'])} records",
            small["peak_rss_mb"],
            "MB",
            baseline=base_rss,
            baseline_name="imports only",
        )
    )
    ctx.add(
        Figure(
            NAME,
            f"peak RSS over {_label(large['records'])} records (flat: vs {_label(small['records'])})",
            large["peak_rss_mb"],
            "MB",
            baseline=small["peak_rss_mb"],
            baseline_name=_label(small["records"]),
            targets=[Target("value", "<=", 100.0), Target("ratio", "<=", 1.2)],
        )
    )
