"""Erasures carried into PostgreSQL: an erased record loses every central row of its host, whichever
of the host's files shipped it, and the central table ``erased`` says what went, when and how.

The file notes each erasure in ``archiver_erased`` (archiver/archive/erase.py). Central rows are found by
the record, not by the file's numbers: a host rebuilt with a new file keeps its old file's status
history and quarantine in PostgreSQL (another ``file_id``), and erasing the record afterwards must
reach those too. The change log names a note when it is made or taken back (desto saving the
record again); a whole copy applies every note the file holds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archiver.archive.changelog import ERASURES, erasure_key
from archiver.archive.erase import jobs_follow
from archiver.archive.sql import has_erasures, select_in
from archiver.kinds import KINDS, Kind

if TYPE_CHECKING:
    import psycopg

_KINDS = {kind.value: kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class Erasure:
    kind: str
    record_id: str
    erased_at: str | None
    how: str | None


def read(conn: sqlite3.Connection, keys: Iterable[object]) -> tuple[list[Erasure], list[tuple[str, str]]]:
    """The notes the log's keys name: (those the file holds, those taken back since)."""
    wanted: dict[str, list[str]] = {}
    for key in keys:
        kind, record_id = erasure_key(key)
        if kind in _KINDS:  # a kind this version does not know has no central table to erase from
            wanted.setdefault(kind, []).append(record_id)
    held: list[Erasure] = []
    gone: list[tuple[str, str]] = []
    for kind, ids in wanted.items():
        query = f"SELECT kind, record_id, erased_at, how FROM {ERASURES} WHERE kind = '{kind}' AND record_id IN"
        found = {r[1]: Erasure(*r) for r in select_in(conn, query, ids)}
        held.extend(found.values())
        gone.extend((kind, record_id) for record_id in dict.fromkeys(ids) if record_id not in found)
    return held, gone


def pages(conn: sqlite3.Connection, size: int) -> Iterator[list[Erasure]]:
    """Every note of the file, ``size`` at a time, each page read on its own (a long copy holds no
    read transaction open)."""
    if not has_erasures(conn):
        return
    after = ("", "")
    while True:
        rows = conn.execute(
            f"SELECT kind, record_id, erased_at, how FROM {ERASURES} WHERE (kind, record_id) > (?, ?) "
            "ORDER BY kind, record_id LIMIT ?",
            (*after, size),
        ).fetchall()
        if not rows:
            return
        yield [Erasure(*r) for r in rows if r[0] in _KINDS]
        after = (rows[-1][0], rows[-1][1])


def apply(
    cur: psycopg.Cursor[Any], schema: str, source: str, file_id: str, erasures: Sequence[Erasure]
) -> dict[str, int]:
    """Delete every central row of ``source`` of these records, of every file_id: the record, its
    status history and quarantined values (and a session's jobs, as the file's erasure takes them,
    but for retention's), and note the erasures. Returns the rows deleted by table."""
    deleted: dict[str, int] = {}

    def count(table: str, n: int) -> None:
        if n > 0:
            deleted[table] = deleted.get(table, 0) + n

    by_kind: dict[str, list[str]] = {}
    for e in erasures:
        by_kind.setdefault(e.kind, []).append(e.record_id)
    sessions = [e.record_id for e in erasures if e.kind == Kind.SESSION.value and jobs_follow(e.how)]
    if sessions:
        cur.execute(
            f"DELETE FROM {schema}.jobs WHERE source_name = %s AND session_id = ANY(%s) RETURNING job_id",
            (source, sessions),
        )
        jobs = [r[0] for r in cur.fetchall()]
        count("jobs", len(jobs))
        # and those only quarantine names (desto could not read them), whichever file quarantined them
        cur.execute(
            f"SELECT DISTINCT record_id FROM {schema}.quarantine WHERE source_name = %s AND kind = 'job' "
            "AND session_id = ANY(%s) AND record_id IS NOT NULL",
            (source, sessions),
        )
        jobs.extend(r[0] for r in cur.fetchall())
        if jobs:
            by_kind.setdefault(Kind.JOB.value, []).extend(jobs)
    for kind, ids in by_kind.items():
        info = KINDS[_KINDS[kind]]
        cur.execute(
            f"DELETE FROM {schema}.{info.table} WHERE source_name = %s AND {info.id_column} = ANY(%s)", (source, ids)
        )
        count(info.table, cur.rowcount)
        for table in ("status_history", "quarantine"):
            cur.execute(
                f"DELETE FROM {schema}.{table} WHERE source_name = %s AND kind = %s AND record_id = ANY(%s)",
                (source, kind, ids),
            )
            count(table, cur.rowcount)
    if erasures:
        cur.executemany(
            f"INSERT INTO {schema}.erased (source_name, file_id, kind, record_id, erased_at, how) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (source_name, kind, record_id) DO UPDATE SET "
            "file_id = EXCLUDED.file_id, erased_at = EXCLUDED.erased_at, how = EXCLUDED.how",
            [(source, file_id, e.kind, e.record_id, e.erased_at, e.how) for e in erasures],
        )
    return deleted


def take_back(cur: psycopg.Cursor[Any], schema: str, source: str, records: Sequence[tuple[str, str]]) -> None:
    """Forget the central notes of erasures the file took back (desto saved the record again)."""
    by_kind: dict[str, list[str]] = {}
    for kind, record_id in records:
        by_kind.setdefault(kind, []).append(record_id)
    for kind, ids in by_kind.items():
        cur.execute(
            f"DELETE FROM {schema}.erased WHERE source_name = %s AND kind = %s AND record_id = ANY(%s)",
            (source, kind, ids),
        )


def sweep(pg: psycopg.Connection[Any], conn: sqlite3.Connection, schema: str, source: str, file_id: str,
          size: int, before_commit: Callable[[], None]) -> int:  # fmt: skip
    """Forget the central notes of this file that the file no longer holds (taken back while no
    change log was kept); ``before_commit`` may refuse each transaction. Returns how many went."""
    removed, after = 0, ("", "")
    while True:
        keys = [
            (r[0], r[1])
            for r in pg.execute(
                f"SELECT kind, record_id FROM {schema}.erased WHERE source_name = %s AND file_id = %s "
                "AND (kind, record_id) > (%s, %s) ORDER BY kind, record_id LIMIT %s",
                (source, file_id, *after, size),
            )
        ]
        if not keys:
            return removed
        _, gone = read(conn, [f"{kind}:{record_id}" for kind, record_id in keys])
        if gone:
            with pg.transaction(), pg.cursor() as cur:
                take_back(cur, schema, source, gone)
                before_commit()
            removed += len(gone)
        after = keys[-1]
