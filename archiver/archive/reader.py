"""Reading the archive for people: stats, the session list, one session in full, exports.

Always a read-only connection: these commands are safe beside a running daemon, and never
create or migrate a file.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from archiver.archive.quarantine import not_kept
from archiver.archive.schema import SCHEMA_VERSION
from archiver.archive.sql import has_erasures, read_only, select_in
from archiver.archive.store import StoreError
from archiver.kinds import KINDS
from archiver.models import decode_resp

# What each export can hold, and the column its --since/--until and --name filters apply to.
# desto's own times are its naive local ISO text; the archiver's are UTC ISO text.
EXPORTS: dict[str, tuple[str, str | None, str | None, str]] = {
    # name: (table, time column, name column, order)
    **{info.plural: (info.table, *info.listing) for info in KINDS.values()},
    "history": ("status_history", "observed_at", "record_id", "id"),
    "quarantine": ("quarantine", "first_seen_at", "key_text", "id"),
}
_UTC_TIME_COLUMNS = {"observed_at", "first_seen_at"}
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TOP = "\U0010ffff"  # the highest code point: a prefix followed by it sorts after every text it starts


class ReadError(StoreError):
    pass


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    name: str | None = None
    since: datetime | None = None  # naive: local time
    until: datetime | None = None
    limit: int | None = None


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``2026-11-01``, ``2026-11-01T10:00``, or a span back from now: ``30m``, ``24h``, ``7d``, ``2w``."""
    now = now or datetime.now()
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date/time nor a span like 7d or 24h") from None
    return when.astimezone().replace(tzinfo=None) if when.tzinfo else when


def _bound(column: str, when: datetime) -> str:
    """The filter's time in the column's own form (desto: local ISO; the archiver's: UTC ISO)."""
    if column in _UTC_TIME_COLUMNS:
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.isoformat()


