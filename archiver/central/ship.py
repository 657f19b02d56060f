"""Shipping the archive into PostgreSQL (see archiver/central/postgres.py for the central tables).

The SQLite file stays the source of truth and the buffer. Changes are found in the file's change
log (archiver/archive/changelog.py), their rows' current state is read from the file, and upserted into
PostgreSQL together with the shipper's position, in one PostgreSQL transaction per batch: a batch
lands whole or not at all, and a batch shipped twice changes nothing (at-least-once, idempotent).
Only then are the shipped entries trimmed from the file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archiver.archive import changelog
from archiver.archive.sql import begin_immediate, erased_among, select_in
from archiver.central import ship_erasures
from archiver.central.postgres import connect, migrate_pg, not_allowed, require_write
from archiver.central.ship_tables import Table, as_params, coerce, describe
from archiver.config import Settings
from archiver.kinds import KINDS, Kind
from archiver.log import get_logger

if TYPE_CHECKING:
    import psycopg

log = get_logger("archiver.central.ship")

STATE_FILE_ID = "ship_file_id"
_COPY_FROM = 50  # rows from which a batch is copied into a temporary table rather than upserted row by row


class NeedsCopy(Exception):
    """The log alone cannot bring PostgreSQL up to date: the whole file must be copied first."""


class FileReplaced(Exception):
    """The file this shipper reads is no longer the one at the archive's path (removed, or another
    put there): what it read from it must not land in PostgreSQL. Ship from the path's file instead."""


NOT_THE_SHIPPED_LOG = "not the change log that was shipped: a restored or copied file"


TokenAt = Callable[[int], bytes | None]  # the token of the file's log entry of that number (None: none)


def marks_the_log(head: int | None, head_token: bytes | None, token_at: TokenAt) -> bool:
    """Whether a mark (``head``, ``head_token``) names the file's change log: its entry ``head``
    has that token."""
    return head is not None and head_token is not None and token_at(head) == head_token


@dataclass(frozen=True, slots=True)
class ShipPosition:
    """Where a source's shipping stands: one row of the central ``ship_positions``, read against
    the file that ships under the source.

    The central row (what PostgreSQL holds of the source):

    - ``file_id``: the file shipping the source; the file keeps its own id in its
      ``archiver_state['ship_file_id']`` (``STATE_FILE_ID``), given on its first ship;
    - ``position``: the last entry of the file's change log PostgreSQL holds (every change up to
      it is shipped); None until a copy recorded one (or while the file keeps no log);
    - ``history_id``: the last ``status_history`` row shipped (that table grows by id and is
      shipped by number, not through the log);
    - ``head``, ``head_token``: the mark of the log the rows were read from: the number and token
      of that log's last entry at the read. None: an older desto-archiver's row, which kept none.

    The file's side: ``archiver_state['changes_from']`` (``changelog.complete_from``) is the
    first entry from which its log is complete (None: the log is off); ``changelog.last_seq`` its
    last entry; ``changelog.token_at`` an entry's token.

    The invariants the decisions rest on:

    1. rows land with the position that covers them, in one PostgreSQL transaction under the
       source's lock: the position never claims a change that is not in PostgreSQL;
    2. entries are numbered only within one log: a copy of the file (a backup restored, a snapshot
       rolled back) numbers its own on from where it was taken, so only the token at ``head``
       tells that the file's log is the one shipped (:meth:`is_the_shipped_file`);
    3. the file trims its log only below ``position``, so ``head`` (at or after it) stays in the
       file until a later batch moves it, and the log from ``position`` on is complete while
       ``position + 1 >= changes_from``;
    4. a copy records the position of the log it copied up to; a shipper of the same file that
       shipped further meanwhile keeps its place (the upsert of ``Shipper._record_copy``); the
       mark of a file it replaces is kept in ``ship_files``, so that file is told from a copy of
       it if it comes back.

    The decisions: :meth:`is_the_shipped_file` (is this file the one shipped?),
    :meth:`copy_needed` (copy the whole file, or follow the log?), :meth:`left_to_ship`,
    :meth:`nothing_to_ship` and :meth:`after_batch` (what is left to ship, and where a batch
    leaves the position).
    """

    file_id: str
    position: int | None
    history_id: int | None
    head: int | None
    head_token: bytes | None

    def is_the_shipped_file(self, file_id: str, last_seq: int, token_at: TokenAt) -> bool:
        """Whether the file of id ``file_id`` (its log ending at ``last_seq``) is the one that
        shipped under this position: the same id, and its log is the one marked. Without a mark
        (an older desto-archiver's row), a position beyond the file's log tells a copy."""
        if file_id != self.file_id:
            return False
        if self.head is None:
            return not (self.position is not None and self.position > last_seq)
        return marks_the_log(self.head, self.head_token, token_at)

    @staticmethod
    def copy_needed(
        known: ShipPosition | None, file_id: str, complete_from: int | None, token_at: TokenAt
    ) -> str | None:
        """Why the change log alone cannot bring PostgreSQL up to date for the file ``file_id``
        (``known``: the source's position, None when PostgreSQL has none), so the whole file is
        copied first. None: follow the log from ``known.position``."""
        if (
            known is None
            or known.position is None
            or known.history_id is None
            or known.file_id != file_id
            or complete_from is None
        ):
            return "no position for this file"
        if known.head is None:
            return "PostgreSQL holds no mark of the change log shipped (an older desto-archiver's)"
        if not marks_the_log(known.head, known.head_token, token_at):
            return NOT_THE_SHIPPED_LOG
        if known.position + 1 < complete_from:
            return "the change log was cut short"
        return None

    def left_to_ship(self, last_seq: int) -> int | None:
        """Changes of the file's log PostgreSQL does not hold yet, counted by number (None: no
        position yet)."""
        return None if self.position is None else max(0, last_seq - self.position)

    def nothing_to_ship(self, entries: int, new_history: int) -> bool:
        """A batch that found no log entry after the position and no status-history row after
        ``history_id`` ships nothing (a history number is never given twice: rows written later
        are always above it)."""
        return not entries and not new_history

    def after_batch(
        self, last_entry: int | None, last_history: int | None, head: int, head_token: bytes | None
    ) -> ShipPosition:
        """The position once a batch landed: at its last log entry (or where it was), at its last
        status-history row (or where it was), marked with the log's last entry as of the read
        (``head``, ``head_token``)."""
        assert self.position is not None and self.history_id is not None
        return ShipPosition(
            self.file_id,
            last_entry if last_entry is not None else self.position,
            last_history if last_history is not None else self.history_id,
            head,
            head_token,
        )


