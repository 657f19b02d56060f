"""The command line: argument handling and output only; the work lives in the stage modules.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from archiver import __version__
from archiver.config import ConfigError, Settings, load_settings
from archiver.log import configure, get_logger
from archiver.source import CONNECTION_ERRORS
from archiver.store import StoreError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

log = get_logger("archiver.cli")


def _config_options() -> argparse.ArgumentParser:
    """Options every command shares; each overrides the environment variable named in its help."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration (overrides the environment)")
    group.add_argument("--redis-url", metavar="URL", help="redis://, rediss:// or unix:// URL (REDIS_URL)")
    group.add_argument("--redis-host", metavar="HOST", help="Redis host (REDIS_HOST, default localhost)")
    group.add_argument("--redis-port", metavar="PORT", help="Redis port (REDIS_PORT, default 6379)")
    group.add_argument("--redis-db", metavar="N", help="Redis database (REDIS_DB, default 0)")
    group.add_argument(
        "--db",
        dest="sqlite_db_path",
        metavar="PATH",
        help="the SQLite file (SQLITE_DB_PATH, default $DESTO_DATA_DIR/desto.db or desto_data/desto.db)",
    )
    group.add_argument("--batch-size", metavar="N", help="keys per read and transaction (ARCHIVER_BATCH_SIZE)")
    group.add_argument("--log-format", choices=["auto", "json", "console"], help="ARCHIVER_LOG_FORMAT")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="ARCHIVER_LOG_LEVEL")
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = _config_options()
    parser = argparse.ArgumentParser(
        prog="desto-archiver",
        description="Keep desto's Redis history forever in a SQLite file desto's History tab can read.",
        epilog="Example: desto-archiver run   (desto's Redis on localhost:6379, writing desto_data/desto.db)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        parents=[common],
        help="archive continuously (the daemon)",
        description="Follow Redis' keyspace notifications and desto's channels, and keep every session, job, "
        "favorite and at-job in the SQLite file. Stops cleanly on SIGTERM or Ctrl-C.",
        epilog="Example:\n  REDIS_HOST=localhost SQLITE_DB_PATH=desto_data/desto.db desto-archiver run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    run.set_defaults(handler=cmd_run)

    backfill = sub.add_parser(
        "backfill",
        parents=[common],
        help="one full pass over Redis into the file, then exit",
        description="Scan every desto key in Redis once, archive it, tombstone archived records whose keys are "
        "gone, print a summary and exit. Safe while 'run' is active on the same file.",
        epilog="Example:\n  desto-archiver backfill --db /srv/desto/desto_data/desto.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    backfill.add_argument("--json", action="store_true", help="print the summary as JSON")
    backfill.set_defaults(handler=cmd_backfill)
    return parser


_SETTING_ARGS = (
    "redis_url",
    "redis_host",
    "redis_port",
    "redis_db",
    "sqlite_db_path",
    "batch_size",
    "log_format",
    "log_level",
    "flush_interval",
    "reconcile_interval",
    "configure_notifications",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(**{name: getattr(args, name, None) for name in _SETTING_ARGS})
    except ConfigError as exc:
        print(f"desto-archiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_format, settings.log_level)
    try:
        code: int = args.handler(settings, args)
        return code
    except StoreError as exc:
        print(f"desto-archiver: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CONNECTION_ERRORS as exc:
        print(
            f"desto-archiver: cannot reach Redis at {settings.redis_address()}: {exc}\n"
            "  is Redis running? Set REDIS_HOST/REDIS_PORT/REDIS_DB or REDIS_URL (or --redis-url).",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.pipeline import Daemon

    daemon = Daemon(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping:  # a second signal: the operator wants out now
            os.write(2, b"desto-archiver: second signal, exiting without flushing\n")
            os._exit(EXIT_FAILURE)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run()
    return EXIT_OK


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.backfill import backfill

    report = backfill(settings)
    summary: dict[str, Any] = report.as_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        written = ", ".join(f"{n} {kind}" for kind, n in sorted(report.written.items())) or "nothing new"
        print(
            f"backfill done: {report.keys_read} keys read in {report.elapsed_s:.2f} s "
            f"({report.keys_per_s:,.0f} keys/s)\n"
            f"  written: {written}\n  unchanged: {report.unchanged}\n"
            f"  tombstoned: {report.tombstoned}\n"
            f"  quarantined: {report.quarantined} new, {report.still_quarantined} already in quarantine"
        )
    return EXIT_OK