class Reader:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Reader:
        try:
            found = path.exists()
        except OSError as exc:  # a folder this user may not look into
            raise ReadError(
                f"cannot read {path}: {exc.strerror}; give this user read access to it and its folder"
            ) from None
        if not found:
            raise ReadError(
                f"no archive at {path}: start 'desto-archiver run' or 'desto-archiver backfill' first, "
                "or point SQLITE_DB_PATH (--db) at the file"
            )
        try:
            conn = read_only(path, timeout=10)
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ReadError(f"cannot read {path}: {exc}; is it a SQLite file?") from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise ReadError(
                f"{path} has schema version {version}, newer than this desto-archiver's {SCHEMA_VERSION}: "
                "upgrade desto-archiver to read it"
            )
        if version == 0:
            conn.close()
            raise ReadError(f"{path} has not been opened by desto-archiver yet: run 'desto-archiver backfill' once")
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state(self) -> dict[str, str]:
        return {r["name"]: r["value"] for r in self.conn.execute("SELECT name, value FROM archiver_state")}

    # ─── stats ───────────────────────────────────────────────────────────────────────────────

    def stats(self) -> dict[str, Any]:
        kinds: dict[str, Any] = {}
        for info in KINDS.values():
            name, table, has_status = info.plural, info.table, info.has_status
            by_status = (
                dict(
                    self.conn.execute(
                        f"SELECT status, count(*) FROM {table} GROUP BY status ORDER BY status"
                    ).fetchall()
                )
                if has_status
                else {}
            )
            row = self.conn.execute(
                f"SELECT count(*), sum(gone_at IS NOT NULL), min(created_at), max(created_at) FROM {table}"
            ).fetchone()
            kinds[name] = {
                "total": row[0],
                "tombstoned": row[1] or 0,
                "by_status": by_status,
                "oldest": row[2],
                "newest": row[3],
            }
        columns = {r[1] for r in self.conn.execute("PRAGMA table_info(quarantine)")}
        truncated = "sum(truncated)" if "truncated" in columns else "0"  # schema 7 on
        quarantine = self.conn.execute(
            f"SELECT count(*), sum(resolved_at IS NULL), coalesce(sum(length(payload)), 0), {truncated} FROM quarantine"
        ).fetchone()
        state = self.state()
        erased: dict[str, dict[str, int]] = {}
        pending, last = 0, None
        if has_erasures(self.conn):
            for kind, how, n in self.conn.execute("SELECT kind, how, count(*) FROM archiver_erased GROUP BY kind, how"):
                erased.setdefault(how, {})[kind] = n
            pending = self.conn.execute("SELECT count(*) FROM archiver_erased WHERE purged_at IS NULL").fetchone()[0]
            last = self.conn.execute("SELECT max(erased_at) FROM archiver_erased").fetchone()[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "file": str(self.path),
            "file_bytes": size,
            "schema_version": self.conn.execute("PRAGMA user_version").fetchone()[0],
            "records": kinds,
            "history_events": self.conn.execute("SELECT count(*) FROM status_history").fetchone()[0],
            "quarantine": {
                "total": quarantine[0],
                "unresolved": quarantine[1] or 0,
                "payload_bytes": quarantine[2],
                "truncated": quarantine[3] or 0,
                "not_kept": not_kept(self.conn),
            },
            "erased": {"by_how": erased, "pending": pending, "last_at": last},
            "last_event_at": _us_to_iso(state.get("last_event_at")),
            "last_reconcile_at": _us_to_iso(state.get("last_reconcile_at")),
            "last_reconcile_missed_changes": last_missed_changes(state),
            "last_backfill": json.loads(state["last_backfill"]) if state.get("last_backfill") else None,
        }

    # ─── sessions ────────────────────────────────────────────────────────────────────────────

    def sessions(self, filters: Filters) -> Iterator[dict[str, Any]]:
        """The sessions, newest first, read in pages: memory stays flat however many there are."""
        where, params = self._where("sessions", filters)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit else ""
        cursor = self.conn.execute(
            "SELECT session_id, session_name, status, start_time, end_time, job_ids, gone_at, gone_reason "
            f"FROM sessions WHERE {where} ORDER BY created_at DESC, session_id{limit}",
            params,
        )
        while page := cursor.fetchmany(500):
            for r in page:
                item = dict(r)
                item["jobs"] = len([j for j in (r["job_ids"] or "").split(",") if j])
                item["duration_s"] = _seconds(r["start_time"], r["end_time"])
                del item["job_ids"]
                yield item

    def find_session(self, ident: str) -> sqlite3.Row:
        """A session by id, by unique id prefix (6+ characters), or by name (the most recent)."""
        found: sqlite3.Row | None = self.conn.execute(
            "SELECT * FROM sessions WHERE session_id = ?", (ident,)
        ).fetchone()
        if found is None and len(ident) >= 6:
            # a range of the primary key, so the index finds it: every id that starts with ident
            matches = self.conn.execute(
                "SELECT * FROM sessions WHERE session_id >= ? AND session_id < ? LIMIT 2", (ident, ident + _TOP)
            ).fetchall()
            if len(matches) == 1:
                found = matches[0]
        if found is None:
            found = self.conn.execute(
                "SELECT * FROM sessions WHERE session_name = ? ORDER BY created_at DESC LIMIT 1", (ident,)
            ).fetchone()
        if found is None:
            raise ReadError(
                f"no archived session has the id or name {ident!r}: list them with 'desto-archiver history'"
            )
        return found

    def erased(self, ident: str) -> list[dict[str, Any]]:
        """What the archive remembers of an erased record with this id (of any kind)."""
        from archiver.archive.erase import describe

        if not has_erasures(self.conn):
            return []
        query = "SELECT kind, record_id, erased_at, how, purged_at FROM archiver_erased WHERE record_id "
        rows = self.conn.execute(query + "= ?", (ident,)).fetchall()
        if not rows and len(ident) >= 6:  # a unique id prefix, as for the records themselves
            rows = self.conn.execute(query + ">= ? AND record_id < ?", (ident, ident + _TOP)).fetchall()
            if len({r["record_id"] for r in rows}) != 1:
                rows = []
        return [{**dict(r), "by": describe(r["kind"], r["how"])} for r in rows]

    def show(self, ident: str) -> dict[str, Any]:
        try:
            session = self.find_session(ident)
        except ReadError:
            erased = self.erased(ident)
            if erased:
                return {"erased": erased}
            raise
        sid = session["session_id"]
        ordered = [j for j in (session["job_ids"] or "").split(",") if j]
        jobs = {r["job_id"]: r for r in self.conn.execute("SELECT * FROM jobs WHERE session_id = ?", (sid,))}
        job_list = [jobs.pop(j) for j in ordered if j in jobs] + sorted(jobs.values(), key=lambda r: r["created_at"])
        # by kind and id, what the history's index is keyed by (without the kind SQLite reads it
        # all); a long chain's jobs in pages, within SQLite's limit on a statement's parameters
        history = [
            *self.conn.execute("SELECT * FROM status_history WHERE kind = 'session' AND record_id = ?", (sid,)),
            *select_in(
                self.conn,
                "SELECT * FROM status_history WHERE kind = 'job' AND record_id IN",
                [j["job_id"] for j in job_list],
            ),
        ]
        history.sort(key=lambda h: h["id"])
        return {
            "session": {**_plain(session), "duration_s": _seconds(session["start_time"], session["end_time"])},
            "jobs": [{**_plain(j), "duration_s": _seconds(j["start_time"], j["end_time"])} for j in job_list],
            "history": _with_durations([_plain(h) for h in history]),
        }

    # ─── exports ─────────────────────────────────────────────────────────────────────────────

    def export(self, what: str, filters: Filters) -> tuple[list[str], Iterator[dict[str, Any]]]:
        """Columns and a stream of rows (one query, fetched in pages: memory stays flat)."""
        table, _, _, order = EXPORTS[what]
        where, params = self._where(what, filters)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit else ""
        cursor = self.conn.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}{limit}", params)
        columns = [d[0] for d in cursor.description]
        if what == "quarantine":
            columns = [c for c in columns if c != "key"]

        def rows() -> Iterator[dict[str, Any]]:
            while batch := cursor.fetchmany(500):
                for r in batch:
                    item = dict(r)
                    if what == "quarantine":
                        del item["key"]
                        item["payload"] = payload_json(item["payload"], bool(item.get("truncated")))
                    yield item

        return columns, rows()

    def _where(self, what: str, filters: Filters) -> tuple[str, list[Any]]:
        _, time_col, name_col, _ = EXPORTS[what]
        clauses, params = ["1"], []
        if filters.status is not None:
            status_col = {"history": "status", "quarantine": "kind"}.get(what, "status")
            clauses.append(f"{status_col} = ?")
            params.append(filters.status)
        if filters.name is not None and name_col is not None:
            clauses.append(f"instr(lower({name_col}), lower(?)) > 0")
            params.append(filters.name)
        if time_col is not None:
            if filters.since is not None:
                clauses.append(f"{time_col} >= ?")
                params.append(_bound(time_col, filters.since))
            if filters.until is not None:
                clauses.append(f"{time_col} < ?")
                params.append(_bound(time_col, filters.until))
        return " AND ".join(clauses), params


