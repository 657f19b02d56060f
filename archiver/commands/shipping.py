"""The commands for the central PostgreSQL database: ``ship`` (the whole file, once), ``grant``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from archiver.commands.console import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError, print_json, raw
from archiver.commands.options import Parents, command
from archiver.config import Settings


def add_ship(sub: Any, p: Parents) -> None:
    command(
        sub,
        "ship",
        [p.common, p.shipping, p.as_json],
        "copy the whole archive into PostgreSQL, then exit",
        "Copy every record, status change and quarantined value of the file into the central PostgreSQL "
        "database (creating its schema), delete central rows this file no longer holds, and exit. Safe to run "
        "again and beside 'run' on the same file; the daemon ships continuously when ARCHIVER_POSTGRES_URL is set.",
        "desto-archiver ship --postgres-url postgresql://archiver@db.example/desto --source gpu1",
        cmd_ship,
    )


def add_grant(sub: Any, p: Parents) -> None:
    grant = command(
        sub,
        "grant",
        [p.common, p.shipping, p.as_json],
        "let a host's PostgreSQL role write its source (run by the database's owner)",
        "As the owner of the central schema (its URL in --postgres-url): create or upgrade the schema, give ROLE "
        "what a host's archiver needs (connect, read every host's rows, write its own) and let it write the rows "
        "of the source --source NAME, and no other's. Run once per host, with a role per host; the role must "
        "exist (CREATE ROLE). Running it again moves the source to another role.",
        "desto-archiver grant --postgres-url postgresql://owner@db.example/desto --source gpu1 --role desto_gpu1",
        cmd_grant,
    )
    grant.add_argument("--role", required=True, metavar="ROLE", help="the host's PostgreSQL role")


def _lasting_refusal(exc: Exception) -> str | None:
    """What is wrong when PostgreSQL refuses for a reason that waiting will not change (a database
    or role that does not exist, a password it does not take); None for what may pass (a server
    down, a network, a lock)."""
    text = str(exc)
    for needle, what in (
        ("database", "the database does not exist"),
        ("role", "the role does not exist"),
    ):
        if f'{needle} "' in text and "does not exist" in text:
            return what
    if "password authentication failed" in text or "no password supplied" in text:
        return "PostgreSQL does not take these credentials"
    return None


def cmd_ship(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.central.postgres import ShipError, require_psycopg
    from archiver.central.ship import FileReplaced, Shipper

    if settings.postgres_url is None:
        raise UsageError("give the central database with --postgres-url URL (or ARCHIVER_POSTGRES_URL)")
    try:
        require_psycopg()
    except ShipError as exc:
        raise UsageError(str(exc)) from None
    import psycopg

    if not settings.db_path.exists():
        raise UsageError(f"{settings.db_path} does not exist: nothing to ship (give the archive with --db PATH)")
    live = sys.stderr.isatty() and not args.json
    last = [0.0]

    def progress(table: str, copied: int, total: int) -> None:
        now = time.monotonic()
        if live and now - last[0] >= 0.1:
            last[0] = now
            raw(sys.stderr).write(f"\r\033[K{table}: {copied:,} of {total:,} rows copied ")
            sys.stderr.flush()

    shipper = Shipper(settings)
    try:
        # the file is migrated (and its schema checked) the way every command opens it
        from archiver.archive.store import Store

        Store.open(settings.db_path, settings.sqlite_busy_timeout, build_deferred=False).close()
        shipper.open()
        report = shipper.copy_all(progress)
    except ShipError as exc:
        print(f"desto-archiver ship: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileReplaced as exc:
        print(f"desto-archiver ship: {exc}; run the same command again", file=sys.stderr)
        return EXIT_FAILURE
    except psycopg.Error as exc:
        lasting = _lasting_refusal(exc)
        print(
            f"desto-archiver ship: PostgreSQL at {settings.postgres_address()} failed: {str(exc).strip()}\n"
            + (
                f"  {lasting}: correct --postgres-url (ARCHIVER_POSTGRES_URL) or set the database up "
                "(docs/postgresql.md); running the same command again will not help"
                if lasting
                else "  nothing is lost: run the same command again once it answers"
            ),
            file=sys.stderr,
        )
        return EXIT_USAGE if lasting else EXIT_FAILURE
    finally:
        shipper.close()
    if live:
        raw(sys.stderr).write("\r\033[K")
    if args.json:
        print_json(report.as_dict())
        return EXIT_OK
    copied = ", ".join(f"{n:,} {t}" for t, n in report.copied.items())
    deleted = sum(report.deleted.values())
    print(
        f"shipped {settings.db_path} to {settings.postgres_address()} as source {report.source!r}: {copied}"
        + (f"; {deleted:,} central rows the file no longer holds deleted" if deleted else "")
        + f"; {report.elapsed_s:.1f} s"
    )
    return EXIT_OK


def cmd_grant(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.central.postgres import (
        PG_SCHEMA_VERSION,
        ShipError,
        connect,
        grant_source,
        migrate_pg,
        require_psycopg,
    )

    if settings.postgres_url is None:
        raise UsageError("give the central database with --postgres-url <owner's URL> (or ARCHIVER_POSTGRES_URL)")
    if args.source_name is None:
        raise UsageError("give the source the role may write with --source NAME (its ARCHIVER_SOURCE_NAME)")
    try:
        require_psycopg()
    except ShipError as exc:
        raise UsageError(str(exc)) from None
    import psycopg

    where = settings.postgres_address()
    try:
        with connect(settings) as pg:
            migrate_pg(pg, settings.postgres_schema)
            report = grant_source(pg, settings.postgres_schema, settings.source_name, args.role)
    except ShipError as exc:
        print(f"desto-archiver grant: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg.Error as exc:
        print(f"desto-archiver grant: PostgreSQL at {where} failed: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILURE
    report = {"database": where, "schema": settings.postgres_schema, "schema_version": PG_SCHEMA_VERSION, **report}
    if args.json:
        print_json(report)
        return EXIT_OK
    print(
        f"role {report['role']!r} may write the rows of source {report['source']!r} in {where} "
        f"(schema {settings.postgres_schema}, version {PG_SCHEMA_VERSION})"
        + (f"; it writes {', '.join(report['role_sources'])}" if len(report["role_sources"]) > 1 else "")
    )
    if report["not_granted"]:
        print(f"sources no role may write yet (their hosts cannot ship): {', '.join(report['not_granted'])}")
    return EXIT_OK
