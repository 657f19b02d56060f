"""The file's change log: which row of which table changed, in order, for the shipper to PostgreSQL.

SQLite triggers append ``(seq, tbl, key, token)`` to ``archiver_changes`` in the same transaction as the
change itself, whoever writes it (the daemon, a backfill, desto's own store, a deletion), so the
log cannot miss a committed change nor hold one that was rolled back. The triggers exist only while
shipping is configured: a daemon without PostgreSQL drops them, so SQLite-only installations pay
nothing on their write path and the log does not grow. What it holds then stays (the shipper trims
what PostgreSQL confirmed: the rest is what was not shipped yet, and the mark of what was), so
that shipping, when it comes back, can tell this file's log from a copy's.

``archiver_state['changes_from']`` says from which ``seq`` on the log is complete (every change
since is in it, or was shipped and trimmed). A shipper whose position in PostgreSQL is older than
that cannot trust the log, and copies the whole file first.

Each entry carries a random ``token``: a number names an entry only within one log, and a copy of
the file (a backup restored, a filesystem snapshot rolled back) numbers its own entries on from
where it was taken. PostgreSQL keeps the number and token of the log's last entry as of the read
its rows came from (the shipped "head"); a file whose entry of that number has another token, or
none, is not the log that was shipped. ``trim`` deletes only entries before the shipped position,
so the head stays in the file until a later batch moves it.

Erasures are logged too: a note added to ``archiver_erased`` (or taken back, when desto saves the
record again) is an entry of the table ``archiver_erased`` whose key is ``kind:record_id``, so the
shipper can erase the record's central rows whichever of the host's files shipped them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from archiver.archive.sql import begin_immediate
from archiver.kinds import KINDS

# The tables shipped, with their key column: every record kind's, its history and the quarantine.
SHIPPED: dict[str, str] = {
    **{info.table: info.id_column for info in KINDS.values()},
    "status_history": "id",
    "quarantine": "id",
}
ERASURES = "archiver_erased"  # logged with the key kind:record_id (see erasure_key)
STATE_FROM = "changes_from"
_OPS = ("insert", "update", "delete")
# The status history only grows (AUTOINCREMENT: a number is never given twice): the shipper finds
# its new rows by number, so the write path pays for no log entry there; only the rare change or
# deletion of a row is logged. An erasure note is made or taken back, never changed (but for when
# it was scrubbed: nothing to ship).
OPS: dict[str, tuple[str, ...]] = {
    **{table: ("update", "delete") if table == "status_history" else _OPS for table in SHIPPED},
    ERASURES: ("insert", "delete"),
}


def erasure_key(key: object) -> tuple[str, str]:
    """(kind, record_id) of an erasure's log key."""
    kind, _, record_id = str(key).partition(":")
    return kind, record_id


def _key(table: str, row: str) -> str:
    if table == ERASURES:
        return f"{row}.kind || ':' || {row}.record_id"
    return f"{row}.{SHIPPED[table]}"


def _trigger_name(table: str, op: str) -> str:
    return f"archiver_changes_{table}_{op}"


def _trigger_sql(table: str, op: str) -> str:
    note = "INSERT INTO archiver_changes (tbl, key, token) "
    new, old = _key(table, "NEW"), _key(table, "OLD")
    if op == "insert":
        body = f"{note}VALUES ('{table}', {new}, randomblob(8));"
    elif op == "delete":
        body = f"{note}VALUES ('{table}', {old}, randomblob(8));"
    else:  # a changed key (never done by desto or the archiver) is a delete of the old one too
        body = (
            f"{note}VALUES ('{table}', {new}, randomblob(8)); "
            f"{note}SELECT '{table}', {old}, randomblob(8) WHERE {old} IS NOT {new};"
        )
    return f"CREATE TRIGGER IF NOT EXISTS {_trigger_name(table, op)} AFTER {op.upper()} ON {table} BEGIN {body} END"


def _present(conn: sqlite3.Connection) -> set[str]:
    return {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'archiver\\_changes\\_%' ESCAPE '\\'"
        )
    }


