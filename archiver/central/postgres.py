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

PG_SCHEMA_VERSION = 6
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


# The tables each host writes its own rows of (keyed by source_name), and those only the owner does.
HOSTS_WRITE = (*RECORD_KEYS, *NUMBERED, "erased", "ship_positions", "ship_files")
OWNER_WRITES = ("archiver_schema", "sources")


def _writable(schema: str) -> str:
    """The sources the current role may write: those ``sources`` maps to a role it has the
    privileges of. Uncorrelated, so PostgreSQL computes it once per statement, not once per row."""
    return (
        f"ARRAY(SELECT m.source_name FROM {schema}.sources m JOIN pg_catalog.pg_roles r ON r.rolname = m.role_name "
        "WHERE pg_catalog.pg_has_role(r.oid, 'USAGE'))"
    )


def _migrate_pg_to_4(cur: Any, schema: str) -> None:
    """Row-level security: each host's role may write only the rows of the sources ``sources``
    gives it (the owner's ``desto-archiver grant``), and read every host's; only the owner (who
    bypasses the policies) writes ``sources`` and ``archiver_schema``, whatever DML was granted.
    A later migration that adds a table hosts write gives it the same policies, and grants it to
    the roles ``sources`` names (as ``grant_source`` does)."""
    cur.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.sources (source_name text PRIMARY KEY, role_name text NOT NULL, "
        "granted_at timestamptz NOT NULL DEFAULT now())"
    )
    own = f"source_name = ANY ({_writable(schema)})"
    for table in (*HOSTS_WRITE, *OWNER_WRITES):
        cur.execute(f"ALTER TABLE {schema}.{table} ENABLE ROW LEVEL SECURITY")
        cur.execute(f"DROP POLICY IF EXISTS read_all ON {schema}.{table}")
        cur.execute(f"CREATE POLICY read_all ON {schema}.{table} FOR SELECT USING (true)")
    for table in HOSTS_WRITE:
        cur.execute(f"DROP POLICY IF EXISTS write_own_source ON {schema}.{table}")
        cur.execute(f"CREATE POLICY write_own_source ON {schema}.{table} FOR ALL USING ({own}) WITH CHECK ({own})")


def _migrate_pg_to_5(cur: Any, schema: str) -> None:
    """The quarantine's bounds (the file's schema 7): a value above the per-record cap is kept as its
    first bytes, with the whole value's length beside its digest; and each row, one per Redis key,
    counts the changes it has seen."""
    for column in ("payload_length", "truncated", "changes_seen"):
        cur.execute(f"ALTER TABLE {schema}.quarantine ADD COLUMN IF NOT EXISTS {column} bigint")


def _migrate_pg_to_6(cur: Any, schema: str) -> None:
    """A quarantined job's session (the file's ``quarantine.session_id``, shipped from now on): an
    erasure of a session that takes its jobs finds those only quarantine names, whichever file of
    the host quarantined them. The rows shipped before get it from their payload, where the
    session's id is in the bytes kept."""
    from archiver.models import decode_resp, job_session

    cur.execute(f"ALTER TABLE {schema}.quarantine ADD COLUMN IF NOT EXISTS session_id text")
    cur.execute(
        f"CREATE INDEX IF NOT EXISTS quarantine_session_idx ON {schema}.quarantine (source_name, session_id) "
        "WHERE session_id IS NOT NULL"
    )
    cur.execute(
        f"SELECT source_name, file_id, id, payload FROM {schema}.quarantine "
        "WHERE kind = 'job' AND redis_type = 'hash' AND session_id IS NULL"
    )
    found = []
    for source, file_id, row_id, payload in cur.fetchall():
        try:
            session_id = job_session(decode_resp(bytes(payload)))
        except ValueError:  # cut short, or not a hash desto wrote: no session to name
            continue
        if session_id is not None:
            found.append((session_id, source, file_id, row_id))
    if found:
        cur.executemany(
            f"UPDATE {schema}.quarantine SET session_id = %s WHERE source_name = %s AND file_id = %s AND id = %s", found
        )


PG_MIGRATIONS: dict[int, Callable[[Any, str], None]] = {
    1: _migrate_pg_to_1,
    2: _migrate_pg_to_2,
    3: _migrate_pg_to_3,
    4: _migrate_pg_to_4,
    5: _migrate_pg_to_5,
    6: _migrate_pg_to_6,
}


class ShipError(Exception):
    """Shipping cannot go on until a person acts; the message says what to do."""


class NewerPostgresSchema(ShipError):
    pass


class NotAllowed(ShipError):
    """This host's role may not write its source's rows, or upgrade the schema: the database's
    owner must act. Not for good: the daemon tries again, and ships once the owner has run ``grant``."""


