"""6. Idle: the daemon's CPU time when nothing changes.

The daemon (``python -m archiver run``, shipped defaults: heartbeat every 5 s, reconcile every
300 s) starts on a Redis holding 1 000 desto records, and is left alone once its first reconcile
is done and it has settled (2 s; smoke 0.5 s). Its CPU time (user + system, all threads, from
``/proc/<pid>/stat``) is read over 60 s (smoke: 5 s), reported as CPU seconds per minute and as
% of one core. Target: ≈ 0, taken as ≤ 0.6 CPU-s per minute (1 % of one core).

A sleeping process is no useful baseline; the ratio is against the same daemon's CPU while it
archives 1 000 changes/s (the writer process of the ingest benchmark, 10 s; smoke 3 s), in
CPU-s per minute too: the share of its working cost that it pays for doing nothing.
"""

from __future__ import annotations

import time

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess
from bench.records import load_records

NAME = "idle"
INGEST_RATE = 1_000


def run(ctx: Context) -> None:
    idle_s, settle_s, busy_s = (5.0, 0.5, 3.0) if ctx.smoke else (60.0, 2.0, 10.0)
    with ctx.redis(NAME) as server:
        load_records(server.port, 0, 1_000, ctx.tag(), jobs=True, ttl=True)
        with DaemonProcess(ctx, server, ctx.fresh_dir(NAME)) as daemon:
            daemon.start()
            time.sleep(settle_s)
            ctx.log(f"idle: measuring the daemon's CPU over {idle_s:g} s of no changes")
            cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
            time.sleep(idle_s)
            cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
            idle_per_min = (cpu1 - cpu0) / (t1 - t0) * 60
            ctx.log(f"idle: {idle_per_min:.3f} CPU-s per minute; now {INGEST_RATE:,} changes/s for {busy_s:g} s")
            writer = WriterProcess(ctx, server.port, INGEST_RATE, busy_s, ctx.tag())
            cpu2 = daemon.cpu_seconds()
            result = writer.result()
            cpu3 = daemon.cpu_seconds()
            busy_per_min = (cpu3 - cpu2) / result["elapsed_s"] * 60
            exit_code = daemon.stop()
            problems = daemon.problems()
    ctx.details[NAME] = {
        "idle_seconds": t1 - t0,
        "idle_cpu_s": cpu1 - cpu0,
        "idle_cpu_s_per_min": idle_per_min,
        "busy_rate": INGEST_RATE,
        "busy_seconds": result["elapsed_s"],
        "busy_cpu_s": cpu3 - cpu2,
        "busy_cpu_s_per_min": busy_per_min,
        "daemon_exit_code": exit_code,
        "daemon_problems": problems,
    }
    ctx.log(f"idle: {busy_per_min:.2f} CPU-s per minute at {INGEST_RATE:,} changes/s")
    ctx.add(
        Figure(
            NAME,
            "daemon CPU with no changes",
            idle_per_min,
            "CPU-s/min",
            baseline=busy_per_min,
            baseline_name=f"at {INGEST_RATE:,} changes/s",
            targets=[Target("value", "<=", 0.6)],
        )
    )
    ctx.add(Figure(NAME, "daemon CPU with no changes, share of one core", idle_per_min / 60 * 100, "%"))
