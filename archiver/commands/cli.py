"""The command line: the parser made from each command's module, the settings, and the one way
every command ends (its exit code, its errors). The commands' modules: ``running`` (run, backfill,
systemd-unit), ``shipping`` (ship, grant), ``checking`` (check, health), ``reading`` (stats, history,
show, export, backup), ``erasing`` (forget, prune), ``restoring`` (restore); what they share:
``options`` (the shared options) and ``console`` (output, exit codes); ``render`` writes for people.

Exit codes: 0 success, 1 runtime failure (or, for check and health, a problem found), 2 usage or
configuration error. Every command honours the same configuration as ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from archiver import __version__
from archiver.archive.store import StoreError, UnsupportedSQLite
from archiver.commands import checking, erasing, reading, restoring, running, shipping
from archiver.commands.console import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ForPeople,
    OutputClosed,
    Stdout,
    UsageError,
)
from archiver.commands.options import Parents, config_options, json_option, postgres_options
from archiver.config import ConfigError, Settings, load_settings
from archiver.log import configure, get_logger
from archiver.redis_side.redis_client import CONNECTION_ERRORS, transient_reply, unreachable_advice

log = get_logger("archiver.commands.cli")


def build_parser() -> argparse.ArgumentParser:
    p = Parents(
        common=config_options(),
        shipping=postgres_options(reading=False),
        central=postgres_options(reading=True),
        as_json=json_option(),
    )
    parser = argparse.ArgumentParser(
        prog="desto-archiver",
        description="Keep desto's Redis history forever in a SQLite file desto's History tab can read.",
        epilog="Example: desto-archiver run   (desto's Redis on localhost:6379, writing desto_data/desto.db)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # in the order `desto-archiver --help` lists them
    for add in (
        running.add_run,
        running.add_backfill,
        shipping.add_ship,
        shipping.add_grant,
        checking.add_check,
        reading.add_stats,
        reading.add_history,
        reading.add_show,
        reading.add_export,
        reading.add_backup,
        checking.add_health,
        erasing.add_forget,
        restoring.add_restore,
        erasing.add_prune,
        running.add_systemd_unit,
    ):
        add(sub, p)
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
    "metrics_port",
    "metrics_host",
    "postgres_url",
    "postgres_schema",
    "source_name",
    "allow_root",
)

_URL_FLAGS = {"redis_url": ("--redis-url", "REDIS_URL"), "postgres_url": ("--postgres-url", "ARCHIVER_POSTGRES_URL")}


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder on the way may not be looked into: the command itself says so
        return False


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an argument the command does not take is reported with the command's own usage (and
    the nearest option it does take), not the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        command: argparse.ArgumentParser = commands.choices[args.command]
        options = [o for action in command._actions for o in action.option_strings]
        hints = [
            f"{word}: did you mean {near[0]}?"
            for word in extra
            if word.startswith("--") and (near := difflib.get_close_matches(word.split("=")[0], options, n=1))
        ]
        command.error(f"unrecognized arguments: {' '.join(extra)}" + "".join(f"\n  {hint}" for hint in hints))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        settings = load_settings(**{name: getattr(args, name, None) for name in _SETTING_ARGS})
    except ConfigError as exc:
        print(f"desto-archiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_format, settings.log_level)
    _warn_passwords_in_arguments(args, settings)
    os.umask(settings.umask)  # 0007 unless set: the archive holds command lines
    if _is_folder(settings.db_path):
        path = settings.db_path.absolute()
        print(f"desto-archiver {args.command}: {path} is a folder: give the archive's file, e.g. {path / 'desto.db'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    stdout, sys.stdout = sys.stdout, ForPeople(Stdout(sys.stdout))
    stderr, sys.stderr = sys.stderr, ForPeople(sys.stderr)
    try:
        code: int = args.handler(settings, args)
        sys.stdout.flush()
        return code
    except OutputClosed:  # e.g. `desto-archiver history | head`
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            # what is still buffered has nowhere to go: let Python's own flush at exit succeed
            os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())
        return EXIT_OK
    except UsageError as exc:
        print(f"desto-archiver {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnsupportedSQLite as exc:  # a set-up to change: retrying (a service restart) cannot help
        print(f"desto-archiver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"desto-archiver: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CONNECTION_ERRORS as exc:
        print(
            f"desto-archiver: cannot reach Redis at {settings.redis_address()}: {exc}\n"
            f"  {unreachable_advice(exc, retried=False)}.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except OSError as exc:  # a file or folder of the user's: not Redis, and not worth a traceback
        print(f"desto-archiver {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        if not transient_reply(exc):  # BUSY, LOADING, MASTERDOWN...: Redis is there and cannot serve yet
            raise
        print(
            f"desto-archiver {args.command}: Redis at {settings.redis_address()} cannot serve now: {exc}\n"
            f"  {unreachable_advice(exc, retried=False)}.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _warn_passwords_in_arguments(args: argparse.Namespace, settings: Settings) -> None:
    """Every user of the machine may read a process' arguments (ps, /proc/PID/cmdline): a password
    in a flag is said once, with the settings that keep it out of them."""
    from archiver.config import postgres_url_secrets, redis_url_secrets

    for name, (flag, env) in _URL_FLAGS.items():
        value = getattr(args, name, None)
        if not value:
            continue
        if name == "redis_url":  # with REDIS_PASSWORD set, a lone user part is an ACL user's name
            held = redis_url_secrets(value, settings.redis_password is not None)
        else:
            held = postgres_url_secrets(value)
        if held:
            log.warning(
                "settings.password_in_arguments",
                flag=flag,
                detail="other users of this machine can read a process' arguments (ps, /proc/PID/cmdline)",
                action=f"give the URL in {env}_FILE (a file only this user reads) or {env} instead",
            )
