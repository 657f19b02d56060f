"""6. Idle: the daemon's CPU time, wake-ups and memory when nothing changes.

The daemon (``python -m archiver run``, shipped defaults: heartbeat every 5 s, reconcile every
300 s) starts on a Redis holding 1 000 desto records, and is left alone once its first reconcile
is done and it has settled (5 s; smoke 0.5 s). Over 60 s (smoke: 5 s) are read: its CPU time
(user + system, all threads, from ``/proc/<pid>/stat``), in CPU seconds per minute (target
≤ 0.02); its wake-ups, the voluntary context switches of all its threads
(``/proc/<pid>/task/*/status``), per second (target ≤ 2; the details give them by thread); and
its resident memory at the end (``VmRSS``; target ≤ 45 MB), against a baseline process that only
imports what the daemon imports (the floor Python and the libraries set).

A sleeping process is no useful baseline; the ratio is against the same daemon's CPU while it
archives 1 000 changes/s (the writer process of the ingest benchmark, 10 s; smoke 3 s), in
CPU-s per minute too: the share of its working cost that it pays for doing nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess
from bench.records import load_records
from tests.procfs import status_kb, wakeups

NAME = "idle"
INGEST_RATE = 1_000


def run(ctx: Context) -> None:
    idle_s, settle_s, busy_s = (5.0, 0.5, 3.0) if ctx.smoke else (60.0, 5.0, 10.0)
    with ctx.redis(NAME) as server:
        load_records(server.port, 0, 1_000, ctx.tag(), jobs=True, ttl=True)
        with DaemonProcess(ctx, server, ctx.fresh_dir(NAME)) as daemon:
            daemon.start()
            time.sleep(settle_s)
            ctx.log(f"idle: measuring the daemon's CPU over {idle_s:g} s of no changes")
            cpu0, woke0, t0 = daemon.cpu_seconds(), wakeups(daemon.pid), time.monotonic()
            time.sleep(idle_s)
            cpu1, woke1, t1 = daemon.cpu_seconds(), wakeups(daemon.pid), time.monotonic()
            rss_mb = status_kb(daemon.pid, "VmRSS") / 1024
            idle_per_min = (cpu1 - cpu0) / (t1 - t0) * 60
            by_thread = {name: (n - woke0.get(name, 0)) / (t1 - t0) for name, n in woke1.items()}
            woke_per_s = sum(by_thread.values())
            ctx.log(f"idle: {idle_per_min:.3f} CPU-s per minute; now {INGEST_RATE:,} changes/s for {busy_s:g} s")
            writer = WriterProcess(ctx, server.port, INGEST_RATE, busy_s, ctx.tag())
            cpu2 = daemon.cpu_seconds()
            result = writer.result()
            cpu3 = daemon.cpu_seconds()
            busy_per_min = (cpu3 - cpu2) / result["elapsed_s"] * 60
            exit_code = daemon.stop()
            problems = daemon.problems()
    floor_mb = imports_rss_mb()
    ctx.details[NAME] = {
        "idle_seconds": t1 - t0,
        "idle_wakeups_per_s": woke_per_s,
        "idle_wakeups_per_s_by_thread": by_thread,
        "idle_rss_mb": rss_mb,
        "imports_rss_mb": floor_mb,
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
            targets=[Target("value", "<=", 0.02)],
        )
    )
    ctx.add(Figure(NAME, "daemon wake-ups with no changes", woke_per_s, "/s", targets=[Target("value", "<=", 2.0)]))
    ctx.add(
        Figure(
            NAME,
            "daemon memory with no changes",
            rss_mb,
            "MB",
            baseline=floor_mb,
            baseline_name="a process that only imports it",
            targets=[Target("value", "<=", 45.0)],
        )
    )
    ctx.add(Figure(NAME, "daemon CPU with no changes, share of one core", idle_per_min / 60 * 100, "%"))


def imports_rss_mb() -> float:
    """The resident memory of a Python process that imports what the daemon imports, and stops."""
    probe = (
        "import archiver.commands.cli, archiver.daemon.pipeline, archiver.redis_side.listener, "
        "archiver.daemon.fetcher\n"
        "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(done.stdout.strip()) / 1024