def log_is_shipped(conn: sqlite3.Connection, head: int | None, head_token: bytes | None) -> bool:
    """Whether the file's change log is the one PostgreSQL's mark names: its entry ``head`` has the
    token kept. A restored or copied file numbers its entries on from where it was taken, so a
    number alone cannot tell; the token can."""
    return marks_the_log(head, head_token, partial(changelog.token_at, conn))


def _fetch_all(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _select_all(conn: sqlite3.Connection, query: str, values: Sequence[Any]) -> list[Any]:
    return list(select_in(conn, query, values))


@dataclass
class CopyReport:
    source: str
    file_id: str
    copied: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    erasures: int = 0  # the file's erasures applied to every central row of the records
    position: int | None = None
    elapsed_s: float = 0.0
    shipped_after_copy: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file_id": self.file_id,
            "copied": self.copied,
            "deleted": self.deleted,
            "erasures": self.erasures,
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
        self.tables: dict[str, Table] = {}
        self.file_id = ""
        self.position: int | None = None  # the last seq PostgreSQL confirmed
        self.use_copy = False
        self._opened: tuple[int, int] | None = None  # the file the connection reads: (device, inode)

    # ─── connections ───────────────────────────────────────────────────────────────────────

    def open_file(self) -> None:
        """Open the file at the archive's path (never creating one), and note which file it is."""
        if self.sqlite is not None:
            return
        timeout = self.settings.sqlite_busy_timeout
        uri = Path(os.path.abspath(self.db_path)).as_uri() + "?mode=rw"
        for _ in range(10):  # the path's file the same before and after: the one the connection opened
            before = _identity(self.db_path)
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
            if _identity(self.db_path) == before:
                break
            conn.close()
        self.sqlite, self._opened = conn, before

    def close_file(self) -> None:
        """Let go of the file (replaced under the shipper): the next open reads the path's file."""
        if self.sqlite is not None:
            self.sqlite.close()
            self.sqlite = None
        self.position = None  # PostgreSQL's position is known again at the next file's first batch

    def _check_file(self) -> None:
        """Raises FileReplaced when the path no longer holds the file this shipper reads. Called in
        each PostgreSQL transaction before it commits, under the source's lock, so a batch read from
        a lost file never lands after the file's replacement (and a new shipper of it) began."""
        if _identity(self.db_path) != self._opened:
            raise FileReplaced(f"{self.db_path} was replaced or removed: what was read from it is not shipped")

    def open(self) -> None:
        reopened = self.sqlite is None
        self.open_file()
        if self.pg is None:
            self.pg = connect(self.settings)
            migrate_pg(self.pg, self.schema)
            require_write(self.pg, self.schema, self.source)
            self.tables = self._tables()
            self._stage()
        elif reopened:
            self.tables = self._tables()
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
        self.close_file()

    def _tables(self) -> dict[str, Table]:
        assert self.pg is not None and self.sqlite is not None
        return describe(self.pg, self.sqlite, self.schema)

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

    def _stored_file_id(self) -> str | None:
        assert self.sqlite is not None
        row = self.sqlite.execute("SELECT value FROM archiver_state WHERE name = ?", (STATE_FILE_ID,)).fetchone()
        return None if row is None else str(row[0])

    def _file_id(self) -> str:
        """This file's identity in the central database, made on first use."""
        found = self._stored_file_id()
        return found if found is not None else self._new_file_id(None)

    def _new_file_id(self, replacing: str | None) -> str:
        """A new identity for the file, unless another shipper of it (the daemon's, a one-shot ship)
        gave it one since ``replacing`` was read: compare and set, so every shipper of the file ends
        with the one id the file holds, and none is lost."""
        assert self.sqlite is not None
        file_id = uuid.uuid4().hex
        begin_immediate(self.sqlite, self.settings.sqlite_busy_timeout)
        try:
            current = self._stored_file_id()
            if current is not None and current != replacing:
                self.sqlite.execute("COMMIT")
                return current
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

    def _read(self, query: Callable[[], list[Any]]) -> list[Any]:
        """``query``'s rows; text SQLite holds that is not UTF-8 (another writer's) is read with its
        bad bytes replaced, so it is shipped readable rather than refused forever."""
        assert self.sqlite is not None
        try:
            return query()
        except sqlite3.OperationalError as exc:
            if "decode" not in str(exc):
                raise
        self.sqlite.text_factory = lambda raw: raw.decode("utf-8", "replace")
        try:
            return query()
        finally:
            self.sqlite.text_factory = str

    def _rows_taken_back(self, records: Sequence[tuple[str, str]]) -> list[tuple[Table, list[tuple[Any, ...]]]]:
        """The file's rows of records whose erasure desto took back (it saved the record again).
        The erasure may have reached PostgreSQL first, taking every central row of the record (and
        of a session's jobs), while the file kept what it had not purged yet: its history rows,
        which are shipped by number once and never logged again. They are all shipped again; a
        session's jobs with it, but for those erased on their own."""
        assert self.sqlite is not None
        by_kind: dict[str, list[str]] = {}
        for kind, record_id in records:
            by_kind.setdefault(kind, []).append(record_id)
        sessions = by_kind.get(Kind.SESSION.value, [])
        if sessions:
            jobs = [r[0] for r in select_in(self.sqlite, "SELECT job_id FROM jobs WHERE session_id IN", sessions)]
            erased = erased_among(self.sqlite, Kind.JOB, jobs)
            by_kind.setdefault(Kind.JOB.value, []).extend(j for j in jobs if j not in erased)
        out: list[tuple[Table, list[tuple[Any, ...]]]] = []
        for kind, ids in by_kind.items():
            table = self.tables.get(KINDS[Kind(kind)].table)
            if table is not None:
                out.append((table, self._rows(table, ids)))
            for name in ("status_history", "quarantine"):
                numbered = self.tables[name]
                query = f"SELECT {numbered.selected} FROM {name} WHERE kind = '{Kind(kind).value}' AND record_id IN"
                out.append((numbered, self._read(partial(_select_all, self.sqlite, query, ids))))
        return out

    def _rows(self, table: Table, keys: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self.sqlite is not None
        return self._read(
            partial(_select_all, self.sqlite, f"SELECT {table.selected} FROM {table.name} WHERE {table.key} IN", keys)
        )

    def _put(self, cur: psycopg.Cursor[Any], table: Table, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        params = as_params(table, (self.source, self.file_id), rows)
        if not self.use_copy or len(params) < _COPY_FROM:
            cur.executemany(table.upsert, params)
            return
        with cur.copy(table.copy) as copy:
            for p in params:
                copy.write_row(p)
        cur.execute(table.upsert_staged)
        cur.execute(f"TRUNCATE {table.stage}")  # a second batch in the same transaction starts empty

    def _remove(self, cur: psycopg.Cursor[Any], table: Table, keys: list[Any]) -> int:
        if not keys:
            return 0
        central = [coerce(table.kinds[table.columns.index(table.key)], k) for k in keys]
        params: tuple[Any, ...] = (self.source, central, self.file_id) if table.numbered else (self.source, central)
        cur.execute(table.delete, params)
        return cur.rowcount

    def _lock_key(self) -> str:
        return f"desto-archiver:ship:{self.schema}:{self.source}"

    def _position_row(self, cur: psycopg.Cursor[Any]) -> ShipPosition | None:
        row = cur.execute(
            f"SELECT file_id, position, history_id, head, head_token FROM {self.schema}.ship_positions "
            "WHERE source_name = %s",
            (self.source,),
        ).fetchone()
        return None if row is None else ShipPosition(row[0], row[1], row[2], row[3], _bytes(row[4]))

    def ship_batch(self) -> int:
        """Ship the next batch of the change log; returns how many log entries it covered (0: none
        waiting). Raises NeedsCopy when the log cannot bring PostgreSQL up to date."""
        assert self.pg is not None and self.sqlite is not None
        with self.pg.transaction(), self.pg.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (self._lock_key(),))
            known = self._position_row(cur)
            self.sqlite.execute("BEGIN")
            try:
                # another shipper of the file (a one-shot ship beside the daemon) may have given it a new id
                self.file_id = self._stored_file_id() or self.file_id
                start = changelog.complete_from(self.sqlite)
                last = changelog.last_seq(self.sqlite)
                reason = ShipPosition.copy_needed(known, self.file_id, start, partial(changelog.token_at, self.sqlite))
                if reason is not None:
                    raise NeedsCopy(reason)
                assert known is not None and known.position is not None and known.history_id is not None
                position, history_id = known.position, known.history_id
                head_token = changelog.token_at(self.sqlite, last)
                entries = changelog.read(self.sqlite, position, self.batch_size)
                history = self.tables["status_history"]
                new_history = self._read(
                    partial(
                        _fetch_all,
                        self.sqlite,
                        f"SELECT {history.selected} FROM status_history WHERE id > ? ORDER BY id LIMIT ?",
                        (history_id, self.batch_size),
                    )
                )
                if known.nothing_to_ship(len(entries), len(new_history)):
                    self.sqlite.execute("COMMIT")
                    self.position = position
                    return 0
                found = {}
                changed = changelog.kinds(entries)
                erasures, taken_back = ship_erasures.read(self.sqlite, changed.pop(changelog.ERASURES, []))
                restored = self._rows_taken_back(taken_back)
                for name, keys in changed.items():
                    table = self.tables[name]
                    rows = self._rows(table, keys)
                    found[name] = (table, keys, rows)
            finally:
                if self.sqlite.in_transaction:
                    self.sqlite.execute("COMMIT")
            self._put(cur, history, new_history)
            for table, keys, rows in found.values():
                self._put(cur, table, rows)
                present = {r[0] for r in rows} if table.columns[0] == table.key else set()
                gone = [k for k in keys if k not in present]
                self._remove(cur, table, gone)
            # last: the batch may carry rows of a record erased since (its history not purged yet)
            ship_erasures.apply(cur, self.schema, self.source, self.file_id, erasures)
            ship_erasures.take_back(cur, self.schema, self.source, taken_back)
            for table, rows in restored:
                self._put(cur, table, rows)
            # the rows were read with the log up to ``last``: its entry marks the log they came from
            now = known.after_batch(
                entries[-1][0] if entries else None,
                new_history[-1][0] if new_history else None,
                last,
                head_token,
            )
            self._check_file()
            cur.execute(
                f"UPDATE {self.schema}.ship_positions SET position = %s, history_id = %s, head = %s, head_token = %s, "
                "shipped_at = now() WHERE source_name = %s AND file_id = %s",
                (now.position, now.history_id, now.head, now.head_token, self.source, self.file_id),
            )
            if cur.rowcount == 0:  # the row is there (read above): the policies hid it from this role
                raise not_allowed(str(self.pg.info.user), self.schema, self.source)
        self.position = now.position
        return max(1, len(entries) + len(new_history))

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
        return ShipPosition(self.file_id, self.position, None, None, None).left_to_ship(changelog.last_seq(self.sqlite))

    def copy_all(self, progress: Progress | None = None) -> CopyReport:
        """Copy every row of the file, then delete central rows of this file that the file no longer
        holds, and record the position the log goes on from. Holds the source's lock throughout,
        so a daemon shipping the same source waits rather than interleaving."""
        assert self.pg is not None and self.sqlite is not None
        started = time.monotonic()
        lock = self._lock_key()
        self.pg.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (lock,))
        try:
            self.file_id = self._file_id()  # as the file holds it now (another shipper may have changed it)
            report = CopyReport(self.source, self.file_id)
            with self.pg.cursor() as cur:
                known = self._position_row(cur)
            self.sqlite.execute("BEGIN")
            try:
                snapshot = changelog.last_seq(self.sqlite)
                logging = changelog.complete_from(self.sqlite) is not None
                history_id = self.sqlite.execute("SELECT coalesce(max(id), 0) FROM status_history").fetchone()[0]
                new_file = self._is_another_file(known, snapshot)
            finally:
                self.sqlite.execute("COMMIT")
            if new_file:
                # its numbers (log, status history, quarantine) would be taken for the ones shipped
                self.file_id = report.file_id = self._new_file_id(self.file_id)
                self.tables = self._tables()
            for table in self.tables.values():
                report.copied[table.name] = self._copy_table(table, progress)
            for table in self.tables.values():
                report.deleted[table.name] = self._sweep(table)
            report.erasures = self._apply_erasures(report)
            report.position = snapshot if logging else None
            # every row above was read with the log up to here at most: the mark of the log copied
            head = changelog.last_seq(self.sqlite) if logging else None
            head_token = None if head is None else changelog.token_at(self.sqlite, head)
            with self.pg.transaction(), self.pg.cursor() as cur:
                self._record_copy(cur, report.position, history_id, head, head_token)
                self._check_file()
            self.position = report.position
        finally:
            import psycopg

            with contextlib.suppress(psycopg.Error):  # a lost connection released it already
                self.pg.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (lock,))
        report.elapsed_s = time.monotonic() - started
        return report

    def _is_another_file(self, known: ShipPosition | None, snapshot: int) -> bool:
        """Whether the file, though its file_id says so, is not the one that shipped under it: its
        change log is not the one marked in PostgreSQL (a backup restored, a copy, a snapshot
        rolled back; also a file this host shipped from earlier and that comes back as a copy)."""
        assert self.sqlite is not None and self.pg is not None
        if known is not None and known.file_id == self.file_id:
            return not known.is_the_shipped_file(self.file_id, snapshot, partial(changelog.token_at, self.sqlite))
        earlier = self.pg.execute(
            f"SELECT head, head_token FROM {self.schema}.ship_files WHERE source_name = %s AND file_id = %s",
            (self.source, self.file_id),
        ).fetchone()
        if earlier is not None and earlier[0] is not None:
            return not log_is_shipped(self.sqlite, earlier[0], _bytes(earlier[1]))
        # never the source's current file: only one that never shipped keeps its id
        shipped = self.pg.execute(
            f"SELECT EXISTS (SELECT 1 FROM {self.schema}.status_history WHERE source_name = %s AND file_id = %s) "
            f"OR EXISTS (SELECT 1 FROM {self.schema}.quarantine WHERE source_name = %s AND file_id = %s)",
            (self.source, self.file_id, self.source, self.file_id),
        ).fetchone()
        return bool(shipped and shipped[0])

    def _record_copy(
        self, cur: psycopg.Cursor[Any], position: int | None, history_id: int, head: int | None,
        head_token: bytes | None,
    ) -> None:  # fmt: skip
        """The source's position after a copy; the mark of the file it replaces, if another, is kept
        in ship_files (a file that comes back is told from a copy of it by that mark)."""
        s = self.schema
        cur.execute(
            f"INSERT INTO {s}.ship_files AS f (source_name, file_id, head, head_token) "
            f"SELECT source_name, file_id, head, head_token FROM {s}.ship_positions "
            "WHERE source_name = %s AND file_id <> %s ON CONFLICT (source_name, file_id) DO UPDATE SET "
            "head = EXCLUDED.head, head_token = EXCLUDED.head_token, left_at = now()",
            (self.source, self.file_id),
        )
        cur.execute(f"DELETE FROM {s}.ship_files WHERE source_name = %s AND file_id = %s", (self.source, self.file_id))
        cur.execute(
            f"INSERT INTO {s}.ship_positions AS p (source_name, file_id, position, history_id, head, head_token, "
            "host, file, copied_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT (source_name) "
            "DO UPDATE SET file_id = EXCLUDED.file_id, host = EXCLUDED.host, file = EXCLUDED.file, "
            "copied_at = EXCLUDED.copied_at, shipped_at = now(), "
            # a daemon that shipped further meanwhile (same file) keeps its place
            "position = CASE WHEN p.file_id = EXCLUDED.file_id AND p.position > EXCLUDED.position "
            "THEN p.position ELSE EXCLUDED.position END, "
            "history_id = CASE WHEN p.file_id = EXCLUDED.file_id AND p.position > EXCLUDED.position "
            "THEN p.history_id ELSE EXCLUDED.history_id END, "
            "head = CASE WHEN p.file_id = EXCLUDED.file_id AND p.head > EXCLUDED.head "
            "THEN p.head ELSE EXCLUDED.head END, "
            "head_token = CASE WHEN p.file_id = EXCLUDED.file_id AND p.head > EXCLUDED.head "
            "THEN p.head_token ELSE EXCLUDED.head_token END",
            (self.source, self.file_id, position, history_id, head, head_token, _hostname(), str(self.db_path)),
        )

    def _copy_table(self, table: Table, progress: Progress | None) -> int:
        assert self.pg is not None and self.sqlite is not None
        total = self.sqlite.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
        quoted = table.selected
        key_at = table.columns.index(table.key)
        copied, after, sqlite = 0, None, self.sqlite
        while True:
            sql, params = f"SELECT {quoted} FROM {table.name} ORDER BY {table.key} LIMIT ?", [self.batch_size]
            if after is not None:
                sql = f"SELECT {quoted} FROM {table.name} WHERE {table.key} > ? ORDER BY {table.key} LIMIT ?"
                params.insert(0, after)
            page: Callable[[], list[Any]] = partial(_fetch_all, sqlite, sql, params)
            rows = self._read(page)
            if not rows:
                break
            with self.pg.transaction(), self.pg.cursor() as cur:
                self._put(cur, table, rows)
                self._check_file()
            copied += len(rows)
            after = rows[-1][key_at]
            if progress is not None:
                progress(table.name, copied, total)
        return copied

    def _apply_erasures(self, report: CopyReport) -> int:
        """Every erasure the file remembers, applied to every central row of its records (of any
        file_id: a rebuilt host's earlier files too); then the central notes of this file that the
        file took back. Returns how many erasures were applied."""
        assert self.pg is not None and self.sqlite is not None
        applied = 0
        for page in ship_erasures.pages(self.sqlite, self.batch_size):
            with self.pg.transaction(), self.pg.cursor() as cur:
                for name, n in ship_erasures.apply(cur, self.schema, self.source, self.file_id, page).items():
                    report.deleted[name] = report.deleted.get(name, 0) + n
                self._check_file()
            applied += len(page)
        ship_erasures.sweep(
            self.pg, self.sqlite, self.schema, self.source, self.file_id, self.batch_size, self._check_file
        )
        return applied

    def _sweep(self, table: Table) -> int:
        """Delete this file's central rows whose row the file no longer holds (deleted while no
        change log was kept)."""
        assert self.pg is not None and self.sqlite is not None
        deleted, after = 0, None
        query = f"SELECT {table.key} FROM {self.schema}.{table.name} WHERE source_name = %s AND file_id = %s"
        in_file = f"SELECT {table.key} FROM {table.name} WHERE {table.key} IN"
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
            present = {r[0] for r in self._read(partial(_select_all, self.sqlite, in_file, keys))}
            gone = [k for k in keys if k not in present]
            if gone:
                with self.pg.transaction(), self.pg.cursor() as cur:
                    deleted += self._remove(cur, table, gone)
                    self._check_file()
            after = keys[-1]


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (None: no file there)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _hostname() -> str:
    import socket

    return socket.gethostname()
