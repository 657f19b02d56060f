"""Everything that talks to SQLite: open and migrate the file, apply a batch in one transaction.

One writer connection in autocommit mode; every write is an explicit ``BEGIN IMMEDIATE``
transaction (a deferred one that upgrades to a write gets SQLITE_BUSY at once, whatever the
busy timeout says). Foreign keys stay off on this connection: a job is often read before its
session, and desto's readers do not need them enforced.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sqlite3
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archiver.keys import Kind
from archiver.models import (
    COLUMNS,
    JOB_STATUSES,
    SESSION_STATUSES,
    Gone,
    Outcome,
    Rejected,
    Row,
    encode_resp,
    iso_utc,
    sqlite_utc,
)
from archiver.schema import NewerSchemaError, migrate

TABLES: dict[Kind, str] = {
    Kind.SESSION: "sessions",
    Kind.JOB: "jobs",
    Kind.FAVORITE: "favorites",
    Kind.ATJOB: "at_jobs",
}
GONE_EVENTS = {b"del": "deleted", b"expired": "expired", b"evicted": "evicted"}
# Statuses desto's messages may report for a record (at-jobs have no channel).
_STATUSES: dict[Kind, frozenset[str]] = {Kind.SESSION: SESSION_STATUSES, Kind.JOB: JOB_STATUSES}


class StoreError(Exception):
    """The file cannot be used; the message says what to do."""


class AlreadyRunning(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class TimedHint:
    """One of desto's pub/sub status messages, with when the archiver received it."""

    status: str
    timestamp: str | None
    received_us: int


@dataclass
class Batch:
    outcomes: Sequence[Outcome]
    gone_events: Mapping[bytes, bytes] = field(default_factory=dict)  # key -> del/expired/evicted
    hints: Mapping[tuple[Kind, str], Sequence[TimedHint]] = field(default_factory=dict)
    state: Mapping[str, str] = field(default_factory=dict)


@dataclass
class BatchResult:
    written: Counter[str] = field(default_factory=Counter)  # rows inserted or changed, by kind
    unchanged: int = 0
    stale: int = 0  # a newer read had already landed
    tombstoned: int = 0
    quarantined: list[Rejected] = field(default_factory=list)  # newly quarantined
    quarantine_repeats: int = 0
    history: int = 0

    def merge(self, other: BatchResult) -> None:
        self.written.update(other.written)
        self.unchanged += other.unchanged
        self.stale += other.stale
        self.tombstoned += other.tombstoned
        self.quarantined.extend(other.quarantined)
        self.quarantine_repeats += other.quarantine_repeats
        self.history += other.history


