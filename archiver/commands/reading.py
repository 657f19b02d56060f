"""The commands that read the archive (or the central database): ``stats``, ``history``, ``show``,
``export``, and ``backup``'s copy of it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archiver.archive.reader import EXPORTS
from archiver.archive.store import StoreError
from archiver.commands import render
from archiver.commands.console import EXIT_OK, UsageError, machine_stream, print_json
from archiver.commands.options import Parents, command, filter_options
from archiver.config import Settings
from archiver.output import to_json, write_csv, write_json_array, write_jsonl, write_table


def add_stats(sub: Any, p: Parents) -> None:
    command(
        sub,
        "stats",
        [p.common, p.central, p.as_json],
        "counts, ages and sizes of the archive",
        "Records by kind and status, oldest and newest, tombstones, quarantine, file size, last event and last "
        "reconcile.",
        "desto-archiver stats --json",
        cmd_stats,
    )


def add_history(sub: Any, p: Parents) -> None:
    command(
        sub,
        "history",
        [
            p.common,
            p.central,
            p.as_json,
            filter_options("session status: starting, running, finished, failed, scheduled"),
        ],
        "list archived sessions, newest first",
        "The sessions in the archive, kept after Redis forgot them, with their status, times, jobs and whether "
        "their key is gone from Redis.",
        "desto-archiver history --status failed --since 7d",
        cmd_history,
    )


def add_show(sub: Any, p: Parents) -> None:
    show = command(
        sub,
        "show",
        [p.common, p.as_json],
        "one session: its jobs and full status history",
        "A session (by id, unique id prefix, or name: the most recent with that name), its jobs, and every "
        "status change the archiver observed, with durations and desto's own timestamps.",
        "desto-archiver show nightly-backup",
        cmd_show,
    )
    show.add_argument("session", help="session id, id prefix (6+ characters) or name")


def add_export(sub: Any, p: Parents) -> None:
    export = command(
        sub,
        "export",
        [p.common, p.central, filter_options("status (for quarantine: the record kind)")],
        "export sessions, jobs, favorites, at-jobs, history or quarantine as CSV or JSON Lines",
        "Stream a table out as CSV (header row, quoted as spreadsheets expect) or JSON Lines (one object per "
        "line, typed values). Time filters apply to start_time (sessions, jobs), created_at (favorites), "
        "request_time (at-jobs), observed_at (history) and first_seen_at (quarantine).",
        "desto-archiver export sessions --format csv --since 30d --output sessions.csv",
        cmd_export,
    )
    export.add_argument("what", choices=list(EXPORTS), help="the table to export")
    export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl", help="default jsonl")
    export.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    export.add_argument(
        "--raw-csv",
        action="store_true",
        help="write CSV cells as they are: by default a cell starting with = + - @, a tab or a carriage return "
        "gets a ' in front, so a spreadsheet shows it instead of running it as a formula",
    )


def add_backup(sub: Any, p: Parents) -> None:
    backup = command(
        sub,
        "backup",
        [p.common, p.as_json],
        "a consistent, verified copy of the live file",
        "Copy the archive with SQLite's online backup API (safe while the daemon writes), check the copy with "
        "PRAGMA integrity_check, and write it as one self-contained file. Refuses to overwrite without --force.",
        "desto-archiver backup /backups/desto-$(date +%F).db",
        cmd_backup,
    )
    backup.add_argument("destination", help="file (or existing folder) to write the copy to")
    backup.add_argument("--force", action="store_true", help="replace the destination if it exists")


def _statuses(what: str) -> frozenset[str] | None:
    """The values ``--status`` may take when listing ``what``; None: any text (at-jobs' statuses
    are desto's free text, and the history holds every kind's)."""
    from archiver.kinds import BY_PLURAL, Kind

    if what == "quarantine":  # there, --status is the record kind
        return frozenset(kind.value for kind in Kind)
    if what == "history":
        return None
    info = BY_PLURAL[what]
    return info.statuses if info.has_status else frozenset()


def _filters(args: argparse.Namespace, what: str) -> Any:
    from archiver.archive.reader import Filters, parse_when

    allowed = _statuses(what)
    if args.status is not None and allowed is not None and args.status not in allowed:
        if not allowed:
            raise UsageError(f"{what} have no status: --status does not apply")
        raise UsageError(f"--status {args.status!r} is not a status of {what} (one of: {', '.join(sorted(allowed))})")
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be 1 or more")
    return Filters(status=args.status, name=args.name, since=since, until=until, limit=args.limit)


def _report(
    settings: Settings, args: argparse.Namespace, query: Callable[[Any], Any], show: Callable[[Any], str]
) -> int:
    """Read something from the archive (read-only), then print it as JSON or for people."""
    from archiver.archive.reader import Reader

    with Reader.open(settings.db_path) as reader:
        data = query(reader)
    if args.json:
        print_json(data)
    else:
        print(show(data))
    return EXIT_OK


def _central(settings: Settings, args: argparse.Namespace) -> Any:
    """The central database's reader when --postgres-url (or ARCHIVER_POSTGRES_URL with --source) asks
    for it; None: read the file."""
    if args.postgres_url is None and args.source_filter is None:
        return None
    if settings.postgres_url is None:
        raise UsageError("--source reads the central database: give it with --postgres-url URL")
    from archiver.central.postgres import ShipError, require_psycopg

    try:
        require_psycopg()
    except ShipError as exc:
        raise UsageError(str(exc)) from None
    from archiver.central.reader import CentralReader

    return CentralReader.open(settings, args.source_filter)


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    central = _central(settings, args)
    if central is None:
        return _report(settings, args, lambda reader: reader.stats(), render.stats)
    with central:
        data = central.stats()
    if args.json:
        print_json(data)
    else:
        print(render.central_stats(data))
    return EXIT_OK


def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive.reader import Reader

    filters = _filters(args, "sessions")
    central = _central(settings, args)
    columns = render.HISTORY_COLUMNS if central is None else render.CENTRAL_HISTORY_COLUMNS
    # streamed: a million sessions print in flat memory
    with central if central is not None else Reader.open(settings.db_path) as reader:
        sessions = reader.sessions(filters)
        if args.json:
            write_json_array(sessions, machine_stream())
        else:
            write_table(render.history(sessions), columns, sys.stdout)
    return EXIT_OK


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    return _report(settings, args, lambda reader: reader.show(args.session), render.show)


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive.copies import file_mode, open_copy
    from archiver.archive.reader import Reader

    filters = _filters(args, args.what)
    if args.raw_csv and args.format != "csv":
        raise UsageError("--raw-csv applies to --format csv only")
    central = _central(settings, args)
    with central if central is not None else Reader.open(settings.db_path) as reader:
        columns, rows = reader.export(args.what, filters)
        if args.format == "csv" and args.what == "quarantine":
            rows = (_flat_payload(r) for r in rows)
        try:
            # never easier to read than the archive (the central database's: its owner's alone)
            out = (
                open_copy(Path(args.output), file_mode(None if central is not None else settings.db_path))
                if args.output
                else machine_stream()
            )
            try:
                if args.format == "csv":
                    count = write_csv(columns, rows, out, raw=args.raw_csv)
                else:
                    count = write_jsonl(rows, out)
            finally:
                if args.output:
                    out.close()
        except OSError as exc:
            raise StoreError(f"cannot write {args.output}: {exc.strerror}") from None
    if args.output:
        print(f"{count:,} {args.what} rows written to {args.output}", file=sys.stderr)
    return EXIT_OK


def _flat_payload(row: dict[str, Any]) -> dict[str, Any]:
    row["payload"] = to_json(row["payload"])
    return row


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.archive.backup import backup

    report = backup(settings.db_path, Path(args.destination), force=args.force)
    if args.json:
        print_json(report.__dict__)
    else:
        print(
            f"backed up {report.source} to {report.destination}: {report.bytes:,} bytes, "
            f"integrity {report.integrity}, {report.elapsed_s:.2f} s"
            + (
                "; erasures the archive had not finished yet were finished in the copy"
                if report.erasures_finished
                else ""
            )
        )
    return EXIT_OK