def payload_json(payload: bytes, truncated: bool = False) -> Any:
    """A quarantined value for JSON: text where it is UTF-8, ``{"base64": ...}`` where it is not.
    A truncated one (above the per-record cap) is only the value's first bytes, RESP-encoded and
    cut anywhere: ``{"first_bytes": ...}``, those bytes as they are."""
    import base64

    def convert(value: Any) -> Any:
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(value).decode("ascii")}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    if not truncated:
        with contextlib.suppress(ValueError):
            return convert(decode_resp(payload))
    return {"first_bytes": convert(payload)}


def _plain(row: sqlite3.Row) -> dict[str, Any]:
    return {k: v for k, v in dict(row).items() if k != "read_at_us"}


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)
    except (ValueError, TypeError):
        return None


def _with_durations(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event's time until the record's next event (by the archiver's clock)."""
    last_index: dict[str, int] = {}
    for i, event in enumerate(history):
        event["duration_s"] = None
        previous = last_index.get(event["record_id"])
        if previous is not None:
            history[previous]["duration_s"] = _seconds(
                history[previous]["observed_at"].rstrip("Z"), event["observed_at"].rstrip("Z")
            )
        last_index[event["record_id"]] = i
    return history


def _us_to_iso(value: str | None) -> str | None:
    if not value:
        return None
    try:
        from archiver.models import iso_utc

        return iso_utc(int(value))
    except ValueError:
        return value


def last_missed_changes(state: dict[str, str]) -> dict[str, int] | None:
    """The changes the last reconcile found that no notification had named, by kind (missed.py);
    None when it did not measure them (the first after a start, say) or no reconcile ran yet."""
    try:
        last = json.loads(state.get("last_reconcile") or "null")
    except ValueError:
        return None
    found = last.get("missed_changes") if isinstance(last, dict) else None
    return {str(k): int(v) for k, v in found.items()} if isinstance(found, dict) else None
