"""The central PostgreSQL database: connecting, the central tables and their versions.

Every central table carries ``source_name`` (``ARCHIVER_SOURCE_NAME``) in its key, so archivers of
many hosts share one database. A file is known by ``file_id`` (kept in the file): the status history
and quarantine rows are numbered per file, and a host rebuilt with a new file adds to its history
instead of replacing it.

psycopg is imported inside the functions: the SQLite-only installation never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from archiver.config import Settings

if TYPE_CHECKING:
    import psycopg

PG_SCHEMA_VERSION = 3
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
        "position bigint, history_id bigint, host text, file text, shipped_at timestamptz NOT NULL DEFAULT now(), "
        "copied_at timestamptz)"
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


def _migrate_pg_to_2(cur: Any, schema: str) -> None:
    """Erasures: what each host erased (desto's History tab, forget, retention), so a central reader
    can tell an erased record from one never shipped; erasing a record finds its quarantined values
    by record as its status history already is."""
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.erased (source_name text NOT NULL, file_id text NOT NULL, "
        "kind text NOT NULL, record_id text NOT NULL, erased_at text, how text, "
        "PRIMARY KEY (source_name, kind, record_id))"
    )
    cur.execute(
        f"CREATE INDEX IF NOT EXISTS quarantine_record_idx ON {schema}.quarantine (source_name, kind, record_id)"
    )


def _migrate_pg_to_3(cur: Any, schema: str) -> None:
    """The mark of the change log each host shipped: the number and random token of the log's last
    entry as of the read its rows came from (``head``, ``head_token``). A file whose log has another
    entry of that number, or none, is not the one shipped (a restored backup, a copy) and is copied
    whole under a new file_id. ``ship_files`` keeps the mark of a host's earlier files, so a file
    shipped before that comes back is told from a copy of it."""
    cur.execute(f"ALTER TABLE {schema}.ship_positions ADD COLUMN IF NOT EXISTS head bigint")
    cur.execute(f"ALTER TABLE {schema}.ship_positions ADD COLUMN IF NOT EXISTS head_token bytea")
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.ship_files (source_name text NOT NULL, file_id text NOT NULL, "
        "head bigint, head_token bytea, left_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (source_name, file_id))"
    )


PG_MIGRATIONS: dict[int, Callable[[Any, str], None]] = {
    1: _migrate_pg_to_1,
    2: _migrate_pg_to_2,
    3: _migrate_pg_to_3,
}


class ShipError(Exception):
    """Shipping cannot go on until a person acts; the message says what to do."""


class NewerPostgresSchema(ShipError):
    pass


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