class DaemonLock:
    """One daemon per file: an flock on ``<file>.archiver-lock``, released by the kernel on exit."""

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".archiver-lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.path}: {exc.strerror}; the archive's folder must be writable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another desto-archiver is already running on {self.path.with_suffix('')} ({holder}); "
                "stop it first, or point this one at another file with SQLITE_DB_PATH"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path, schema_found: int) -> None:
        self.conn = conn
        self.path = path
        self.schema_found = schema_found
        self._unresolved: set[bytes] = {
            bytes(row[0]) for row in conn.execute("SELECT DISTINCT key FROM quarantine WHERE resolved_at IS NULL")
        }

    @classmethod
    def open(cls, path: Path, busy_timeout: float = 5.0) -> Store:
        """Open (creating or migrating) the archive; StoreError with a clear message when it cannot."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder {path.parent}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}; check the path and its permissions") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            found, _ = migrate(conn)
        except NewerSchemaError as exc:
            conn.close()
            raise StoreError(f"{path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"cannot use {path}: {exc}; is it a SQLite file, and writable?") from None
        return cls(conn, path, found)

    def close(self) -> None:
        with suppress(sqlite3.Error):
            self.conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise

    # ─── the archiver's own state ──────────────────────────────────────────────────────────

    def set_state(self, values: Mapping[str, str], now_us: int) -> None:
        with self._transaction() as conn:
            self._put_state(conn, values, now_us)

    @staticmethod
    def _put_state(conn: sqlite3.Connection, values: Mapping[str, str], now_us: int) -> None:
        conn.executemany(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(name, value, iso_utc(now_us)) for name, value in values.items()],
        )

    def get_state(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT name, value FROM archiver_state").fetchall())

    # ─── reconciliation support ────────────────────────────────────────────────────────────

    def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
        """Live rows (no tombstone) whose last read is older than ``since_us``, by rowid."""
        table = TABLES[kind]
        rows = self.conn.execute(
            f"SELECT rowid, {COLUMNS[kind][0]} FROM {table} WHERE gone_at IS NULL "
            "AND (read_at_us IS NULL OR read_at_us < ?) AND rowid > ? ORDER BY rowid LIMIT ?",
            (since_us, after_rowid, limit),
        ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    # ─── one batch, one transaction ────────────────────────────────────────────────────────

    def apply(self, batch: Batch) -> BatchResult:
        """Apply a batch in one transaction. A record the file itself refuses (a constraint or
        trigger someone added, say) is quarantined alone and never blocks the rest; errors of
        the file as a whole (locked, full, read-only) propagate, for the caller to retry."""
        try:
            return self._apply(batch)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError:
            if len(batch.outcomes) <= 1:
                raise
        result = BatchResult()
        for outcome in batch.outcomes:
            single = Batch([outcome], batch.gone_events, batch.hints, batch.state)
            try:
                result.merge(self._apply(single))
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                if not isinstance(outcome, Row):
                    raise
                result.merge(self._apply(Batch([_refused(outcome, exc)])))
        return result

    def _apply(self, batch: Batch) -> BatchResult:
        result = BatchResult()
        resolved: set[bytes] = set()
        rows: dict[Kind, list[Row]] = {}
        for outcome in batch.outcomes:
            if isinstance(outcome, Row):
                rows.setdefault(outcome.kind, []).append(outcome)
        with self._transaction() as conn:
            for kind, kind_rows in rows.items():
                _RowWriter(conn, kind, batch.hints, result).write(kind_rows)
                resolved.update(r.key for r in kind_rows if r.key in self._unresolved)
            for outcome in batch.outcomes:
                if isinstance(outcome, Gone):
                    if outcome.kind is not None:
                        self._tombstone(conn, outcome, batch.gone_events.get(outcome.key), result)
                    if outcome.key in self._unresolved:
                        resolved.add(outcome.key)
                elif isinstance(outcome, Rejected):
                    self._quarantine(conn, outcome, result)
            if resolved:
                now = iso_utc(max(o.read_at_us for o in batch.outcomes))
                conn.executemany(
                    "UPDATE quarantine SET resolved_at = ? WHERE key = ? AND resolved_at IS NULL",
                    [(now, key) for key in resolved],
                )
            if batch.state:
                self._put_state(conn, batch.state, max((o.read_at_us for o in batch.outcomes), default=0))
        self._unresolved.difference_update(resolved)
        self._unresolved.update(r.key for r in result.quarantined)
        return result

    def _tombstone(self, conn: sqlite3.Connection, gone: Gone, event: bytes | None, result: BatchResult) -> None:
        assert gone.kind is not None
        table, id_col = TABLES[gone.kind], COLUMNS[gone.kind][0]
        status_col = "status" if "status" in COLUMNS[gone.kind] else "NULL"
        found = conn.execute(
            f"SELECT read_at_us, gone_at, expires_at, {status_col} FROM {table} WHERE {id_col} = ?",
            (gone.record_id,),
        ).fetchone()
        if found is None or found[1] is not None:
            return  # never archived (nothing to keep), or already tombstoned
        read_at_us, _, expires_at, status = found
        if read_at_us is not None and gone.read_at_us < read_at_us:
            result.stale += 1
            return
        seen_at = iso_utc(gone.read_at_us)
        reason = GONE_EVENTS.get(event or b"")
        gone_at = seen_at
        if reason is None:
            if expires_at is not None and expires_at <= seen_at:
                reason, gone_at = "expired", expires_at  # the TTL we read says exactly when
            else:
                reason = "missing"
        elif reason == "expired" and expires_at is not None and expires_at <= seen_at:
            gone_at = expires_at
        conn.execute(
            f"UPDATE {table} SET gone_at = ?, gone_reason = ?, read_at_us = ? WHERE {id_col} = ?",
            (gone_at, reason, gone.read_at_us, gone.record_id),
        )
        _history(conn, gone.kind, gone.record_id, reason, status, status, None, gone_at, None, "redis")
        result.tombstoned += 1
        result.history += 1

    def _quarantine(self, conn: sqlite3.Connection, rejected: Rejected, result: BatchResult) -> None:
        seen_at = iso_utc(rejected.read_at_us)
        times_seen = conn.execute(
            "INSERT INTO quarantine (key, key_text, kind, record_id, redis_type, payload, payload_sha256, "
            "reason, first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(key, payload_sha256, reason) DO UPDATE SET last_seen_at = excluded.last_seen_at, "
            "times_seen = times_seen + 1, resolved_at = NULL RETURNING times_seen",
            (
                rejected.key,
                rejected.key.decode("utf-8", "backslashreplace"),
                rejected.kind.value if rejected.kind else None,
                rejected.record_id,
                rejected.redis_type,
                rejected.payload,
                hashlib.sha256(rejected.payload).hexdigest(),
                rejected.reason,
                seen_at,
                seen_at,
            ),
        ).fetchone()[0]
        if times_seen == 1:
            result.quarantined.append(rejected)
        else:
            result.quarantine_repeats += 1


def _refused(row: Row, exc: Exception) -> Rejected:
    fields = [part for pair in zip(COLUMNS[row.kind], row.values, strict=True) for part in pair]
    return Rejected(
        key=row.key,
        kind=row.kind,
        record_id=row.record_id,
        redis_type="hash",
        payload=encode_resp([str(v) if v is not None else None for v in fields]),
        reason=f"the archive refused the normalized row: {exc}",
        read_at_us=row.read_at_us,
    )


def _history(
    conn: sqlite3.Connection,
    kind: Kind,
    record_id: str,
    event: str,
    status: str | None,
    previous: str | None,
    detail: str | None,
    observed_at: str,
    desto_timestamp: str | None,
    source: str,
) -> None:
    conn.execute(
        "INSERT INTO status_history (kind, record_id, event, status, previous_status, detail, observed_at, "
        "desto_timestamp, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (kind.value, record_id, event, status, previous, detail, observed_at, desto_timestamp, source),
    )


class _RowWriter:
    """Writes the live rows of one kind in a batch: version guard, favorites' names, history."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        kind: Kind,
        hints: Mapping[tuple[Kind, str], Sequence[TimedHint]],
        result: BatchResult,
    ) -> None:
        self.conn, self.kind, self.hints, self.result = conn, kind, hints, result
        self.table = TABLES[kind]
        self.cols = COLUMNS[kind]
        self.id_col = self.cols[0]
        self.favorite = kind is Kind.FAVORITE
        self.status_idx = self.cols.index("status") if "status" in self.cols else None
        extra_cols = ", real_name" if self.favorite else ""
        self.select = (
            f"SELECT {', '.join(self.cols)}, extra, read_at_us, gone_at{extra_cols} FROM {self.table} "
            f"WHERE {self.id_col} IN "
        )
        tracking = ["created_at", "updated_at", "read_at_us", "first_seen_at", "last_seen_at", "expires_at", "extra"]
        if self.favorite:
            tracking.append("real_name")
        all_cols = [*self.cols, *tracking]
        self.insert = f"INSERT INTO {self.table} ({', '.join(all_cols)}) VALUES ({', '.join('?' * len(all_cols))})"
        set_cols = [*self.cols[1:], "updated_at", "read_at_us", "last_seen_at", "expires_at", "extra"]
        if self.favorite:
            set_cols.append("real_name")
        self.update = (
            f"UPDATE {self.table} SET {', '.join(c + ' = ?' for c in set_cols)}, gone_at = NULL, "
            f"gone_reason = NULL WHERE {self.id_col} = ?"
        )
        self.touch = f"UPDATE {self.table} SET read_at_us = ?, last_seen_at = ?, expires_at = ? WHERE {self.id_col} = ?"

    def _existing(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = self.select + f"({', '.join('?' * len(chunk))})"
            for row in self.conn.execute(query, chunk):
                found[row[0]] = tuple(row)
        return found

    def write(self, rows: list[Row]) -> None:
        existing = self._existing(list({r.record_id for r in rows}))
        n = len(self.cols)
        for row in rows:
            old = existing.get(row.record_id)
            seen = iso_utc(row.read_at_us)
            expires = iso_utc(row.expires_at_us) if row.expires_at_us is not None else None
            if old is None:
                if self.favorite:
                    self._free_name(row.values[1], row.record_id)
                params = [*row.values, sqlite_utc(row.created_at_us), sqlite_utc(row.read_at_us), row.read_at_us]
                params += [seen, seen, expires, row.extra]
                if self.favorite:
                    params.append(row.values[1])
                self.conn.execute(self.insert, params)
                self.result.written[self.kind.value] += 1
                self._record_history(row, None, None, is_new=True)
            else:
                old_values, old_extra, old_read_at, old_gone = old[:n], old[n], old[n + 1], old[n + 2]
                if old_read_at is not None and row.read_at_us < old_read_at:
                    self.result.stale += 1
                    continue
                if old_values != row.values or old_extra != row.extra or old_gone is not None:
                    if self.favorite and old_values[1] != row.values[1]:
                        self._free_name(row.values[1], row.record_id)
                    params = [*row.values[1:], sqlite_utc(row.read_at_us), row.read_at_us, seen, expires, row.extra]
                    if self.favorite:
                        params.append(row.values[1])
                    self.conn.execute(self.update, [*params, row.record_id])
                    self.result.written[self.kind.value] += 1
                else:
                    self.conn.execute(self.touch, (row.read_at_us, seen, expires, row.record_id))
                    self.result.unchanged += 1
                self._record_history(row, old, old_gone, is_new=False)
            existing[row.record_id] = (*row.values, row.extra, row.read_at_us, None, row.name)

    def _free_name(self, name: str, owner: str) -> None:
        """desto's favorites.name is UNIQUE: a stale holder of ``name`` (deleted, or renamed in a
        read not yet applied) gets a disambiguated name; its real name stays in ``real_name``."""
        holder = self.conn.execute(
            "SELECT favorite_id FROM favorites WHERE name = ? AND favorite_id != ?", (name, owner)
        ).fetchone()
        if holder is None:
            return
        candidate, n = f"{name} [{holder[0]}]", 1
        while self.conn.execute("SELECT 1 FROM favorites WHERE name = ?", (candidate,)).fetchone():
            n += 1
            candidate = f"{name} [{holder[0]}] ({n})"
        self.conn.execute(
            "UPDATE favorites SET name = ?, real_name = coalesce(real_name, ?) WHERE favorite_id = ?",
            (candidate, name, holder[0]),
        )

    def _record_history(self, row: Row, old: tuple[Any, ...] | None, old_gone: str | None, is_new: bool) -> None:
        observed = iso_utc(row.read_at_us)
        n = len(self.cols)
        if self.favorite:
            old_name = None if old is None else (old[n + 3] or old[1])
            if is_new:
                self._add(row.record_id, "first_seen", None, None, None, observed, None, "redis")
            elif old_gone is not None:
                self._add(row.record_id, "reappeared", None, None, None, observed, None, "redis")
            if old_name is not None and old_name != row.values[1]:
                detail = json.dumps({"from": old_name, "to": row.values[1]}, ensure_ascii=False)
                self._add(row.record_id, "renamed", None, None, detail, observed, None, "redis")
            return
        assert self.status_idx is not None
        previous = None if old is None else old[self.status_idx]
        status = row.values[self.status_idx]
        if old_gone is not None:
            self._add(row.record_id, "reappeared", status, previous, None, observed, None, "redis")
            previous = status
        current, read_ts = previous, None
        for hint in self.hints.get((self.kind, row.record_id), ()):
            if hint.status == current:
                self._attach_timestamp(row.record_id, hint.status, hint.timestamp)
                continue
            if hint.status == status:
                read_ts = read_ts or hint.timestamp
                continue
            if hint.status not in _STATUSES.get(self.kind, ()):
                continue
            event = "first_seen" if is_new and current is None else "status"
            hint_seen = iso_utc(hint.received_us)
            self._add(row.record_id, event, hint.status, current, None, hint_seen, hint.timestamp, "pubsub")
            current = hint.status
        if status != current:
            event = "first_seen" if is_new and current is None else "status"
            self._add(row.record_id, event, status, current, None, observed, read_ts, "redis")
        elif read_ts is not None:
            self._attach_timestamp(row.record_id, status, read_ts)

    def _add(self, record_id: str, event: str, status: str | None, previous: str | None, detail: str | None,
             observed: str, desto_ts: str | None, source: str) -> None:  # fmt: skip
        _history(self.conn, self.kind, record_id, event, status, previous, detail, observed, desto_ts, source)
        self.result.history += 1

    def _attach_timestamp(self, record_id: str, status: str, timestamp: str | None) -> None:
        """desto's message for a change the archiver already recorded: keep desto's own time."""
        if timestamp is None:
            return
        self.conn.execute(
            "UPDATE status_history SET desto_timestamp = ? WHERE id = (SELECT max(id) FROM status_history "
            "WHERE kind = ? AND record_id = ?) AND status = ? AND desto_timestamp IS NULL",
            (timestamp, self.kind.value, record_id, status),
        )
