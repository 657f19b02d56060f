"""Shipping the archive into PostgreSQL: one central database for many hosts' archivers.

The SQLite file stays the source of truth and the buffer. Changes are found in the file's change
log (archiver/changelog.py), their rows' current state is read from the file, and upserted into
PostgreSQL together with the shipper's position, in one PostgreSQL transaction per batch: a batch
lands whole or not at all, and a batch shipped twice changes nothing (at-least-once, idempotent).
Only then are the shipped entries trimmed from the file.

Every central table carries ``source_name`` (``ARCHIVER_SOURCE_NAME``) in its key, so archivers of
many hosts share one database. A file is known by ``file_id`` (kept in the file): the status history
and quarantine rows are numbered per file, and a host rebuilt with a new file adds to its history
instead of replacing it.

psycopg is imported here only: the SQLite-only installation never loads it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archiver import changelog
from archiver.config import Settings
from archiver.log import get_logger
from archiver.writer import select_in

if TYPE_CHECKING:
    import psycopg

log = get_logger("archiver.ship")

PG_SCHEMA_VERSION = 1
_COPY_FROM = 50  # rows from which a batch is copied into a temporary table rather than upserted row by row
STATE_FILE_ID = "ship_file_id"
RECORD_KEYS = {"sessions": "session_id", "jobs": "job_id", "favorites": "favorite_id", "at_jobs": "at_job_id"}
NUMBERED = ("status_history", "quarantine")  # rows numbered by the file: keyed by file_id too

# The central tables, version 1: the file's columns (schema 2) with SQLite's types mapped.
_TABLES_V1: dict[str, str] = {
    "sessions": "session_id text, session_name text, tmux_session_name text, status text, start_time text, "
    "end_time text, last_heartbeat text, job_ids text, tmux_active bigint, at_job_id text",
    "jobs": "job_id text, session_id text, command text, script_path text, status text, start_time text, "
    "end_time text, exit_code bigint, error_message text",
    "favorites": "favorite_id text, name text, command text, last_used_at text, use_count bigint, real_name text",
    "at_jobs": 'at_job_id text, job_id text, command text, request_time text, scheduled_time text, "user" text, '
    "status text, creation_time text, queue text, session_name text, script_path text, arguments text, "
    "error_message text, execution_result text",
    "status_history": "id bigint, kind text, record_id text, event text, status text, previous_status text, "
    "detail text, observed_at text, desto_timestamp text, source text",
    "quarantine": "id bigint, key bytea, key_text text, kind text, record_id text, redis_type text, payload bytea, "
    "payload_sha256 text, reason text, first_seen_at text, last_seen_at text, times_seen bigint, resolved_at text",
}
_TRACKING_V1 = (
    "created_at text, updated_at text, read_at_us bigint, first_seen_at text, last_seen_at text, expires_at text, "
    "gone_at text, gone_reason text, extra text"
)


def _migrate_pg_to_1(cur: Any, schema: str) -> None:
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.ship_positions (source_name text PRIMARY KEY, file_id text NOT NULL, "
        "position bigint, host text, file text, shipped_at timestamptz NOT NULL DEFAULT now(), copied_at timestamptz)"
    )
    for table, columns in _TABLES_V1.items():
        if table in RECORD_KEYS:
            cols = f"{columns}, {_TRACKING_V1}" + (", observed_status text" if table != "favorites" else "")
            key = f"source_name, {RECORD_KEYS[table]}"
        else:
            cols, key = columns, "source_name, file_id, id"
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.{table} (source_name text NOT NULL, file_id text NOT NULL, "
            f"{cols}, PRIMARY KEY ({key}))"
        )
    for table, column in (
        ("sessions", "start_time"),
        ("sessions", "status"),
        ("jobs", "session_id"),
        ("jobs", "status"),
        ("jobs", "start_time"),
        ("status_history", "observed_at"),
    ):
        cur.execute(f"CREATE INDEX IF NOT EXISTS {table}_{column}_idx ON {schema}.{table} ({column})")
    cur.execute(
        f"CREATE INDEX IF NOT EXISTS status_history_record_idx ON {schema}.status_history "
        "(source_name, kind, record_id)"
    )


PG_MIGRATIONS: dict[int, Callable[[Any, str], None]] = {1: _migrate_pg_to_1}


class ShipError(Exception):
    """Shipping cannot go on until a person acts; the message says what to do."""


class NewerPostgresSchema(ShipError):
    pass


class NeedsCopy(Exception):
    """The log alone cannot bring PostgreSQL up to date: the whole file must be copied first."""


def require_psycopg() -> None:
    """A clear error where the optional dependency is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ShipError(
            "ARCHIVER_POSTGRES_URL is set but psycopg is not installed: pip install 'desto-archiver[postgres]'"
        ) from None


def connect(settings: Settings) -> psycopg.Connection[Any]:
    import psycopg

    assert settings.postgres_url is not None
    return psycopg.connect(
        settings.postgres_url.get_secret_value(),
        autocommit=True,
        connect_timeout=10,
        application_name=f"desto-archiver {settings.source_name}"[:63],
        # a server gone silent (network lost) is noticed in about 30 s, not after the kernel's hours
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=30_000,
    )


def pg_schema_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The central schema's version (0: not created yet)."""
    found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.archiver_schema",)).fetchone()
    if found is None or found[0] is None:
        return 0
    row = conn.execute(f"SELECT max(version) FROM {schema}.archiver_schema").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate_pg(conn: psycopg.Connection[Any], schema: str) -> tuple[int, int]:
    """Bring the central schema to PG_SCHEMA_VERSION; returns (version found, version now).

    Nothing is created when the schema is current, so a role with only DML privileges works on a
    schema its owner created; raises ShipError when the schema is newer or cannot be created."""
    import psycopg

    found = pg_schema_version(conn, schema)
    if found > PG_SCHEMA_VERSION:
        raise NewerPostgresSchema(
            f"PostgreSQL schema {schema} has version {found}, newer than this desto-archiver's "
            f"{PG_SCHEMA_VERSION}: upgrade desto-archiver on this host"
        )
    if found == PG_SCHEMA_VERSION:
        return found, found
    try:
        with conn.transaction(), conn.cursor() as cur:
            # two archivers starting at once: one migrates, the other finds it done
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"desto-archiver:schema:{schema}",))
            exists = cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
            if not exists:
                cur.execute(f"CREATE SCHEMA {schema}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {schema}.archiver_schema (version integer NOT NULL, "
                "migrated_at timestamptz NOT NULL DEFAULT now())"
            )
            current = pg_schema_version(conn, schema)
            for version in sorted(v for v in PG_MIGRATIONS if current < v <= PG_SCHEMA_VERSION):
                PG_MIGRATIONS[version](cur, schema)
            if current < PG_SCHEMA_VERSION:
                cur.execute(f"INSERT INTO {schema}.archiver_schema (version) VALUES (%s)", (PG_SCHEMA_VERSION,))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ShipError(
            f"cannot create the schema {schema} in PostgreSQL ({exc.diag.message_primary}): grant the archiver's "
            f"role CREATE on the schema {schema} (or on the database), or create it once with "
            "`desto-archiver ship --postgres-url <owner's URL>` (docs/postgresql.md, 'The role')"
        ) from None
    return found, PG_SCHEMA_VERSION


@dataclass
class _Table:
    """How one table is copied: the columns both sides have, and the central statements."""

    name: str
    key: str
    columns: list[str]
    kinds: list[str]  # the central type of each column: bigint, text, bytea
    upsert: str
    delete: str
    numbered: bool
    stage: str  # the connection's temporary table a big batch is copied into
    copy: str
    upsert_staged: str


def _coerce(kind: str, value: Any) -> Any:
    """SQLite stores any value in any column; the central column has one type. A value that does
    not fit becomes NULL rather than stopping the shipping of every row after it."""
    if value is None:
        return None
    if kind == "bigint":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            return None
    if kind == "bytea":
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = str(value)
    return text.replace("\x00", "\ufffd") if "\x00" in text else text  # PostgreSQL's text holds no NUL


@dataclass
class CopyReport:
    source: str
    file_id: str
    copied: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    position: int | None = None
    elapsed_s: float = 0.0
    shipped_after_copy: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_id": self.file_id,
            "copied": self.copied,
            "deleted": self.deleted,
            "rows": sum(self.copied.values()),
            "position": self.position,
            "shipped_after_copy": self.shipped_after_copy,
            "elapsed_s": round(self.elapsed_s, 3),
        }


Progress = Callable[[str, int, int], None]  # table, rows copied so far, rows in the file


class Shipper:
    """One file shipped to one central database, from connections of its own (never the daemon's
    writer connection): ``ship_batch`` follows the change log, ``copy_all`` copies everything."""

    def __init__(self, settings: Settings, db_path: Path | None = None) -> None:
        self.settings = settings
        self.source = settings.source_name
        self.schema = settings.postgres_schema
        self.db_path = db_path or settings.db_path
        self.batch_size = settings.ship_batch_size
        self.sqlite: sqlite3.Connection | None = None
        self.pg: psycopg.Connection[Any] | None = None
        self.tables: dict[str, _Table] = {}
        self.file_id = ""
        self.position: int | None = None  # the last seq PostgreSQL confirmed
        self.use_copy = False

    # ─── connections ───────────────────────────────────────────────────────────────────────

    def open_file(self) -> None:
        if self.sqlite is None:
            timeout = self.settings.sqlite_busy_timeout
            self.sqlite = sqlite3.connect(self.db_path, timeout=timeout, isolation_level=None, check_same_thread=False)
            # text SQLite holds that is not UTF-8 (another writer's) is shipped readable, not refused forever
            self.sqlite.text_factory = lambda raw: raw.decode("utf-8", "replace")

    def open(self) -> None:
        self.open_file()
        if self.pg is None:
            self.pg = connect(self.settings)
            migrate_pg(self.pg, self.schema)
            self.tables = self._tables()
            self._stage()
        self.file_id = self._file_id()

    def close_pg(self) -> None:
        if self.pg is not None:
            try:
                self.pg.close()
            except Exception as exc:  # a dead connection: nothing left to close
                log.debug("ship.close_failed", error=str(exc))
            self.pg = None

    def close(self) -> None:
        self.close_pg()
        if self.sqlite is not None:
            self.sqlite.close()
            self.sqlite = None

    def _tables(self) -> dict[str, _Table]:
        assert self.pg is not None and self.sqlite is not None
        central: dict[str, list[tuple[str, str]]] = {}
        for table, column, kind in self.pg.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "ORDER BY table_name, ordinal_position",
            (self.schema,),
        ):
            central.setdefault(table, []).append((column, kind))
        found: dict[str, _Table] = {}
        for table, key in changelog.SHIPPED.items():
            mine = {row[1] for row in self.sqlite.execute(f"PRAGMA table_info({table})")}
            both = [(c, k) for c, k in central.get(table, []) if c in mine]
            columns, kinds = [c for c, _ in both], [k for _, k in both]
            quoted = [f'"{c}"' for c in columns]
            numbered = table in NUMBERED
            conflict = f"source_name, file_id, {key}" if numbered else f"source_name, {key}"
            sets = ", ".join(f"{q} = EXCLUDED.{q}" for q in ["file_id", *quoted] if q != f'"{key}"')
            guard = (
                ""
                if numbered
                else (
                    f" WHERE {table}.read_at_us IS NULL OR EXCLUDED.read_at_us IS NULL "
                    f"OR EXCLUDED.read_at_us >= {table}.read_at_us"
                )
            )
            upsert = (
                f"INSERT INTO {self.schema}.{table} (source_name, file_id, {', '.join(quoted)}) "
                f"VALUES (%s, %s, {', '.join(['%s'] * len(quoted))}) "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {sets}{guard}"
            )
            delete = f"DELETE FROM {self.schema}.{table} WHERE source_name = %s AND {key} = ANY(%s)" + (
                " AND file_id = %s" if numbered else ""
            )
            stage = f"archiver_stage_{table}"
            names = f"source_name, file_id, {', '.join(quoted)}"
            upsert_staged = (
                f"INSERT INTO {self.schema}.{table} ({names}) SELECT {names} FROM {stage} "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {sets}{guard}"
            )
            copy = f"COPY {stage} ({names}) FROM STDIN"
            found[table] = _Table(table, key, columns, kinds, upsert, delete, numbered, stage, copy, upsert_staged)
        return found

    def _stage(self) -> None:
        """Temporary tables that big batches are copied into (COPY, then one upsert: several times
        faster than a row at a time), where the role may create them (TEMP, granted by default)."""
        assert self.pg is not None
        row = self.pg.execute("SELECT has_database_privilege(current_database(), 'TEMP')").fetchone()
        self.use_copy = bool(row and row[0])
        if self.use_copy:
            for table in self.tables.values():
                self.pg.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {table.stage} (LIKE {self.schema}.{table.name}) "
                    "ON COMMIT DELETE ROWS"
                )

    def _file_id(self) -> str:
        """This file's identity in the central database, made on first use."""
        assert self.sqlite is not None
        row = self.sqlite.execute("SELECT value FROM archiver_state WHERE name = ?", (STATE_FILE_ID,)).fetchone()
        if row is not None:
            return str(row[0])
        return self._new_file_id()

    def _new_file_id(self) -> str:
        assert self.sqlite is not None
        file_id = uuid.uuid4().hex
        changelog._write(self.sqlite, self.settings.sqlite_busy_timeout)
        try:
            self.sqlite.execute(
                "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ')) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (STATE_FILE_ID, file_id),
            )
            self.sqlite.execute("COMMIT")
        except BaseException:
            self.sqlite.execute("ROLLBACK")
            raise
        return file_id

    # ─── moving rows ───────────────────────────────────────────────────────────────────────

    def _rows(self, table: _Table, keys: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self.sqlite is not None
        quoted = ", ".join(f'"{c}"' for c in table.columns)
        return list(select_in(self.sqlite, f"SELECT {quoted} FROM {table.name} WHERE {table.key} IN", keys))

    def _params(self, table: _Table, rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
        kinds = table.kinds
        return [(self.source, self.file_id, *(_coerce(k, v) for k, v in zip(kinds, r, strict=True))) for r in rows]

    def _put(self, cur: psycopg.Cursor[Any], table: _Table, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        params = self._params(table, rows)
        if not self.use_copy or len(params) < _COPY_FROM:
            cur.executemany(table.upsert, params)
            return
        with cur.copy(table.copy) as copy:
            for p in params:
                copy.write_row(p)
        cur.execute(table.upsert_staged)
        cur.execute(f"TRUNCATE {table.stage}")  # a second batch in the same transaction starts empty

    def _remove(self, cur: psycopg.Cursor[Any], table: _Table, keys: list[Any]) -> int:
        if not keys:
            return 0
        central = [_coerce(table.kinds[table.columns.index(table.key)], k) for k in keys]
        params: tuple[Any, ...] = (self.source, central, self.file_id) if table.numbered else (self.source, central)
        cur.execute(table.delete, params)
        return cur.rowcount

    def _lock_key(self) -> str:
        return f"desto-archiver:ship:{self.schema}:{self.source}"

    def _position_row(self, cur: psycopg.Cursor[Any]) -> tuple[str, int | None] | None:
        row = cur.execute(
            f"SELECT file_id, position FROM {self.schema}.ship_positions WHERE source_name = %s", (self.source,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def ship_batch(self) -> int:
        """Ship the next batch of the change log; returns how many log entries it covered (0: none
        waiting). Raises NeedsCopy when the log cannot bring PostgreSQL up to date."""
        assert self.pg is not None and self.sqlite is not None
        with self.pg.transaction(), self.pg.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (self._lock_key(),))
            known = self._position_row(cur)
            self.sqlite.execute("BEGIN")
            try:
                start = changelog.complete_from(self.sqlite)
                last = changelog.last_seq(self.sqlite)
                if known is None or known[1] is None or known[0] != self.file_id or start is None:
                    raise NeedsCopy("no position for this file")
                position = known[1]
                if position > last:
                    raise NeedsCopy("the file is older than what was shipped (a restored copy)")
                if position + 1 < start:
                    raise NeedsCopy("the change log was cut short")
                entries = changelog.read(self.sqlite, position, self.batch_size)
                if not entries:
                    self.sqlite.execute("COMMIT")
                    self.position = position
                    return 0
                found = {}
                for name, keys in changelog.kinds(entries).items():
                    table = self.tables[name]
                    rows = self._rows(table, keys)
                    found[name] = (table, keys, rows)
            finally:
                if self.sqlite.in_transaction:
                    self.sqlite.execute("COMMIT")
            for table, keys, rows in found.values():
                self._put(cur, table, rows)
                present = {r[0] for r in rows} if table.columns[0] == table.key else set()
                gone = [k for k in keys if k not in present]
                self._remove(cur, table, gone)
            new_position = entries[-1][0]
            cur.execute(
                f"UPDATE {self.schema}.ship_positions SET position = %s, shipped_at = now() WHERE source_name = %s",
                (new_position, self.source),
            )
        self.position = new_position
        return len(entries)

    def trim(self) -> int:
        """Delete the entries PostgreSQL holds from the file's log."""
        if self.position is None or self.sqlite is None:
            return 0
        return changelog.trim(self.sqlite, self.position, self.settings.sqlite_busy_timeout)

    def backlog(self) -> int | None:
        """Changes in the file not yet confirmed by PostgreSQL (None: not known before a first
        batch). Counted by number, not by row: cheap however long the log."""
        if self.sqlite is None or self.position is None:
            return None
        return max(0, changelog.last_seq(self.sqlite) - self.position)

    def copy_all(self, progress: Progress | None = None) -> CopyReport:
        """Copy every row of the file, then delete central rows of this file that the file no longer
        holds, and record the position the log goes on from. Holds the source's lock throughout,
        so a daemon shipping the same source waits rather than interleaving."""
        assert self.pg is not None and self.sqlite is not None
        started = time.monotonic()
        report = CopyReport(self.source, self.file_id)
        lock = self._lock_key()
        self.pg.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock,))
        try:
            with self.pg.cursor() as cur:
                known = self._position_row(cur)
            self.sqlite.execute("BEGIN")
            try:
                snapshot = changelog.last_seq(self.sqlite)
                logging = changelog.complete_from(self.sqlite) is not None
            finally:
                self.sqlite.execute("COMMIT")
            if known is not None and known[0] == self.file_id and known[1] is not None and known[1] > snapshot:
                # a copy restored over the file: its numbers would be taken for ones already shipped
                self.file_id = report.file_id = self._new_file_id()
                self.tables = self._tables()
            for table in self.tables.values():
                report.copied[table.name] = self._copy_table(table, progress)
            for table in self.tables.values():
                report.deleted[table.name] = self._sweep(table)
            report.position = snapshot if logging else None
            with self.pg.transaction(), self.pg.cursor() as cur:
                cur.execute(
                    f"INSERT INTO {self.schema}.ship_positions (source_name, file_id, position, host, file, copied_at) "
                    "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (source_name) DO UPDATE SET "
                    "file_id = EXCLUDED.file_id, host = EXCLUDED.host, file = EXCLUDED.file, "
                    "copied_at = EXCLUDED.copied_at, shipped_at = now(), position = CASE "
                    f"WHEN {self.schema}.ship_positions.file_id = EXCLUDED.file_id AND EXCLUDED.position IS NOT NULL "
                    f"THEN GREATEST({self.schema}.ship_positions.position, EXCLUDED.position) "
                    "ELSE EXCLUDED.position END",
                    (self.source, self.file_id, report.position, _hostname(), str(self.db_path)),
                )
                self.position = report.position
        finally:
            import psycopg

            with contextlib.suppress(psycopg.Error):  # a lost connection released it already
                self.pg.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock,))
        report.elapsed_s = time.monotonic() - started
        return report

    def _copy_table(self, table: _Table, progress: Progress | None) -> int:
        assert self.pg is not None and self.sqlite is not None
        total = self.sqlite.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
        quoted = ", ".join(f'"{c}"' for c in table.columns)
        key_at = table.columns.index(table.key)
        copied, after = 0, None
        while True:
            if after is None:
                rows = self.sqlite.execute(
                    f"SELECT {quoted} FROM {table.name} ORDER BY {table.key} LIMIT ?", (self.batch_size,)
                ).fetchall()
            else:
                rows = self.sqlite.execute(
                    f"SELECT {quoted} FROM {table.name} WHERE {table.key} > ? ORDER BY {table.key} LIMIT ?",
                    (after, self.batch_size),
                ).fetchall()
            if not rows:
                break
            with self.pg.transaction(), self.pg.cursor() as cur:
                self._put(cur, table, rows)
            copied += len(rows)
            after = rows[-1][key_at]
            if progress is not None:
                progress(table.name, copied, total)
        return copied

    def _sweep(self, table: _Table) -> int:
        """Delete this file's central rows whose row the file no longer holds (deleted while no
        change log was kept)."""
        assert self.pg is not None and self.sqlite is not None
        deleted, after = 0, None
        query = f"SELECT {table.key} FROM {self.schema}.{table.name} WHERE source_name = %s AND file_id = %s"
        while True:
            if after is None:
                found = self.pg.execute(
                    f"{query} ORDER BY {table.key} LIMIT %s", (self.source, self.file_id, self.batch_size)
                )
            else:
                found = self.pg.execute(
                    f"{query} AND {table.key} > %s ORDER BY {table.key} LIMIT %s",
                    (self.source, self.file_id, after, self.batch_size),
                )
            keys = [r[0] for r in found]
            if not keys:
                return deleted
            present = {
                r[0] for r in select_in(self.sqlite, f"SELECT {table.key} FROM {table.name} WHERE {table.key} IN", keys)
            }
            gone = [k for k in keys if k not in present]
            if gone:
                with self.pg.transaction(), self.pg.cursor() as cur:
                    deleted += self._remove(cur, table, gone)
            after = keys[-1]


def _hostname() -> str:
    import socket

    return socket.gethostname()


class _Stopping(Exception):
    pass


# Entries shipped between trims of the log while catching up: each trim takes the file's write lock.
_TRIM_EVERY = 20_000


class ShipperThread(threading.Thread):
    """The daemon's shipper: follows the file's change log into PostgreSQL from connections of its
    own. PostgreSQL down, slow or refusing only delays it (it retries with a growing pause); the
    daemon's writer never waits for it, and it holds no more than one batch in memory."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="archiver-shipper", daemon=True)
        self.settings = settings
        self.shipper = Shipper(settings)
        self._stop_event = threading.Event()
        self.wake = threading.Event()
        self.shipped = 0  # log entries shipped since start
        self.copies = 0
        self.failures = 0
        self.failing: str | None = None  # the last error while shipping fails
        self.refused: str | None = None  # shipping stopped until a person acts
        self.connected = False
        self.last_shipped_at: float | None = None  # monotonic
        self.backlog: int | None = None  # changes waiting in the file, as of the last look

    def _copy_progress(self, table: str, copied: int, total: int) -> None:
        if self.stopping:  # a whole copy is long: a stop request ends it between pages
            raise _Stopping

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.wake.set()
        self.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "position": self.shipper.position,
            "shipped": self.shipped,
            "copies": self.copies,
            "failing": self.failing,
            "refused": self.refused,
            "backlog": self.backlog,
        }

    def run(self) -> None:
        import psycopg

        backoff = 0.0
        while not self.stopping:
            try:
                self._round()
                backoff = 0.0
                if self.failing is not None:
                    log.info("ship.recovered", after=self.failing, failures=self.failures)
                    self.failing, self.failures = None, 0
            except ShipError as exc:
                self.refused = str(exc)
                self.connected = False
                log.error("ship.refused", error=str(exc), detail="shipping stopped; the archive goes on")
                self.shipper.close_pg()
                return
            except _Stopping:
                break
            except Exception as exc:  # whatever fails, the archive goes on and shipping retries
                expected = isinstance(exc, psycopg.Error | OSError | sqlite3.Error)
                if not expected:
                    log.exception("ship.error", error=repr(exc))
                self.failures += 1
                self.failing = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if isinstance(exc, psycopg.errors.QueryCanceled) and self.shipper.batch_size > 1:
                    # a statement timeout: smaller batches fit in it
                    self.shipper.batch_size = max(1, self.shipper.batch_size // 2)
                backoff = min(self.settings.reconnect_max_backoff, max(0.5, backoff * 2))
                log.warning(
                    "ship.failed",
                    error=self.failing,
                    failures=self.failures,
                    retry_in_s=backoff,
                    postgres=self.settings.postgres_address(),
                    batch_size=self.shipper.batch_size,
                )
                if not isinstance(exc, OSError | sqlite3.Error):
                    self.connected = False
                    self.shipper.close_pg()
                with contextlib.suppress(sqlite3.Error):
                    self.backlog = self.shipper.backlog()
                self._stop_event.wait(backoff)
        self.shipper.close()

    def _round(self) -> None:
        shipper = self.shipper
        if shipper.pg is None:
            shipper.open()
            self.connected = True
            log.info("ship.connected", postgres=self.settings.postgres_address(), source=shipper.source)
        shipped, copied, trimmed_at = 0, False, 0
        while not self.stopping:
            try:
                n = shipper.ship_batch()
            except NeedsCopy as why:
                if copied:  # the log is still not usable right after a copy: try again later, not at once
                    log.warning("ship.copy_again", reason=str(why), source=shipper.source)
                    break
                copied = True
                log.info("ship.copying", reason=str(why), source=shipper.source)
                report = shipper.copy_all(self._copy_progress)
                self.copies += 1
                log.info("ship.copied", **report.as_dict())
                continue
            if n == 0:
                break
            shipped += n
            self.shipped += n
            self.last_shipped_at = time.monotonic()
            if shipped - trimmed_at >= _TRIM_EVERY:  # far behind: trim on the way, not only at the end
                shipper.trim()
                trimmed_at = shipped
            if shipper.batch_size < self.settings.ship_batch_size:
                shipper.batch_size = min(self.settings.ship_batch_size, shipper.batch_size * 2)
        if shipped > trimmed_at:
            shipper.trim()
        self.backlog = shipper.backlog()
        if shipped:
            log.debug("ship.shipped", entries=shipped, position=shipper.position)
        self.wake.wait(self.settings.ship_interval)
        self.wake.clear()
