"""The options commands share (each a parent parser) and how a command's parser is made."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archiver.config import Settings


@dataclass(frozen=True)
class Parents:
    """The shared options, made once for the whole parser: the configuration, the central
    database's for the commands that ship (``shipping``) and for those that read it (``central``),
    and ``--json``."""

    common: argparse.ArgumentParser
    shipping: argparse.ArgumentParser
    central: argparse.ArgumentParser
    as_json: argparse.ArgumentParser


def config_options() -> argparse.ArgumentParser:
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


def postgres_options(reading: bool) -> argparse.ArgumentParser:
    """Where the central PostgreSQL database is; for reading commands, which host's history."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("PostgreSQL (docs/postgresql.md)")
    group.add_argument(
        "--postgres-url",
        metavar="URL",
        help="postgresql:// URL of the central database (ARCHIVER_POSTGRES_URL)"
        + ("; read it instead of the file" if reading else ""),
    )
    group.add_argument(
        "--postgres-schema", metavar="NAME", help="its schema (ARCHIVER_POSTGRES_SCHEMA, desto_archiver)"
    )
    if reading:
        group.add_argument("--source", dest="source_filter", metavar="NAME", help="only this host's history")
    else:
        group.add_argument(
            "--source", dest="source_name", metavar="NAME", help="this host's name there (ARCHIVER_SOURCE_NAME)"
        )
    return parent


def json_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="machine output (JSON) instead of a table")
    return parent


def filter_options(statuses: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("filters")
    group.add_argument("--status", metavar="S", help=statuses)
    group.add_argument("--name", metavar="TEXT", help="name contains TEXT (case-insensitive)")
    group.add_argument("--since", metavar="WHEN", help="from WHEN: 2026-11-01, 2026-11-01T10:00, or 7d, 24h, 30m ago")
    group.add_argument("--until", metavar="WHEN", help="before WHEN (same forms as --since)")
    group.add_argument("--limit", metavar="N", type=int, help="at most N rows")
    return parent


def command(
    sub: Any,
    name: str,
    parents: list[argparse.ArgumentParser],
    help_text: str,
    description: str,
    example: str,
    handler: Callable[[Settings, argparse.Namespace], int],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=parents,
        help=help_text,
        description=description,
        epilog=f"Example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser
