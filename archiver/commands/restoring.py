"""The command that writes archived favorites back into Redis: ``restore``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from archiver.archive.store import StoreError
from archiver.commands import render
from archiver.commands.console import EXIT_FAILURE, EXIT_OK, UsageError
from archiver.commands.options import Parents, command
from archiver.config import Settings
from archiver.output import to_json


def add_restore(sub: Any, p: Parents) -> None:
    restore = command(
        sub,
        "restore",
        [p.common, p.as_json],
        "write archived favorites back into Redis (after a flush or a restart without persistence)",
        "Write the favorites the archive holds and Redis lost back into Redis as desto writes them: the hash, "
        "its name index and desto's set of favorites. A favorite still in Redis is left alone, one whose name "
        "another favorite in Redis uses is reported and not written (exit 1), one a person deleted in desto is "
        "written only with --include-deleted. Sessions and jobs are never written back. Safe beside 'run'.",
        "desto-archiver restore favorites --dry-run",
        cmd_restore,
    )
    restore.add_argument("what", choices=["favorites"], help="what to write back (favorites only)")
    restore.add_argument("--id", action="append", default=[], metavar="ID", help="only this favorite (repeatable)")
    restore.add_argument("--name", action="append", default=[], metavar="NAME", help="only favorites of this name")
    restore.add_argument(
        "--all",
        action="store_true",
        help="every archived favorite missing from Redis (the default without --id, --name)",
    )
    restore.add_argument("--include-deleted", action="store_true", help="also favorites a person deleted in desto")
    restore.add_argument("--dry-run", action="store_true", help="show what would be written; write nothing")


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive.store import Store
    from archiver.commands import restore
    from archiver.redis_side.source import Source

    if args.all and (args.id or args.name):
        raise UsageError(
            "--all is every favorite missing from Redis: give it alone, or name favorites with --id/--name"
        )
    if not settings.db_path.exists():
        raise StoreError(f"no archive at {settings.db_path}: nothing to restore (point SQLITE_DB_PATH or --db at it)")
    store = Store.open(settings.db_path, settings.sqlite_busy_timeout, build_deferred=not args.dry_run)
    source = Source(settings)
    try:
        try:
            favorites = restore.select(store.conn, args.id, args.name)
        except restore.UnknownFavorite as exc:
            raise UsageError(f"{exc}; nothing was restored") from None
        report = restore.restore(
            settings, store, source, favorites, include_deleted=args.include_deleted, dry_run=args.dry_run
        )
    finally:
        source.close()
        store.close()
    print(to_json(report.as_dict()) if args.json else render.restore(report, every=bool(args.id or args.name)))
    if report.refused is not None:
        print(f"desto-archiver restore: {report.refused}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE
