"""Writing the live rows of one kind inside a batch's transaction: the version guard, favorites'
unique names, and the status history.

Each record table carries one column of the archiver's own beside desto's: ``observed_status``
(the status the archiver last read from Redis; desto's own store never sets it, so a stale write
by desto is not mistaken for a transition) or, for favorites, ``real_name``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from archiver.archive.sql import erased_rows, select_in
from archiver.kinds import KINDS, TABLES, Kind
from archiver.models import COLUMNS, Row, TimedHint, iso_utc, sqlite_utc

# Statuses desto's messages may report for a record (only kinds with a channel have messages).
_STATUSES: dict[Kind, frozenset[str]] = {
    kind: info.statuses for kind, info in KINDS.items() if info.channel and info.statuses
}
HISTORY_INSERT = (
    "INSERT INTO status_history (kind, record_id, event, status, previous_status, detail, observed_at, "
    "desto_timestamp, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A command that writes records back into Redis (``restore favorites``) notes each one here first,
# so whichever writer reads it back (the command's own, or a daemon's) says how it came back.
RESTORE_NOTE_PREFIX = "restoring:"
RESTORE_NOTE_S = 600  # a note older than this (a restore that died half-way) says nothing
_TRACKING = ("created_at", "updated_at", "read_at_us", "first_seen_at", "last_seen_at", "expires_at", "extra")


_first, _second, _last = itemgetter(0), itemgetter(1), itemgetter(-1)


def restore_note(kind: Kind, record_id: str) -> str:
    """The name in ``archiver_state`` of the note a restore leaves for ``record_id``."""
    return f"{RESTORE_NOTE_PREFIX}{kind.value}:{record_id}"


def tail_column(kind: Kind) -> str:
    return "real_name" if KINDS[kind].renamed else "observed_status"


def insert_columns(kind: Kind) -> tuple[str, ...]:
    """The columns a new row of ``kind`` is written with: desto's, then the archiver's own."""
    return (*COLUMNS[kind], *_TRACKING, tail_column(kind))


@dataclass(slots=True)
class _Old:
    values: tuple[Any, ...]
    extra: str | None
    read_at_us: int | None
    gone_at: str | None
    tail: str | None  # observed_status, or a favorite's real name


class RowWriter:
    def __init__(
        self,
        conn: sqlite3.Connection,
        kind: Kind,
        hints: Mapping[tuple[Kind, str], Sequence[TimedHint]],
        counts: Any,
    ) -> None:
        self.conn, self.kind, self.hints, self.counts = conn, kind, hints, counts
        self.kind_name = kind.value  # an Enum's .value is a descriptor call: read it once
        self._history: list[tuple[Any, ...]] = []
        self.table = TABLES[kind]
        self.cols = COLUMNS[kind]
        self.id_col = self.cols[0]
        self.favorite = KINDS[kind].renamed
        # the tail column's value: a favorite's name, else the status (every other kind has one)
        self.tail_idx = 1 if self.favorite else self.cols.index("status")
        tail = tail_column(kind)
        self.select = (
            f"SELECT {', '.join(self.cols)}, extra, read_at_us, gone_at, {tail} FROM {self.table} "
            f"WHERE {self.id_col} IN "
        )
        insert_cols = insert_columns(kind)
        self.insert = (
            f"INSERT INTO {self.table} ({', '.join(insert_cols)}) VALUES ({', '.join('?' * len(insert_cols))})"
        )
        set_cols = [*self.cols[1:], "updated_at", "read_at_us", "last_seen_at", "expires_at", "extra", tail]
        self.update = (
            f"UPDATE {self.table} SET {', '.join(c + ' = ?' for c in set_cols)}, gone_at = NULL, "
            f"gone_reason = NULL WHERE {self.id_col} = ?"
        )
        # An unchanged read also sets the tail: the values may be another program's (desto's store
        # saving the change first), and the next status is a change from this one, not from the last read.
        self.touch = (
            f"UPDATE {self.table} SET read_at_us = ?, last_seen_at = ?, expires_at = ?, {tail} = ? "
            f"WHERE {self.id_col} = ?"
        )

    def _existing(self, ids: list[str]) -> dict[str, _Old]:
        found: dict[str, _Old] = {}
        n = len(self.cols)
        for r in select_in(self.conn, self.select, ids):
            found[r[0]] = _Old(tuple(r[:n]), r[n], r[n + 1], r[n + 2], r[n + 3])
        return found

    def write(self, rows: list[Row]) -> None:
        """Apply ``rows`` (one kind, read in one batch). Statements of a kind go in one
        executemany each; favorites, whose unique names depend on the order, go one by one."""
        unique: dict[str, Row] = {}
        for row in rows:  # one row per record: the newest read
            seen_row = unique.get(row.record_id)
            if seen_row is None or seen_row.version_us <= row.version_us:
                unique[row.record_id] = row
        existing = self._existing(list(unique))
        if len(existing) < len(unique):  # only a record new to the file can be an erased one
            erased = erased_rows(self.conn, self.kind, [(i, r.values) for i, r in unique.items() if i not in existing])
            for record_id in erased:
                del unique[record_id]
            self.counts.erased += len(erased)
        inserts: list[list[Any]] = []
        updates: list[list[Any]] = []
        touches: list[tuple[Any, ...]] = []
        favorite, tail_idx = self.favorite, self.tail_idx
        changed, kind_enum = self.counts.changed, self.kind
        written = stale = 0
        last_read, seen, updated_at = -1, "", ""  # a batch's rows share their read time
        for row in unique.values():
            record_id, values, read_at, version = row.record_id, row.values, row.read_at_us, row.version_us
            old = existing.get(record_id)
            if read_at != last_read:
                last_read, seen, updated_at = read_at, iso_utc(read_at), sqlite_utc(read_at)
            expires = iso_utc(row.expires_at_us) if row.expires_at_us is not None else None
            tail = values[tail_idx]
            if old is None:
                created = sqlite_utc(row.created_at_us)
                params = [*values, created, updated_at, version, seen, seen, expires, row.extra, tail]
                if favorite:
                    self._free_name(values[1], record_id)
                    self.conn.execute(self.insert, params)
                else:
                    inserts.append(params)
                written += 1
                changed.append((kind_enum, record_id))
            elif old.read_at_us is not None and version < old.read_at_us:
                stale += 1
                continue
            elif old.values != values or old.extra != row.extra or old.gone_at is not None:
                params = [*values[1:], updated_at, version, seen, expires, row.extra, tail, record_id]
                if favorite:
                    if old.values[1] != values[1]:
                        self._free_name(values[1], record_id)
                    self.conn.execute(self.update, params)
                else:
                    updates.append(params)
                written += 1
                changed.append((kind_enum, record_id))
            else:
                touches.append((version, seen, expires, tail, record_id))
            self._record_history(row, old, seen)
        counts, kind = self.counts, self.kind_name
        counts.records[kind] += len(unique)
        if written:
            counts.written[kind] += written
        counts.stale += stale
        counts.unchanged += len(touches)
        # In key order, the B-tree pages of the (random) ids are met one after another.
        if inserts:
            self.conn.executemany(self.insert, sorted(inserts, key=_first))
        if updates:
            self.conn.executemany(self.update, sorted(updates, key=_last))
        if touches:
            self.conn.executemany(self.touch, sorted(touches, key=_last))
        self._flush_history()

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

    def _record_history(self, row: Row, old: _Old | None, observed: str) -> None:
        """``observed``: the row's read time, as iso_utc gives it."""
        # A row desto's own store inserted has never been read by the archiver: first sight.
        is_new = old is None or old.read_at_us is None
        reappeared = old is not None and old.gone_at is not None
        if self.favorite:
            if is_new:
                self._add(row.record_id, "first_seen", None, None, None, observed, None, "redis")
            elif reappeared:
                self._add(row.record_id, "reappeared", None, None, self._how_back(row), observed, None, "redis")
            old_name = None if old is None or is_new else (old.tail or old.values[1])
            if old_name is not None and old_name != row.values[1]:
                detail = json.dumps({"from": old_name, "to": row.values[1]}, ensure_ascii=False)
                self._add(row.record_id, "renamed", None, None, detail, observed, None, "redis")
            return
        status = row.status
        assert status is not None
        previous = None if old is None or is_new else old.tail
        if reappeared:
            self._add(row.record_id, "reappeared", status, previous, self._how_back(row), observed, None, "redis")
            previous = status
        current, read_ts = previous, None
        for hint in self.hints.get((self.kind, row.record_id), ()):
            if hint.status == current:
                self._attach_timestamp(row.record_id, hint.status, hint.timestamp)
            elif hint.status == status:
                read_ts = read_ts or hint.timestamp
            elif hint.status in _STATUSES.get(self.kind, ()):
                event = "first_seen" if is_new and current is None else "status"
                hint_seen = iso_utc(hint.received_us)
                self._add(row.record_id, event, hint.status, current, None, hint_seen, hint.timestamp, "pubsub")
                current = hint.status
        if status != current:
            event = "first_seen" if is_new and current is None else "status"
            self._add(row.record_id, event, status, current, None, observed, read_ts, "redis")
        elif read_ts is not None:
            self._attach_timestamp(row.record_id, status, read_ts)

    def _how_back(self, row: Row) -> str | None:
        """How a record that had left Redis came back, when a restore noted that it writes it
        back (its note, read at or after the restore began); None: written again by someone
        else (desto, a person), which the archive cannot tell apart."""
        found = self.conn.execute(
            "SELECT value FROM archiver_state WHERE name = ?", (restore_note(self.kind, row.record_id),)
        ).fetchone()
        if found is None:
            return None
        try:
            note = json.loads(found[0])
            since = int(note["since_us"])
        except (ValueError, TypeError, KeyError):
            return None
        if not since <= row.version_us <= since + RESTORE_NOTE_S * 1_000_000:
            return None
        return json.dumps({"how": "restored", "by": note.get("by")}, ensure_ascii=False)

    def _add(self, record_id: str, event: str, status: str | None, previous: str | None, detail: str | None,
             observed: str, desto_ts: str | None, source: str) -> None:  # fmt: skip
        self._history.append((self.kind_name, record_id, event, status, previous, detail, observed, desto_ts, source))
        self.counts.history += 1

    def _flush_history(self) -> None:
        if self._history:
            self.conn.executemany(HISTORY_INSERT, sorted(self._history, key=_second))
            self._history.clear()

    def _attach_timestamp(self, record_id: str, status: str, timestamp: str | None) -> None:
        """desto's message for a change the archiver already recorded: keep desto's own time."""
        if timestamp is None:
            return
        self._flush_history()  # the row to complete may be one this batch added
        self.conn.execute(
            "UPDATE status_history SET desto_timestamp = ? WHERE id = (SELECT max(id) FROM status_history "
            "WHERE kind = ? AND record_id = ?) AND status = ? AND desto_timestamp IS NULL",
            (timestamp, self.kind_name, record_id, status),
        )


def add_history(
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
        HISTORY_INSERT, (kind.value, record_id, event, status, previous, detail, observed_at, desto_timestamp, source)
    )
