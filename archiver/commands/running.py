"""The commands that run the archiver: ``run`` (the daemon), ``backfill`` (one pass), ``systemd-unit``."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from archiver.commands import render
from archiver.commands.console import EXIT_FAILURE, EXIT_OK, UsageError, print_json, raw
from archiver.commands.options import Parents, command
from archiver.config import Settings
from archiver.log import get_logger

log = get_logger("archiver.commands.running")


def add_run(sub: Any, p: Parents) -> None:
    run = command(
        sub,
        "run",
        [p.common, p.shipping],
        "archive continuously (the daemon)",
        "Follow Redis' keyspace notifications and desto's channels, and keep every session, job, favorite and "
        "at-job in the SQLite file. Stops cleanly on SIGTERM, SIGHUP (its terminal closed) or Ctrl-C.",
        "REDIS_HOST=localhost SQLITE_DB_PATH=desto_data/desto.db desto-archiver run",
        cmd_run,
    )
    run.add_argument("--flush-interval", metavar="S", help="max seconds a change waits (ARCHIVER_FLUSH_INTERVAL)")
    run.add_argument(
        "--reconcile-interval", metavar="S", help="seconds between full reconciles (ARCHIVER_RECONCILE_INTERVAL)"
    )
    run.add_argument(
        "--no-configure-notifications",
        dest="configure_notifications",
        action="store_const",
        const=False,
        help="never CONFIG SET notify-keyspace-events (ARCHIVER_CONFIGURE_NOTIFICATIONS=false)",
    )
    run.add_argument("--metrics-port", metavar="PORT", help="serve Prometheus metrics (ARCHIVER_METRICS_PORT)")
    run.add_argument("--metrics-host", metavar="ADDR", help="metrics address (ARCHIVER_METRICS_HOST, 127.0.0.1)")
    run.add_argument(
        "--allow-root",
        dest="allow_root",
        action="store_const",
        const=True,
        help="run as root all the same (ARCHIVER_ALLOW_ROOT=true); refused otherwise",
    )


def add_backfill(sub: Any, p: Parents) -> None:
    backfill = command(
        sub,
        "backfill",
        [p.common, p.as_json],
        "one full pass over Redis into the file, then exit",
        "Scan every desto key in Redis once, archive it, tombstone archived records whose keys are gone, print a "
        "summary and exit. Safe while 'run' is active on the same file; needs no keyspace notifications.",
        "desto-archiver backfill --db /srv/desto/desto_data/desto.db",
        cmd_backfill,
    )
    backfill.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")


def add_systemd_unit(sub: Any, p: Parents) -> None:
    unit = command(
        sub,
        "systemd-unit",
        [p.common],
        "print a systemd unit for this installation",
        "Print a hardened Type=notify unit whose ExecStart is this installation's desto-archiver and whose "
        "writable path is the archive's folder. Install it as /etc/systemd/system/desto-archiver.service.",
        "desto-archiver systemd-unit --user desto > /etc/systemd/system/desto-archiver.service",
        cmd_systemd_unit,
    )
    unit.add_argument(
        "--user", default=None, help="the account to run as (default: the current one; needed when run as root)"
    )
    unit.add_argument(
        "--env-file", default="/etc/desto-archiver/desto-archiver.env", help="EnvironmentFile= (optional file)"
    )


def collect_less_often() -> None:
    """Every batch allocates thousands of small containers (rows, tuples, lists), and Python's
    default threshold runs a garbage collection every 700 of them, a large share of the read,
    normalize and write path's CPU (the performance notes have the figure). The archiver makes
    almost no reference cycles (reference counting frees its rows), so collecting less often
    costs no memory to speak of."""
    gc.set_threshold(10_000, 10, 10)


def _may_create_archive(settings: Settings) -> None:
    """For the commands that create the archive when it is missing: refuse a path whose folder
    does not exist (a mistyped --db), desto's default desto_data/ excepted."""
    from archiver.archive.store import archive_path_refused

    refused = archive_path_refused(settings.db_path)
    if refused is not None:
        raise UsageError(refused)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.daemon.pipeline import Daemon

    _may_create_archive(settings)

    if settings.postgres_url is not None:
        from archiver.central.postgres import ShipError, require_psycopg

        try:
            require_psycopg()
        except ShipError as exc:
            raise UsageError(str(exc)) from None
    if os.geteuid() == 0 and not settings.allow_root:
        raise UsageError(
            "refusing to run as root: the daemon creates and writes files in the archive's folder, which desto's "
            "group may write too. Run it as the account that owns the archive (e.g. sudo -u desto desto-archiver "
            "run; the image and the systemd unit do), or, where root is meant (a container of its own), pass "
            "--allow-root or set ARCHIVER_ALLOW_ROOT=true"
        )
    collect_less_often()
    daemon = Daemon(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping:  # a second signal: the operator wants out now
            with contextlib.suppress(OSError):  # stderr may be a closed terminal or pipe
                os.write(2, b"desto-archiver: second signal, exiting without flushing\n")
            os._exit(EXIT_FAILURE)
        daemon.request_stop()

    # SIGHUP: the terminal it runs in was closed. Stop as on SIGTERM, not as killed. A daemon started
    # to outlive its terminal inherits SIGHUP ignored (`nohup`), and a shell's background job
    # SIGINT: those stay ignored, as Python itself leaves an inherited ignored SIGINT alone.
    signal.signal(signal.SIGTERM, on_signal)
    for signum in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, on_signal)
    daemon.wakeup.wake_on_signals()
    daemon.run()
    return EXIT_OK


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.commands.backfill import Progress, backfill
    from archiver.daemon.archive_file import log_created

    _may_create_archive(settings)
    existed = settings.db_path.exists()
    collect_less_often()
    live = sys.stderr.isatty() and not args.json
    last = [time.monotonic()]  # the first line after 0.1 s (live) or 5 s (logged): a quick run logs none

    def progress(p: Progress) -> None:
        now = time.monotonic()
        if live and now - last[0] >= 0.1:
            last[0] = now
            raw(sys.stderr).write(
                f"\r{p.phase}: {p.keys_scanned:,} keys scanned, {p.keys_read:,} read ({p.keys_per_s:,.0f}/s), "
                f"{p.written:,} written, {p.quarantined:,} quarantined, {p.elapsed_s:.1f} s "
            )
            sys.stderr.flush()
        elif not live and now - last[0] >= 5:
            last[0] = now
            log.info(
                "backfill.progress",
                phase=p.phase,
                keys_scanned=p.keys_scanned,
                keys_read=p.keys_read,
                written=p.written,
                keys_per_s=round(p.keys_per_s),
            )

    report = backfill(settings, progress, dry_run=args.dry_run)
    if live:
        raw(sys.stderr).write("\r\033[K")
    if not existed and not args.dry_run:
        log_created(settings.db_path)
    if args.json:
        print_json(report.as_dict())
        return EXIT_OK
    print(render.backfill(report))
    return EXIT_OK


def cmd_systemd_unit(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.daemon.systemd import render_unit

    executable = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "desto-archiver" else None
    try:
        unit = render_unit(settings, executable=executable, user=args.user, env_file=args.env_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(unit, end="")
    return EXIT_OK