def _expected() -> set[str]:
    return {_trigger_name(t, op) for t in OPS for op in OPS[t]}


def is_enabled(conn: sqlite3.Connection) -> bool:
    return _expected() <= _present(conn)


def _next_seq(conn: sqlite3.Connection) -> int:
    # the log's last entry is never deleted (see trim), so the next number is always a new one
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM archiver_changes").fetchone()[0]) + 1


def _put_state(conn: sqlite3.Connection, value: str | None) -> None:
    if value is None:
        conn.execute("DELETE FROM archiver_state WHERE name = ?", (STATE_FROM,))
    else:
        conn.execute(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ')) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (STATE_FROM, value),
        )


def set_enabled(conn: sqlite3.Connection, enabled: bool, busy_timeout: float = 5.0) -> bool:
    """Create (or drop) the triggers; returns whether anything changed. Creating them starts a
    complete log after a marker; dropping them forgets where it was complete (the entries stay:
    the one PostgreSQL's mark names among them)."""
    present = _present(conn)
    if (enabled and present == _expected()) or (not enabled and not present):
        return False
    begin_immediate(conn, busy_timeout)
    try:
        if enabled:
            for table, ops in OPS.items():
                for op in ops:
                    conn.execute(_trigger_sql(table, op))
            for name in present - _expected():
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
            # A marker that names no row takes a number: a shipper that stopped at the last seq
            # before the triggers went away finds the log starting after a gap (what changed
            # meanwhile), and copies the file.
            marker = conn.execute(
                "INSERT INTO archiver_changes (tbl, key, token) VALUES ('', '', randomblob(8)) RETURNING seq"
            ).fetchone()[0]
            _put_state(conn, str(marker + 1))
        else:
            for name in present:
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
            _put_state(conn, None)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def complete_from(conn: sqlite3.Connection) -> int | None:
    """The first seq from which the log holds every change (None: the triggers are off)."""
    row = conn.execute("SELECT value FROM archiver_state WHERE name = ?", (STATE_FROM,)).fetchone()
    return int(row[0]) if row else None


def last_seq(conn: sqlite3.Connection) -> int:
    return _next_seq(conn) - 1


def token_at(conn: sqlite3.Connection, seq: int) -> bytes | None:
    """The token of the entry ``seq`` (None: the log has no such entry)."""
    row = conn.execute("SELECT token FROM archiver_changes WHERE seq = ?", (seq,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def read(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, str, object]]:
    return [
        (row[0], row[1], row[2])
        for row in conn.execute(
            "SELECT seq, tbl, key FROM archiver_changes WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )
    ]


def trim(conn: sqlite3.Connection, upto: int, busy_timeout: float = 5.0, step: int = 2000) -> int:
    """Delete the entries before ``upto`` (shipped), ``step`` at a time: each transaction holds the
    write lock only briefly, so the daemon's writer barely waits. The entries from ``upto`` on
    stay: PostgreSQL's mark of the log it holds is one of them (the last entry its rows were read
    with, at or after the position), and the last keeps the numbering going. Returns how many went."""
    removed = 0
    while True:
        first = conn.execute("SELECT min(seq) FROM archiver_changes").fetchone()[0]
        if first is None or first >= upto:
            return removed
        begin_immediate(conn, busy_timeout)
        try:
            cur = conn.execute("DELETE FROM archiver_changes WHERE seq < ?", (min(upto, first + step),))
            removed += cur.rowcount
            known = complete_from(conn)
            if known is not None and known <= upto:
                _put_state(conn, str(upto + 1))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def kinds(entries: Sequence[tuple[int, str, object]]) -> dict[str, list[object]]:
    """The entries' keys by table, each once (the log names a row once per change)."""
    found: dict[str, dict[object, None]] = {}
    for _, table, key in entries:
        if table in OPS:  # not a marker
            found.setdefault(table, {})[key] = None
    return {table: list(keys) for table, keys in found.items()}
