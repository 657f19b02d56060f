"""The command line: argument handling and output only; the work lives in the stage modules.

Exit codes: 0 success, 1 runtime failure (or, for check and health, a problem found), 2 usage or
configuration error. Every command honours the same configuration as ``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import io
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from archiver import __version__
from archiver.archive.reader import EXPORTS
from archiver.archive.store import StoreError, UnsupportedSQLite
from archiver.commands import render
from archiver.config import ConfigError, Settings, load_settings
from archiver.log import configure, get_logger
from archiver.output import to_json, visible, write_csv, write_json_array, write_jsonl, write_table
from archiver.redis_side.redis_client import CONNECTION_ERRORS, unreachable_advice

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

log = get_logger("archiver.commands.cli")


class UsageError(Exception):
    """A command-line value the command cannot use (exit 2)."""


class OutputClosed(Exception):
    """The program reading the output stopped reading (``| head``): not a failure."""


class _Stdout:
    """``sys.stdout`` for the length of a command. A closed pipe and a broken Redis connection
    both raise BrokenPipeError; this tells the first apart, so it is not reported as the second."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise OutputClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ForPeople:
    """``sys.stdout`` or ``sys.stderr`` for the length of a command: what is written there is for
    people, so each control character in it is shown as its escape (:func:`visible`) whatever text
    Redis held, and whatever command prints it. Line breaks stay: values within a line were made
    visible by the tables and summaries already. ``raw`` is the stream itself, for the output of
    machines (:func:`_data`) and the deliberate escapes of a progress line."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(visible(text, keep_newlines=True))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _raw(stream: Any) -> Any:
    """The stream under :class:`_ForPeople`: text written there as it is."""
    return getattr(stream, "raw", stream)


def _data() -> Any:
    """Where machine output goes (JSON, JSON Lines, CSV): stdout, the text as it is. JSON writes
    its own escapes for control characters below 0x20; the rest is the data, kept exactly."""
    return _raw(sys.stdout)


def _print_json(data: Any) -> None:
    print(to_json(data), file=_data())


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


def _postgres_options(reading: bool) -> argparse.ArgumentParser:
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


def _json_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="machine output (JSON) instead of a table")
    return parent


def _filter_options(statuses: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("filters")
    group.add_argument("--status", metavar="S", help=statuses)
    group.add_argument("--name", metavar="TEXT", help="name contains TEXT (case-insensitive)")
    group.add_argument("--since", metavar="WHEN", help="from WHEN: 2026-11-01, 2026-11-01T10:00, or 7d, 24h, 30m ago")
    group.add_argument("--until", metavar="WHEN", help="before WHEN (same forms as --since)")
    group.add_argument("--limit", metavar="N", type=int, help="at most N rows")
    return parent


def _command(
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


def build_parser() -> argparse.ArgumentParser:
    common, as_json = _config_options(), _json_option()
    shipping, central = _postgres_options(reading=False), _postgres_options(reading=True)
    parser = argparse.ArgumentParser(
        prog="desto-archiver",
        description="Keep desto's Redis history forever in a SQLite file desto's History tab can read.",
        epilog="Example: desto-archiver run   (desto's Redis on localhost:6379, writing desto_data/desto.db)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = _command(
        sub,
        "run",
        [common, shipping],
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

    backfill = _command(
        sub,
        "backfill",
        [common, as_json],
        "one full pass over Redis into the file, then exit",
        "Scan every desto key in Redis once, archive it, tombstone archived records whose keys are gone, print a "
        "summary and exit. Safe while 'run' is active on the same file; needs no keyspace notifications.",
        "desto-archiver backfill --db /srv/desto/desto_data/desto.db",
        cmd_backfill,
    )
    backfill.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")

    _command(
        sub,
        "ship",
        [common, shipping, as_json],
        "copy the whole archive into PostgreSQL, then exit",
        "Copy every record, status change and quarantined value of the file into the central PostgreSQL "
        "database (creating its schema), delete central rows this file no longer holds, and exit. Safe to run "
        "again and beside 'run' on the same file; the daemon ships continuously when ARCHIVER_POSTGRES_URL is set.",
        "desto-archiver ship --postgres-url postgresql://archiver@db.example/desto --source gpu1",
        cmd_ship,
    )

    grant = _command(
        sub,
        "grant",
        [common, shipping, as_json],
        "let a host's PostgreSQL role write its source (run by the database's owner)",
        "As the owner of the central schema (its URL in --postgres-url): create or upgrade the schema, give ROLE "
        "what a host's archiver needs (connect, read every host's rows, write its own) and let it write the rows "
        "of the source --source NAME, and no other's. Run once per host, with a role per host; the role must "
        "exist (CREATE ROLE). Running it again moves the source to another role.",
        "desto-archiver grant --postgres-url postgresql://owner@db.example/desto --source gpu1 --role desto_gpu1",
        cmd_grant,
    )
    grant.add_argument("--role", required=True, metavar="ROLE", help="the host's PostgreSQL role")

    check = _command(
        sub,
        "check",
        [common, shipping, as_json],
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

    _command(
        sub,
        "stats",
        [common, central, as_json],
        "counts, ages and sizes of the archive",
        "Records by kind and status, oldest and newest, tombstones, quarantine, file size, last event and last "
        "reconcile.",
        "desto-archiver stats --json",
        cmd_stats,
    )

    _command(
        sub,
        "history",
        [common, central, as_json, _filter_options("session status: starting, running, finished, failed, scheduled")],
        "list archived sessions, newest first",
        "The sessions in the archive, kept after Redis forgot them, with their status, times, jobs and whether "
        "their key is gone from Redis.",
        "desto-archiver history --status failed --since 7d",
        cmd_history,
    )

    show = _command(
        sub,
        "show",
        [common, as_json],
        "one session: its jobs and full status history",
        "A session (by id, unique id prefix, or name: the most recent with that name), its jobs, and every "
        "status change the archiver observed, with durations and desto's own timestamps.",
        "desto-archiver show nightly-backup",
        cmd_show,
    )
    show.add_argument("session", help="session id, id prefix (6+ characters) or name")

    export = _command(
        sub,
        "export",
        [common, central, _filter_options("status (for quarantine: the record kind)")],
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

    backup = _command(
        sub,
        "backup",
        [common, as_json],
        "a consistent, verified copy of the live file",
        "Copy the archive with SQLite's online backup API (safe while the daemon writes), check the copy with "
        "PRAGMA integrity_check, and write it as one self-contained file. Refuses to overwrite without --force.",
        "desto-archiver backup /backups/desto-$(date +%F).db",
        cmd_backup,
    )
    backup.add_argument("destination", help="file (or existing folder) to write the copy to")
    backup.add_argument("--force", action="store_true", help="replace the destination if it exists")

    _command(
        sub,
        "health",
        [common, as_json],
        "exit 0 when the daemon on this file is alive and Redis answers",
        "For Docker's HEALTHCHECK and monitors: healthy when the daemon writing the file has a recent heartbeat, "
        "is connected to Redis and not failing, and Redis answers this process too. Prints one line.",
        "desto-archiver health || echo unhealthy",
        cmd_health,
    )

    forget = _command(
        sub,
        "forget",
        [common, as_json],
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

    restore = _command(
        sub,
        "restore",
        [common, as_json],
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

    prune = _command(
        sub,
        "prune",
        [common, as_json],
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

    unit = _command(
        sub,
        "systemd-unit",
        [common],
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

# The flags that may carry a password, and the settings that keep it out of the process list.
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
    stdout, sys.stdout = sys.stdout, _ForPeople(_Stdout(sys.stdout))
    stderr, sys.stderr = sys.stderr, _ForPeople(sys.stderr)
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
            f"desto-archiver: cannot reach Redis at {settings.redis_address()}: {exc}\n  {unreachable_advice(exc)}.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except OSError as exc:  # a file or folder of the user's: not Redis, and not worth a traceback
        print(f"desto-archiver {args.command}: {exc}", file=sys.stderr)
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


# ─── run, backfill ───────────────────────────────────────────────────────────────────────────────


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
            _raw(sys.stderr).write(
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
        _raw(sys.stderr).write("\r\033[K")
    if not existed and not args.dry_run:
        log_created(settings.db_path)
    if args.json:
        _print_json(report.as_dict())
        return EXIT_OK
    print(render.backfill(report))
    return EXIT_OK


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
            _raw(sys.stderr).write(f"\r\033[K{table}: {copied:,} of {total:,} rows copied ")
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
        _raw(sys.stderr).write("\r\033[K")
    if args.json:
        _print_json(report.as_dict())
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
        _print_json(report)
        return EXIT_OK
    print(
        f"role {report['role']!r} may write the rows of source {report['source']!r} in {where} "
        f"(schema {settings.postgres_schema}, version {PG_SCHEMA_VERSION})"
        + (f"; it writes {', '.join(report['role_sources'])}" if len(report["role_sources"]) > 1 else "")
    )
    if report["not_granted"]:
        print(f"sources no role may write yet (their hosts cannot ship): {', '.join(report['not_granted'])}")
    return EXIT_OK


# ─── check, health ───────────────────────────────────────────────────────────────────────────────


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
        _print_json(
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
        _print_json({"healthy": healthy, "reason": reason})
    else:
        print(("healthy: " if healthy else "unhealthy: ") + reason)
    return EXIT_OK if healthy else EXIT_FAILURE


def cmd_systemd_unit(settings: Settings, args: argparse.Namespace) -> int:
    from archiver.daemon.systemd import render_unit

    executable = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "desto-archiver" else None
    try:
        unit = render_unit(settings, executable=executable, user=args.user, env_file=args.env_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(unit, end="")
    return EXIT_OK


# ─── reading the archive ─────────────────────────────────────────────────────────────────────────


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
        _print_json(data)
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
        _print_json(data)
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
            write_json_array(sessions, _data())
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
                else _data()
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
        _print_json(report.__dict__)
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


# ─── erasing ─────────────────────────────────────────────────────────────────────────────────────


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
        _print_json(
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
        _print_json(data)
    else:
        print(render.prune(data))
    return EXIT_OK
