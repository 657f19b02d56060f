"""The commands that look at the set-up: ``check`` (the doctor and the verify), ``health``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from archiver.commands import render
from archiver.commands.console import EXIT_FAILURE, EXIT_OK, print_json
from archiver.commands.options import Parents, command
from archiver.config import Settings


def add_check(sub: Any, p: Parents) -> None:
    check = command(
        sub,
        "check",
        [p.common, p.shipping, p.as_json],
        "check the whole set-up and verify the archive against Redis",
        "Redis reachable and its version; keyspace notification flags and whether CONFIG is allowed; the file "
        "(writable, WAL, schema); the daemon (heartbeat, lag); then every live desto record compared with the "
        "archive: missing, differing, extra. Exits 1 when anything is wrong.",
        "desto-archiver check --show-diffs",
        cmd_check,
    )
    check.add_argument("--show-diffs", action="store_true", help="list each difference, column by column")
    check.add_argument("--no-verify", dest="verify", action="store_false", help="skip the archive-vs-Redis compare")
    check.add_argument("--no-daemon", dest="daemon", action="store_false", help="no daemon is expected to run")
    check.add_argument(
        "--integrity", action="store_true", help="SQLite's quick_check of the whole file (it reads every page)"
    )
    check.add_argument(
        "--settle", metavar="S", type=float, default=2.0, help="wait before re-checking differences (default 2)"
    )


def add_health(sub: Any, p: Parents) -> None:
    command(
        sub,
        "health",
        [p.common, p.as_json],
        "exit 0 when the daemon on this file is alive and Redis answers",
        "For Docker's HEALTHCHECK and monitors: healthy when the daemon writing the file has a recent heartbeat, "
        "is connected to Redis and not failing, and Redis answers this process too. Prints one line.",
        "desto-archiver health || echo unhealthy",
        cmd_health,
    )


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    import sqlite3

    from archiver.archive.sql import read_only
    from archiver.archive.store import DAMAGED_ADVICE, is_damaged
    from archiver.commands.check import Finding, doctor, verify
    from archiver.redis_side.source import Source

    source = Source(settings)
    try:
        findings, redis_ok = doctor(settings, source, with_daemon=args.daemon, integrity=args.integrity)
        report = None
        readable = not any(f.check == "integrity" and f.status == "fail" for f in findings)
        if args.verify and redis_ok and readable and os.path.exists(settings.db_path):
            conn = read_only(settings.db_path, timeout=10)
            try:
                report = verify(source, conn, settings.batch_size, args.settle)
            except sqlite3.DatabaseError as exc:
                if not is_damaged(exc):
                    raise
                findings.append(Finding("verify", "fail", f"SQLite could not read the archive: {exc}", DAMAGED_ADVICE))
            finally:
                conn.close()
    finally:
        source.close()
    ok = all(f.status != "fail" for f in findings) and (report is None or report.ok)
    if args.json:
        print_json(
            {
                "ok": ok,
                "checks": [f.as_dict() for f in findings],
                "verify": None if report is None else report.as_dict(),
            }
        )
        return EXIT_OK if ok else EXIT_FAILURE
    print(render.check(findings, report, args.show_diffs))
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.daemon.health import health

    healthy, reason = health(settings)
    if args.json:
        print_json({"healthy": healthy, "reason": reason})
    else:
        print(("healthy: " if healthy else "unhealthy: ") + reason)
    return EXIT_OK if healthy else EXIT_FAILURE
