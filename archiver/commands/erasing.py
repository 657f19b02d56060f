"""The commands that erase: ``forget`` (named records), ``prune`` (records gone from Redis long ago)."""

from __future__ import annotations

import argparse
from typing import Any

from archiver.archive.store import StoreError
from archiver.commands import render
from archiver.commands.console import EXIT_OK, UsageError, print_json
from archiver.commands.options import Parents, command
from archiver.config import Settings


def add_forget(sub: Any, p: Parents) -> None:
    forget = command(
        sub,
        "forget",
        [p.common, p.as_json],
        "erase records for good (a secret in a command line, a user's request)",
        "Erase sessions (with their jobs), jobs, favorites or at-jobs by id, or sessions and favorites by name: "
        "their rows, status history and quarantine entries go, their bytes are scrubbed from the file and its "
        "WAL, and the archiver never writes them again from Redis (a running daemon included). Only the id, "
        "when and how are kept. Exits 2 for an id or name the archive does not know.",
        "desto-archiver forget 3f2a9c1e-... --name deploy-with-token --dry-run",
        cmd_forget,
    )
    forget.add_argument("ids", nargs="*", metavar="ID", help="session, job, favorite or at-job id")
    forget.add_argument("--name", action="append", default=[], metavar="NAME", help="a session or favorite name")
    forget.add_argument("--dry-run", action="store_true", help="show what would be erased; change nothing")


def add_prune(sub: Any, p: Parents) -> None:
    prune = command(
        sub,
        "prune",
        [p.common, p.as_json],
        "erase records that left Redis longer ago than a period, and give the space back",
        "Erase every record whose key left Redis (its tombstone) before the cut-off, never a live one, in small "
        "transactions, then shrink the file in small steps where it is in incremental auto-vacuum mode "
        "(--vacuum turns that on, with one full VACUUM). ARCHIVER_RETENTION_DAYS makes the daemon do the same.",
        "desto-archiver prune --older-than 90d --dry-run",
        cmd_prune,
    )
    prune.add_argument("--older-than", required=True, metavar="SPAN", help="e.g. 90d, 12w, 36h")
    prune.add_argument("--dry-run", action="store_true", help="count what would be erased; change nothing")
    prune.add_argument(
        "--vacuum",
        action="store_true",
        help="rewrite the whole file once (turns on incremental auto-vacuum); desto's writes wait for all of it",
    )


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive import erase
    from archiver.archive.store import Store

    if not args.ids and not args.name:
        raise UsageError("name at least one ID or --name NAME")
    if not settings.db_path.exists():
        raise StoreError(f"no archive at {settings.db_path}: nothing to forget (point SQLITE_DB_PATH or --db at it)")
    store = Store.open(settings.db_path, settings.sqlite_busy_timeout)
    try:
        try:
            targets, already = erase.resolve(store.conn, args.ids, args.name)
        except erase.UnknownRecord as exc:
            raise UsageError(f"{exc}; nothing was erased") from None
        done = None if args.dry_run or not targets else erase.forget(store, targets)
    finally:
        store.close()
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "records": [t.as_dict() for t in targets],
                "already_erased": already,
                "erased": None if done is None else done.as_dict(),
            }
        )
        return EXIT_OK
    print(render.forget(targets, already, done, args.dry_run))
    return EXIT_OK


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive import erase
    from archiver.archive.reader import parse_when
    from archiver.archive.store import Store

    span = args.older_than.strip()
    if not span or span[-1] not in "smhdw" or not span[:-1].strip().isdigit():
        raise UsageError(f"--older-than {args.older_than!r}: give a span like 90d, 12w or 36h")
    cutoff = parse_when(span).astimezone().replace(microsecond=0)
    cutoff_us = int(cutoff.timestamp() * 1_000_000)
    if not settings.db_path.exists():
        raise StoreError(f"no archive at {settings.db_path}: nothing to prune (point SQLITE_DB_PATH or --db at it)")
    store = Store.open(settings.db_path, settings.sqlite_busy_timeout)
    try:
        if args.dry_run:
            targets = erase.expired(store.conn, cutoff_us)
            counts: dict[str, int] = {}
            for t in targets:
                counts[t.kind.value] = counts.get(t.kind.value, 0) + 1
            data: dict[str, Any] = {"dry_run": True, "cutoff": cutoff.isoformat(), "records": counts}
        else:
            pruned = erase.prune(store, cutoff_us, settings.batch_size)
            if args.vacuum:
                erase.scrub(store, "vacuum")
                pruned.bytes_after = erase.file_bytes(store.conn)
            data = {"dry_run": False, "cutoff": cutoff.isoformat(), **pruned.as_dict()}
    finally:
        store.close()
    if args.json:
        print_json(data)
    else:
        print(render.prune(data))
    return EXIT_OK
