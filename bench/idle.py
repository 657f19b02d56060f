"""6. Idle: the daemon's CPU time, wake-ups and memory when nothing changes.

The daemon (``python -m archiver run``, shipped defaults: heartbeat every 5 s, reconcile every
300 s) starts on a Redis holding 1 000 desto records, and is left alone once its first reconcile
is done and it has settled (5 s; smoke 0.5 s). Over 60 s (smoke: 5 s) are read: its CPU time
(user + system, all threads, from ``/proc/<pid>/stat``), in CPU seconds per minute (target
≤ 0.02); its wake-ups, the voluntary context switches of all its threads
(``/proc/<pid>/task/*/status``), per second (target ≤ 2; the details give them by thread); and
its resident memory at the end (``VmRSS``; target ≤ 45 MB), against a baseline process that only
imports what the daemon imports (the floor Python and the libraries set).

The daemon measured is the one users run: this checkout installed with its runtime dependencies
alone into an environment of its own (``pip install .``, as the image, the unit's and the quick
start's environments hold it). The development environment also holds what its tools bring
(``rich``, which structlog loads when it finds it, and others): its idle memory is given beside.
Where that installation cannot be made (no package index), and in the smoke run, the daemon runs
from the development environment, and the figures say so.

A sleeping process is no useful baseline; the ratio is against the same daemon's CPU while it
archives 1 000 changes/s (the writer process of the ingest benchmark, 10 s; smoke 3 s), in
CPU-s per minute too: the share of its working cost that it pays for doing nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess
from bench.records import load_records
from tests.helpers import REPO
from tests.procfs import status_kb, wakeups

NAME = "idle"
INGEST_RATE = 1_000


def run(ctx: Context) -> None:
    idle_s, settle_s, busy_s = (5.0, 0.5, 3.0) if ctx.smoke else (60.0, 5.0, 10.0)
    python, installed = (sys.executable, "the development environment (smoke run)")
    if not ctx.smoke:
        python, installed = runtime_install(ctx)
    ctx.log(f"idle: the daemon of {installed}")
    with ctx.redis(NAME) as server:
        load_records(server.port, 0, 1_000, ctx.tag(), jobs=True, ttl=True)
        dev_rss_mb = None
        if python != sys.executable:
            with DaemonProcess(ctx, server, ctx.fresh_dir(NAME)) as dev:
                dev.start()
                time.sleep(settle_s + 5.0)
                dev_rss_mb = status_kb(dev.pid, "VmRSS") / 1024
        with DaemonProcess(ctx, server, ctx.fresh_dir(NAME), python=python) as daemon:
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
    floor_mb = imports_rss_mb(python)
    ctx.details[NAME] = {
        "installation": installed,
        "development_environment_idle_rss_mb": dev_rss_mb,
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
    if dev_rss_mb is not None:
        ctx.add(Figure(NAME, "daemon memory with no changes, development environment", dev_rss_mb, "MB"))
    ctx.add(Figure(NAME, "daemon CPU with no changes, share of one core", idle_per_min / 60 * 100, "%"))


def runtime_install(ctx: Context) -> tuple[str, str]:
    """(the interpreter of an environment holding this checkout and its runtime dependencies alone,
    what it is); the development environment's where none can be made."""
    venv = ctx.workdir / "runtime-env"
    python = venv / "bin" / "python"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        ctx.log(f"idle: no installation of the runtime dependencies alone ({type(exc).__name__})")
        return sys.executable, "the development environment (no runtime installation could be made)"
    return str(python), "an installation of the runtime dependencies alone (pip install .)"


def imports_rss_mb(python: str = sys.executable) -> float:
    """The resident memory of a Python process that imports what the daemon imports, and stops."""
    probe = (
        "import archiver.commands.cli, archiver.daemon.pipeline, archiver.redis_side.listener, "
        "archiver.daemon.fetcher\n"
        "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    )
    cwd = None if python == sys.executable else Path(python).parent  # the installed copy, not the checkout's
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, cwd=cwd)
    return int(done.stdout.strip()) / 1024
