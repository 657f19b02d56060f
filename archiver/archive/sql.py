"""Queries every reader and writer of the file shares."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from archiver.kinds import Kind


def read_only(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the file at ``path``, whatever characters its name holds. SQLite
    takes it as a URI, which a path pasted in would not be: ``%41`` reads as ``A``, a ``?`` starts
    the URI's parameters (dropping ``mode=ro``) and a ``#`` ends it, so another file would be
    opened, or created. The URI is built from the absolute path, each such character escaped."""
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout)


def existing(path: Path, timeout: float = 5.0, **connect: Any) -> sqlite3.Connection:
    """A read-write connection to the file at ``path`` that never creates one: a path that names
    nothing (a file removed a moment ago) raises, where a plain connect would make an empty
    database there. The URI is built as :func:`read_only`'s."""
    conn: sqlite3.Connection = sqlite3.connect(
        Path(path).resolve().as_uri() + "?mode=rw", uri=True, timeout=timeout, **connect
    )
    return conn


def select_in(conn: sqlite3.Connection, query: str, values: Sequence[Any], size: int = 512) -> Iterator[Any]:
    """The rows of ``query`` (ending in ``IN``) for every one of ``values``, asked ``size`` at a
    time: SQLite builds limit a statement's parameters (999 before 3.32, 32,766 since).

    Each list is padded to a power of two with its last value (a repeat changes nothing in an IN
    list), so a query has at most ten texts. With one text per length, the connection's cache
    of prepared statements filled up with one of each batch size the daemon met, megabytes of
    them, each prepared again and again as they pushed each other out."""
    for start in range(0, len(values), size):
        chunk = list(values[start : start + size])
        padded = 1 << (len(chunk) - 1).bit_length()
        chunk.extend(chunk[-1:] * (padded - len(chunk)))
        yield from conn.execute(f"{query} ({', '.join('?' * padded)})", chunk)


def erased_among(conn: sqlite3.Connection, kind: Kind, ids: Sequence[str]) -> set[str]:
    """The ``ids`` of ``kind`` that are erased. An erased record has no row, so only ids new to
    the file need asking; an empty table (most files, most of the time) costs one page read."""
    return _noted(conn, f"kind = '{kind.value}'", ids)


def _noted(conn: sqlite3.Connection, where: str, ids: Sequence[str]) -> set[str]:
    """The ``ids`` with an erasure note matching ``where``."""
    if not ids or conn.execute("SELECT NOT EXISTS (SELECT 1 FROM archiver_erased)").fetchone()[0]:
        return set()
    query = f"SELECT record_id FROM archiver_erased WHERE {where} AND record_id IN"
    return {r[0] for r in select_in(conn, query, list(dict.fromkeys(ids)))}


# The ways of erasing a session that leave its jobs alone (``jobs_follow`` False in the table of
# archiver/archive/erase.py, ERASURE_RULES; a test keeps the two the same): retention erases each
# record by its own tombstone, so a job of a pruned session that Redis still holds is archived.
JOBS_STAY = ("retention",)


def sessions_taking_jobs(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """The session ``ids`` erased in a way that takes their jobs, also those the file never met
    (desto's delete, ``forget``): a job of one is never written, nor quarantined."""
    stay = ", ".join(f"'{how}'" for how in JOBS_STAY)
    return _noted(conn, f"kind = 'session' AND how NOT IN ({stay})", ids)


def erased_rows(conn: sqlite3.Connection, kind: Kind, rows: Sequence[tuple[str, tuple[Any, ...]]]) -> set[str]:
    """Of new rows (id, values), those not to write: erased, or a job of a session erased in a way
    that takes its jobs (also those the file had not met yet)."""
    skip = erased_among(conn, kind, [record_id for record_id, _ in rows])
    if kind is Kind.JOB and rows and len(skip) < len(rows):
        sessions = sessions_taking_jobs(conn, [values[1] for _, values in rows])
        skip.update(record_id for record_id, values in rows if values[1] in sessions)
    return skip


def has_erasures(conn: sqlite3.Connection) -> bool:
    """Whether the file has the table of erasures (schema 3): read-only readers of older files."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'archiver_erased'")
    return found.fetchone() is not None


_LOCK_POLL_S = 0.001  # how often a write tries again for a lock another writer holds


def begin_immediate(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """BEGIN IMMEDIATE, trying for the write lock every millisecond until ``busy_timeout``. SQLite's
    own busy handler sleeps longer and longer between tries (100 ms at a time after the first
    quarter second): against another writer that holds the lock most of the time and lets go of
    it briefly (desto's own store, a backup), it misses most of the gaps."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(_LOCK_POLL_S)