def require_psycopg() -> None:
    """A clear error where the optional dependency is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ShipError(
            "a central database is given (--postgres-url or ARCHIVER_POSTGRES_URL) but psycopg is not "
            "installed: install the archiver with its postgres extra (pip install -e '.[postgres]' in the "
            "clone) or pip install 'psycopg[binary]>=3.1'"
        ) from None


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """A connection to the central database. The one place libpq is given the URL: what it says
    about a URL it cannot use (it quotes a token it cannot decode, a password included) comes back
    with every password hidden, and without the original error chained to it, so no output, log
    line or heartbeat of any command shows one."""
    import psycopg

    assert settings.postgres_url is not None
    try:
        return _connect(settings)
    except psycopg.Error as exc:
        error = _redacted(exc, settings)
    raise error  # outside the handler: the original error is not the new one's context


def _redacted(exc: Exception, settings: Settings) -> Exception:
    import psycopg

    text = settings.redact(str(exc))
    try:
        return type(exc)(text)
    except TypeError:  # a class that wants more than a message
        return psycopg.OperationalError(text)


def _connect(settings: Settings) -> psycopg.Connection[Any]:
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
        if found:  # the owner's run upgrades it: the daemon tries again meanwhile
            raise NotAllowed(
                f"cannot upgrade the schema {schema} in PostgreSQL from version {found} to {PG_SCHEMA_VERSION} "
                f"({exc.diag.message_primary}): its owner upgrades it once, with `desto-archiver grant "
                "--postgres-url <owner's URL> --source NAME --role ROLE` (docs/postgresql.md, 'Upgrading')"
            ) from None
        raise ShipError(
            f"cannot create the schema {schema} in PostgreSQL ({exc.diag.message_primary}): grant the archiver's "
            f"role CREATE on the schema {schema} (or on the database), or create it once with "
            "`desto-archiver ship --postgres-url <owner's URL>` (docs/postgresql.md, 'The role')"
        ) from None
    return found, PG_SCHEMA_VERSION


def shipped_sources(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """The sources that have shipped to this database, by name: what a reader given a source with
    nothing shipped should point to (the daemon's ARCHIVER_SOURCE_NAME may differ from the name a
    command run elsewhere defaults to, the host name)."""
    return [str(r[0]) for r in conn.execute(f"SELECT source_name FROM {schema}.ship_positions ORDER BY 1")]


def sources_hint(sources: list[str]) -> str:
    """How to read what is there, for a source that has nothing shipped."""
    if not sources:
        return "no host has shipped here yet"
    shown = ", ".join(repr(s) for s in sources[:10]) + (f" and {len(sources) - 10} more" if len(sources) > 10 else "")
    return f"sources shipped here: {shown} (give one with --source, or set ARCHIVER_SOURCE_NAME as the daemon has it)"


def may_write(conn: psycopg.Connection[Any], schema: str, source: str) -> tuple[bool, str]:
    """(whether the connection's role may write ``source``'s rows, the role's name). The owner of
    the tables (and a role with its privileges), a superuser and a role with BYPASSRLS may write
    every source; so does every role where the schema predates row-level security."""
    policies = conn.execute("SELECT to_regclass(%s) IS NOT NULL, current_user", (f"{schema}.sources",)).fetchone()
    assert policies is not None
    if not policies[0]:
        return True, str(policies[1])
    row = conn.execute(
        f"SELECT %s = ANY ({_writable(schema)}) "
        "OR pg_catalog.pg_has_role((SELECT relowner FROM pg_catalog.pg_class WHERE oid = to_regclass(%s)), 'USAGE') "
        "OR (SELECT rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user), current_user",
        (source, f"{schema}.ship_positions"),
    ).fetchone()
    assert row is not None
    return bool(row[0]), str(row[1])


def refusal(role: str, schema: str, source: str) -> tuple[str, str]:
    """(what is refused, what the database's owner must run) for a role that may not write a source."""
    return (
        f"PostgreSQL role {role!r} may not write the rows of source {source!r} in {schema}",
        f"the database's owner must run `desto-archiver grant --postgres-url <owner's URL> --source {source} "
        f"--role {role}` (docs/postgresql.md, 'The role')",
    )


def not_allowed(role: str, schema: str, source: str) -> NotAllowed:
    return NotAllowed(": ".join(refusal(role, schema, source)))


def require_write(conn: psycopg.Connection[Any], schema: str, source: str) -> None:
    allowed, role = may_write(conn, schema, source)
    if not allowed:
        raise not_allowed(role, schema, source)


def grant_source(conn: psycopg.Connection[Any], schema: str, source: str, role: str) -> dict[str, Any]:
    """As the owner of the central schema: let ``role`` write ``source``'s rows (and read every
    host's): the privileges it needs, and the row of ``sources`` the policies read. Returns what
    the role may write now, and the sources already shipped that no role may write."""
    from psycopg import sql

    if conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        raise ShipError(
            f"no role {role!r} in PostgreSQL: create it first (CREATE ROLE {role} LOGIN PASSWORD '...'), "
            "one per host (docs/postgresql.md, 'The role')"
        )
    owner = conn.execute(
        "SELECT pg_catalog.pg_has_role(nspowner, 'USAGE') FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,)
    ).fetchone()
    if not owner or not owner[0]:
        raise ShipError(
            f"only the database's owner (the owner of the schema {schema}) may grant a source: "
            "run this with the owner's URL"
        )
    who, where = sql.Identifier(role), sql.Identifier(schema)
    with conn.transaction(), conn.cursor() as cur:
        found = cur.execute("SELECT current_database()").fetchone()
        assert found is not None
        database = sql.Identifier(str(found[0]))
        cur.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(database, who))
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(where, who))
        cur.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(where, who))
        written = sql.SQL(", ").join(sql.Identifier(schema, table) for table in HOSTS_WRITE)
        cur.execute(sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(written, who))
        cur.execute(
            f"INSERT INTO {schema}.sources (source_name, role_name) VALUES (%s, %s) ON CONFLICT (source_name) "
            "DO UPDATE SET role_name = EXCLUDED.role_name, granted_at = now()",
            (source, role),
        )
    mine = [
        r[0] for r in conn.execute(f"SELECT source_name FROM {schema}.sources WHERE role_name = %s ORDER BY 1", (role,))
    ]
    ungranted = [
        r[0]
        for r in conn.execute(
            f"SELECT source_name FROM {schema}.ship_positions p WHERE NOT EXISTS "
            f"(SELECT 1 FROM {schema}.sources s WHERE s.source_name = p.source_name) ORDER BY 1"
        )
    ]
    return {"source": source, "role": role, "role_sources": mine, "not_granted": ungranted}
