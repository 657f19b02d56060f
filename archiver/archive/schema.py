"""The SQLite file's schema and its forward migrations (``PRAGMA user_version``).

desto's three tables are created with desto 0.7.0's own DDL, so the file is the same whether
desto's built-in store or the archiver made it first; the archiver only adds columns (all
nullable, so desto's INSERTs, which name their columns, keep working) and tables of its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from archiver.models import decode_resp, job_session

SCHEMA_VERSION = 9

# The oldest SQLite the archiver's statements run on: RETURNING came in 3.35.0 (UPSERT in 3.24.0).
MIN_SQLITE = (3, 35, 0)


def unsupported_sqlite() -> str | None:
    """Why the SQLite library Python is linked against cannot run the archiver, or None when it
    can. Found at start, not at the first batch: an old library fails every write the same way,
    and a daemon retrying it would never archive anything."""
    found = sqlite3.sqlite_version_info
    if found < MIN_SQLITE:
        return (
            f"SQLite {sqlite3.sqlite_version} is too old: desto-archiver needs {'.'.join(map(str, MIN_SQLITE))} "
            "or newer. Python's sqlite3 module uses the system's library: run the archiver with a Python "
            "linked against a newer SQLite (Debian 12, Ubuntu 22.04 and later ship one), or in its container image"
        )
    if sqlite3.threadsafety == 0:
        return (
            "this SQLite library was built without thread support (SQLITE_THREADSAFE=0); the archiver "
            "writes and checkpoints from separate threads: use a Python linked against a standard build"
        )
    return None


DESTO_DDL = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    session_name TEXT NOT NULL,
    tmux_session_name TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'starting',
    start_time TEXT,
    end_time TEXT,
    last_heartbeat TEXT,
    job_ids TEXT DEFAULT '',
    tmux_active INTEGER DEFAULT 0,
    at_job_id TEXT DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    command TEXT NOT NULL DEFAULT '',
    script_path TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'queued',
    start_time TEXT,
    end_time TEXT,
    exit_code INTEGER,
    error_message TEXT DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    updated_at TEXT NOT NULL DEFAULT (datetime('now')),
    FOREIGN KEY (session_id) REFERENCES sessions(session_id)
);
CREATE TABLE IF NOT EXISTS favorites (
    favorite_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    command TEXT NOT NULL DEFAULT '',
    created_at TEXT,
    last_used_at TEXT,
    use_count INTEGER DEFAULT 0,
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_sessions_status ON sessions(status);
CREATE INDEX IF NOT EXISTS idx_sessions_start_time ON sessions(start_time);
CREATE INDEX IF NOT EXISTS idx_sessions_session_name ON sessions(session_name);
CREATE INDEX IF NOT EXISTS idx_jobs_session_id ON jobs(session_id);
CREATE INDEX IF NOT EXISTS idx_jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS idx_favorites_name ON favorites(name);
"""

# Columns the archiver keeps beside desto's on every record table.
TRACKING_COLUMNS = (
    ("read_at_us", "INTEGER"),  # the version of the read that wrote the row (read_clock.ReadClock): the guard
    ("first_seen_at", "TEXT"),
    ("last_seen_at", "TEXT"),  # last read that found the key in Redis
    ("expires_at", "TEXT"),  # when Redis will expire the key, from its TTL
    ("gone_at", "TEXT"),  # tombstone: when the key left Redis ...
    ("gone_reason", "TEXT"),  # ... and why: del, expired, evicted, missing
    ("extra", "TEXT"),  # JSON of hash fields desto's model does not know
)

ARCHIVER_DDL = """
CREATE TABLE IF NOT EXISTS at_jobs (
    at_job_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL DEFAULT '',
    command TEXT NOT NULL DEFAULT '',
    request_time TEXT NOT NULL DEFAULT '',
    scheduled_time TEXT NOT NULL DEFAULT '',
    user TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    creation_time TEXT NOT NULL DEFAULT '',
    queue TEXT NOT NULL DEFAULT '',
    session_name TEXT NOT NULL DEFAULT '',
    script_path TEXT NOT NULL DEFAULT '',
    arguments TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    execution_result TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    updated_at TEXT NOT NULL DEFAULT (datetime('now'))
);
CREATE INDEX IF NOT EXISTS idx_at_jobs_status ON at_jobs(status);
CREATE INDEX IF NOT EXISTS idx_at_jobs_session_name ON at_jobs(session_name);

CREATE TABLE IF NOT EXISTS status_history (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,               -- session, job, favorite, atjob
    record_id TEXT NOT NULL,
    event TEXT NOT NULL,              -- created, status, renamed, reappeared, deleted, expired, evicted, missing
    status TEXT,                      -- the status after the event
    previous_status TEXT,
    detail TEXT,                      -- e.g. a favorite's old and new names
    observed_at TEXT NOT NULL,        -- when the archiver saw it (UTC)
    desto_timestamp TEXT,             -- desto's own time of the change, from its pub/sub message
    source TEXT NOT NULL              -- redis (a read of the record) or pubsub (desto's message only)
);
CREATE INDEX IF NOT EXISTS idx_status_history_record ON status_history(kind, record_id, id);
CREATE INDEX IF NOT EXISTS idx_status_history_observed ON status_history(observed_at);

CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL,                -- the Redis key, byte for byte
    key_text TEXT NOT NULL,           -- the same, readable (undecodable bytes escaped)
    kind TEXT,
    record_id TEXT,
    redis_type TEXT NOT NULL,
    payload BLOB NOT NULL,            -- the value as Redis returned it, RESP-encoded
    payload_sha256 TEXT NOT NULL,
    reason TEXT NOT NULL,
    first_seen_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    times_seen INTEGER NOT NULL DEFAULT 1,
    resolved_at TEXT,                 -- a later read of the key was good (or the key left Redis)
    UNIQUE (key, payload_sha256, reason)
);
CREATE INDEX IF NOT EXISTS idx_quarantine_unresolved ON quarantine(key) WHERE resolved_at IS NULL;

CREATE TABLE IF NOT EXISTS archiver_state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""

# Migrations are history: each works on the tables that existed when it was written, so a kind
# added later (with its own migration) never changes what an old migration does.
_V1_TABLES = ("sessions", "jobs", "favorites", "at_jobs")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _execute_all(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the migration's transaction first: run statement by statement.
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


def add_record_table(conn: sqlite3.Connection, table: str, ddl: str, *, renamed: bool = False) -> None:
    """What the migration that adds a record kind calls: the kind's table (``ddl``: its CREATE
    TABLE and indexes), then the columns every record table carries beside desto's, and the
    tail column the writer keeps (the real name of a kind that can be renamed, else the status
    last observed)."""
    _execute_all(conn, ddl)
    have = _columns(conn, table)
    for name, decl in (*TRACKING_COLUMNS, ("real_name" if renamed else "observed_status", "TEXT")):
        if name not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    _execute_all(conn, DESTO_DDL)
    _execute_all(conn, ARCHIVER_DDL)
    for table in _V1_TABLES:
        have = _columns(conn, table)
        wanted = [*TRACKING_COLUMNS, *([("real_name", "TEXT")] if table == "favorites" else [])]
        for name, decl in wanted:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
    # Reconciliation looks for live rows not read since a scan began.
    for table in _V1_TABLES:
        conn.execute(f"CREATE INDEX IF NOT EXISTS idx_{table}_live ON {table}(read_at_us) WHERE gone_at IS NULL")


# Tables desto's own store writes too. Every write of the archiver's own sets read_at_us, but one:
# freeing a favorite's name, which is why favorites watch inserts only (desto 0.7.0 never saves
# a favorite anyway).
_FOREIGN_WRITES = (
    ("sessions", "session", "session_id", True),
    ("jobs", "job", "job_id", True),
    ("favorites", "favorite", "favorite_id", False),
)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    """Notice writes by desto's own store: its upserts can save an older state than Redis holds
    (a job it saves as queued after it started), and nothing in Redis changes afterwards to
    correct it. Triggers note such rows; the daemon re-reads them from Redis."""
    for table in ("sessions", "jobs", "at_jobs"):
        if "observed_status" not in _columns(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN observed_status TEXT")
        conn.execute(f"UPDATE {table} SET observed_status = status WHERE read_at_us IS NOT NULL")
    # Every read moves read_at_us: an index on it cost more on each write than it saved the sweep,
    # which pages through the table by rowid anyway.
    for table in _V1_TABLES:
        conn.execute(f"DROP INDEX IF EXISTS idx_{table}_live")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS archiver_recheck (kind TEXT NOT NULL, record_id TEXT NOT NULL, "
        "PRIMARY KEY (kind, record_id)) WITHOUT ROWID"
    )
    for table, kind, id_col, watch_updates in _FOREIGN_WRITES:
        # Not INSERT OR IGNORE: inside a trigger, the conflict policy of the statement that fired it
        # (desto's plain upsert: ABORT) overrides the trigger's own, and desto's write would fail.
        note = (
            f"INSERT INTO archiver_recheck (kind, record_id) SELECT '{kind}', NEW.{id_col} WHERE NOT EXISTS "
            f"(SELECT 1 FROM archiver_recheck WHERE kind = '{kind}' AND record_id = NEW.{id_col})"
        )
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS archiver_recheck_{table}_insert AFTER INSERT ON {table} "
            f"WHEN NEW.read_at_us IS NULL BEGIN {note}; END"
        )
        if watch_updates:
            conn.execute(
                f"CREATE TRIGGER IF NOT EXISTS archiver_recheck_{table}_update AFTER UPDATE ON {table} "
                f"WHEN NEW.read_at_us IS OLD.read_at_us BEGIN {note}; END"
            )


# Deletions that stick. desto's History tab deletes rows with plain DELETE statements on its own
# connection, which has no function of ours: a trigger notes each one, in desto's transaction, so
# the archiver never writes the record again, with whether the deleting SQLite overwrites what it
# deletes (built with SECURE_DELETE; desto never changes the setting), so the archiver knows how
# much scrubbing the file needs. Not the pragma_secure_delete table: a SQLite whose schema is not
# trusted (trusted_schema off) refuses a virtual table in a trigger, and desto's delete would fail.
ERASED_DDL = """
CREATE TABLE IF NOT EXISTS archiver_erased (
    kind TEXT NOT NULL,
    record_id TEXT NOT NULL,
    erased_at TEXT NOT NULL,          -- UTC ISO
    how TEXT NOT NULL,                -- desto (its store: History tab, favorites), forget, retention
    zeroed INTEGER NOT NULL,          -- 1: the deleting SQLite overwrites what it deletes (SECURE_DELETE)
    purged_at TEXT,                   -- history, quarantine and left-over bytes removed by the archiver
    PRIMARY KEY (kind, record_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idx_archiver_erased_pending ON archiver_erased(kind) WHERE purged_at IS NULL
"""

ERASABLE = (("sessions", "session", "session_id"), ("jobs", "job", "job_id"), ("favorites", "favorite", "favorite_id"))


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    _execute_all(conn, ERASED_DDL)
    # Rows written before now by a SQLite that does not overwrite what it frees (built without
    # SECURE_DELETE) may have left old copies in free space: the first erasure then vacuums.
    zeroing = conn.execute("SELECT count(*) FROM pragma_compile_options WHERE compile_options = 'SECURE_DELETE'")
    if not zeroing.fetchone()[0] and any(
        conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0] for table in _V1_TABLES
    ):
        conn.execute(
            "INSERT OR REPLACE INTO archiver_state (name, value, updated_at) "
            "VALUES ('written_unzeroed', '1', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
        )
    for table, kind, id_col in ERASABLE:
        # OR IGNORE: a record the archiver erases itself (forget, retention) is noted first, with its
        # own how. (A DELETE has no conflict clause of its own to override the trigger's.)
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS archiver_erase_{table} AFTER DELETE ON {table} BEGIN "
            f"INSERT OR IGNORE INTO archiver_erased (kind, record_id, erased_at, how, zeroed) VALUES "
            f"('{kind}', OLD.{id_col}, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'desto', "
            f"sqlite_compileoption_used('SECURE_DELETE')); END"
        )
        # desto saving the record again is desto's decision: the archiver follows it from then on.
        # (A REPLACE under recursive_triggers deletes, then inserts: this undoes its note too.)
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS archiver_unerase_{table} AFTER INSERT ON {table} "
            f"WHEN NEW.read_at_us IS NULL BEGIN "
            f"DELETE FROM archiver_erased WHERE kind = '{kind}' AND record_id = NEW.{id_col}; END"
        )


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    """The change log the shipper to PostgreSQL reads (archiver/archive/changelog.py): which row of which
    table changed, in order. Its triggers exist only while shipping is configured; the table
    always, so desto's own writes into a shared file never fail on a missing table."""
    # No AUTOINCREMENT (its counter is one more write per change): the log never gives its last
    # entry up, so numbers are never used twice.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS archiver_changes (seq INTEGER PRIMARY KEY, tbl TEXT NOT NULL, key NOT NULL)"
    )


# A writer that does not overwrite what it frees leaves old copies of the rows it rewrites, not only
# of those it deletes: a job desto saves again when it finishes grows, moves, and its first copy
# stays in the page's free space. Triggers note desto's inserts and updates made by such a SQLite,
# so the next erasure scrubs the whole file. Not INSERT OR IGNORE: inside a trigger the conflict
# clause of the statement that fired it (desto's upsert: ABORT) overrides the trigger's own. The
# archiver's own writes set read_at_us but one, freeing a favorite's name: on a SQLite without
# SECURE_DELETE that one is noted too (a scrub too many, never one too few).
_NOTE_UNZEROED = (
    "INSERT INTO archiver_state (name, value, updated_at) SELECT 'written_unzeroed', '1', "
    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE NOT EXISTS "
    "(SELECT 1 FROM archiver_state WHERE name = 'written_unzeroed')"
)


def _migrate_to_5(conn: sqlite3.Connection) -> None:
    """A deleted session's jobs go with it wherever the file knows them from. A job desto's readers
    refuse never reaches ``jobs``: its quarantine entry keeps its session's id (read from the raw
    hash), and the note of a session desto deleted keeps the job list it had (cleared once purged).
    And desto's inserts and updates by a SQLite that does not overwrite are noted, as its deletes."""
    if "session_id" not in _columns(conn, "quarantine"):
        conn.execute("ALTER TABLE quarantine ADD COLUMN session_id TEXT")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS idx_quarantine_session ON quarantine(session_id) WHERE session_id IS NOT NULL"
    )
    found = conn.execute("SELECT id, payload FROM quarantine WHERE kind = 'job' AND redis_type = 'hash'").fetchall()
    for row_id, payload in found:
        try:
            session_id = job_session(decode_resp(bytes(payload)))
        except ValueError:
            continue
        if session_id is not None:
            conn.execute("UPDATE quarantine SET session_id = ? WHERE id = ?", (session_id, row_id))
    if "job_ids" not in _columns(conn, "archiver_erased"):
        conn.execute("ALTER TABLE archiver_erased ADD COLUMN job_ids TEXT")
    conn.execute("DROP TRIGGER IF EXISTS archiver_erase_sessions")
    conn.execute(
        "CREATE TRIGGER archiver_erase_sessions AFTER DELETE ON sessions BEGIN "
        "INSERT OR IGNORE INTO archiver_erased (kind, record_id, erased_at, how, zeroed, job_ids) VALUES "
        "('session', OLD.session_id, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'desto', "
        "sqlite_compileoption_used('SECURE_DELETE'), OLD.job_ids); END"
    )
    for table, _, _, _ in _FOREIGN_WRITES:  # the archiver's own writes set read_at_us
        for op, foreign in (("insert", "NEW.read_at_us IS NULL"), ("update", "NEW.read_at_us IS OLD.read_at_us")):
            conn.execute(
                f"CREATE TRIGGER IF NOT EXISTS archiver_unzeroed_{table}_{op} AFTER {op.upper()} ON {table} "
                f"WHEN {foreign} AND NOT sqlite_compileoption_used('SECURE_DELETE') BEGIN {_NOTE_UNZEROED}; END"
            )
    # The row the scrub of the file's free space updates at each step (scrub.py): its page is
    # only ever written by the archiver, never zeroed by the scrub.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS archiver_scrub (id INTEGER PRIMARY KEY CHECK (id = 1), steps INTEGER NOT NULL)"
    )
    conn.execute("INSERT OR IGNORE INTO archiver_scrub (id, steps) VALUES (1, 0)")
    # Who wrote the rows already here, and with which SQLite, cannot be told: the first erasure
    # scrubs the whole file once.
    if any(conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0] for table, *_ in _FOREIGN_WRITES):
        conn.execute(_NOTE_UNZEROED)


def _migrate_to_6(conn: sqlite3.Connection) -> None:
    """Each change-log entry carries a random token, so a shipper can tell the log it shipped from
    another with the same numbers (a backup restored, a copy, a snapshot rolled back: their logs
    go on numbering from where the copy was taken). The triggers that wrote entries without one are
    dropped, and the log no longer counts as complete: the next daemon that ships creates them
    again, and its shipper copies the file whole once."""
    if "token" not in _columns(conn, "archiver_changes"):
        conn.execute("ALTER TABLE archiver_changes ADD COLUMN token BLOB")
    conn.execute("UPDATE archiver_changes SET token = randomblob(8) WHERE token IS NULL")
    triggers = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'archiver\\_changes\\_%' ESCAPE '\\'"
    ).fetchall()
    for (name,) in triggers:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.execute("DELETE FROM archiver_state WHERE name = 'changes_from'")


# The quarantine from schema 7 on: one row per Redis key, changed in place as the key changes.
QUARANTINE_DDL = """
CREATE TABLE quarantine_v7 (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,         -- the Redis key, byte for byte: one row per key
    key_text TEXT NOT NULL,           -- the same, readable (undecodable bytes escaped)
    kind TEXT,
    record_id TEXT,
    redis_type TEXT NOT NULL,
    payload BLOB NOT NULL,            -- the value as Redis returned it, RESP-encoded (its first bytes when truncated)
    payload_sha256 TEXT NOT NULL,     -- of the whole value
    reason TEXT NOT NULL,
    first_seen_at TEXT NOT NULL,      -- the first read that found the key unreadable
    last_seen_at TEXT NOT NULL,
    times_seen INTEGER NOT NULL DEFAULT 1,    -- reads that found it unreadable
    resolved_at TEXT,                 -- a later read of the key was good (or the key left Redis)
    session_id TEXT,                  -- a job's session, read from its raw hash: erased with it
    payload_length INTEGER NOT NULL,  -- bytes of the whole value
    truncated INTEGER NOT NULL DEFAULT 0,     -- 1: payload holds only the value's first bytes
    changes_seen INTEGER NOT NULL DEFAULT 0,  -- reads that found another value (or reason) than the one kept
    read_at_us INTEGER                -- the version of the read kept: an older read never replaces it
)
"""


def _migrate_to_7(conn: sqlite3.Connection) -> None:
    """One quarantine row per Redis key. Each distinct value of a rejected key had a row of its
    own, so a big record desto cannot read, changed again and again, filled the file with copies.
    Each key keeps its newest row (by last seen), with its oldest first sighting, every read
    counted, and as many changes as it had other rows. The table is rebuilt under the same name
    (SQLite cannot drop a UNIQUE constraint), ids kept; the change log's triggers on it, when
    shipping is on, are made again, and every row the table had is logged, so PostgreSQL drops
    the rows collapsed and gets the new columns of the rest. Values stay whole: the per-record
    cap applies from their next change on."""
    triggers = [
        str(row[0])
        for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'quarantine' AND sql IS NOT NULL"
        )
    ]
    conn.execute(QUARANTINE_DDL)
    conn.execute(
        "INSERT INTO quarantine_v7 (id, key, key_text, kind, record_id, redis_type, payload, payload_sha256, reason, "
        "first_seen_at, last_seen_at, times_seen, resolved_at, session_id, payload_length, truncated, changes_seen) "
        "SELECT q.id, q.key, q.key_text, q.kind, q.record_id, q.redis_type, q.payload, q.payload_sha256, q.reason, "
        "s.first_seen, q.last_seen_at, s.seen, q.resolved_at, q.session_id, length(q.payload), 0, s.n_rows - 1 "
        "FROM quarantine q JOIN (SELECT id, "
        "row_number() OVER (PARTITION BY key ORDER BY last_seen_at DESC, id DESC) AS newest, "
        "min(first_seen_at) OVER (PARTITION BY key) AS first_seen, "
        "sum(times_seen) OVER (PARTITION BY key) AS seen, "
        "count(*) OVER (PARTITION BY key) AS n_rows FROM quarantine) s ON s.id = q.id WHERE s.newest = 1"
    )
    if triggers:  # shipping is on: PostgreSQL learns of every row, kept or collapsed
        conn.execute(
            "INSERT INTO archiver_changes (tbl, key, token) SELECT 'quarantine', id, randomblob(8) FROM quarantine "
            "ORDER BY id"
        )
    conn.execute("DROP TABLE quarantine")
    conn.execute("ALTER TABLE quarantine_v7 RENAME TO quarantine")
    conn.execute("CREATE INDEX idx_quarantine_unresolved ON quarantine(key) WHERE resolved_at IS NULL")
    conn.execute("CREATE INDEX idx_quarantine_session ON quarantine(session_id) WHERE session_id IS NOT NULL")
    for sql in triggers:
        conn.execute(sql)


# desto's History tab lists sessions newest first, all of them or by status, a page at a time
# (``ORDER BY created_at DESC LIMIT ? OFFSET ?``). With these the page is read from the index in
# order and stops at the page's end; without them each page sorted the whole table. They carry
# the archiver's prefix: desto's own ``CREATE INDEX IF NOT EXISTS`` names are left to desto.
DESTO_READ_INDEXES = (
    ("idx_archiver_sessions_created_at", "sessions(created_at, session_name)"),
    ("idx_archiver_sessions_status_created_at", "sessions(status, created_at, session_name)"),
)


def _migrate_to_8(conn: sqlite3.Connection) -> None:
    """Indexes for desto's History tab (see DESTO_READ_INDEXES). On a large archive they take a
    while to build, once, inside the migration's transaction."""
    for name, on in DESTO_READ_INDEXES:
        conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")


# The status history from schema 9 on: AUTOINCREMENT, so a number a row once had is never given to
# another. The shipper finds new history rows by number; SQLite's plain rowid gives the numbers
# freed at the top (an erasure of the newest rows) to the next rows, and a batch that came between
# two such erasures had already counted a freed number as shipped.
STATUS_HISTORY_DDL = """
CREATE TABLE status_history_v9 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,               -- session, job, favorite, atjob
    record_id TEXT NOT NULL,
    event TEXT NOT NULL,              -- created, status, renamed, reappeared, deleted, expired, evicted, missing
    status TEXT,                      -- the status after the event
    previous_status TEXT,
    detail TEXT,                      -- e.g. a favorite's old and new names
    observed_at TEXT NOT NULL,        -- when the archiver saw it (UTC)
    desto_timestamp TEXT,             -- desto's own time of the change, from its pub/sub message
    source TEXT NOT NULL              -- redis (a read of the record) or pubsub (desto's message only)
)
"""


def _migrate_to_9(conn: sqlite3.Connection) -> None:
    """Status-history numbers never given twice (see STATUS_HISTORY_DDL). The table is rebuilt under
    the same name, ids kept, with its indexes and the change log's triggers (when shipping is on)
    made again; indexes deferred by a first backfill stay deferred. The counter starts above every
    number the file still knows of: its rows, and the rows whose deletion the change log holds and
    the shipper has not seen yet (PostgreSQL may count those numbers as shipped)."""
    kept = [
        str(row[0])
        for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND tbl_name = 'status_history' "
            "AND sql IS NOT NULL ORDER BY type, name"
        )
    ]
    conn.execute(STATUS_HISTORY_DDL)
    conn.execute(
        "INSERT INTO status_history_v9 (id, kind, record_id, event, status, previous_status, detail, observed_at, "
        "desto_timestamp, source) SELECT id, kind, record_id, event, status, previous_status, detail, observed_at, "
        "desto_timestamp, source FROM status_history ORDER BY id"
    )
    conn.execute("DROP TABLE status_history")
    conn.execute("ALTER TABLE status_history_v9 RENAME TO status_history")
    for sql in kept:
        conn.execute(sql)
    logged = conn.execute(
        "SELECT max(CAST(key AS INTEGER)) FROM archiver_changes WHERE tbl = 'status_history'"
    ).fetchone()[0]
    newest = max(int(logged or 0), int(conn.execute("SELECT coalesce(max(id), 0) FROM status_history").fetchone()[0]))
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'status_history'")
    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('status_history', ?)", (newest,))


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_to_1,
    2: _migrate_to_2,
    3: _migrate_to_3,
    4: _migrate_to_4,
    5: _migrate_to_5,
    6: _migrate_to_6,
    7: _migrate_to_7,
    8: _migrate_to_8,
    9: _migrate_to_9,
}


class NewerSchemaError(Exception):
    pass


def migrate(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION; returns (version found, version now).

    Runs in one ``BEGIN IMMEDIATE`` transaction, with the version bump inside it, so a crash
    half-way leaves the file as it was.
    """
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"the file has schema version {found}, newer than this desto-archiver's {SCHEMA_VERSION}: "
            "upgrade desto-archiver to use it"
        )
    if found == SCHEMA_VERSION:
        return found, found
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        for version in sorted(v for v in MIGRATIONS if current < v <= SCHEMA_VERSION):
            MIGRATIONS[version](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found, SCHEMA_VERSION
