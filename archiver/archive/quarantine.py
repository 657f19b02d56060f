"""The quarantine: what desto could not read, one row per Redis key, within two bounds.

A rejected key has one row, changed in place as the key changes (first and last seen, the reads
and the changes counted), so a record changed a thousand times is kept once. A value longer than
the per-record cap (``ARCHIVER_QUARANTINE_MAX_RECORD_BYTES``) is kept as its SHA-256, its length
and its first bytes, and marked ``truncated``. Once the rows hold the total cap
(``ARCHIVER_QUARANTINE_MAX_BYTES``: keys and kept values), a rejected key not in the quarantine yet
is counted, not stored; the keys already there are still updated. The file notes how many were
not kept and when (``archiver_state['quarantine_not_kept']``), for ``stats`` and ``check``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from archiver.config import DEFAULT_QUARANTINE_BYTES, DEFAULT_QUARANTINE_RECORD_BYTES, Settings
from archiver.models import Rejected, iso_utc

PREFIX_BYTES = 4096  # what a truncated row keeps of its value (at most the per-record cap)
STATE_NOT_KEPT = "quarantine_not_kept"
# Keys counted as not kept, remembered by this process so a key read again (changed, or by each
# reconcile) is counted once; beyond this many, each read of another key counts.
_REMEMBERED = 100_000


class Put(Enum):
    """What became of one rejected read."""

    NEW = "new"  # a row for a key not in the quarantine, or one whose row was resolved
    REPEAT = "repeat"  # the key's row, still unresolved, seen again (its value changed, or not)
    STALE = "stale"  # a newer read of the key is kept already
    NOT_KEPT = "not kept"  # a key not in the quarantine, and the quarantine is full


@dataclass(frozen=True)
class Limits:
    record_bytes: int = DEFAULT_QUARANTINE_RECORD_BYTES
    total_bytes: int = DEFAULT_QUARANTINE_BYTES

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.quarantine_max_record_bytes, settings.quarantine_max_bytes)

    @property
    def prefix_bytes(self) -> int:
        return min(PREFIX_BYTES, self.record_bytes)


@dataclass
class Pending:
    """One transaction's quarantine writes, until it commits."""

    used: int | None = None  # bytes the rows hold (keys and kept values), read once when needed
    stored_new: bool = False  # a key not in the quarantine was stored: there was room
    refused: int = 0  # reads of keys not kept
    counted: set[bytes] = field(default_factory=set)  # ... of keys not counted before (digests)


def not_kept(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """What the file notes of rejected records not kept (None: the total cap never bit):
    ``count``, ``first_at``, ``last_at``, ``max_bytes`` (the cap then) and ``full`` (no room for
    a new record since)."""
    try:
        row = conn.execute("SELECT value FROM archiver_state WHERE name = ?", (STATE_NOT_KEPT,)).fetchone()
    except sqlite3.OperationalError:  # a file without the archiver's tables
        return None
    if row is None:
        return None
    try:
        found = json.loads(row[0])
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def used_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the quarantine's rows hold against the total cap: their keys and kept values."""
    return int(conn.execute("SELECT coalesce(sum(length(key) + length(payload)), 0) FROM quarantine").fetchone()[0])


class Quarantine:
    """The store's writes into the quarantine table, and what this process counted of them."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._counted: set[bytes] = set()  # digests of keys counted as not kept by this process
        self._full = False  # the total cap bit since a new key was last stored (logged once)

    def put(self, conn: sqlite3.Connection, rejected: Rejected, pending: Pending) -> Put:
        """Keep one rejected read: a new row, the key's row changed in place, or, for a key not in
        the quarantine once it is full, only counted."""
        value = rejected.payload
        digest = hashlib.sha256(value).hexdigest()
        truncated = len(value) > self.limits.record_bytes
        kept = value[: self.limits.prefix_bytes] if truncated else value
        seen_at = iso_utc(rejected.read_at_us)
        version = rejected.version_us or None
        found = conn.execute(
            "SELECT id, payload_sha256, reason, read_at_us, resolved_at, length(payload) FROM quarantine WHERE key = ?",
            (rejected.key,),
        ).fetchone()
        if found is None:
            size = len(rejected.key) + len(kept)
            if pending.used is None:
                pending.used = used_bytes(conn)
            if pending.used + size > self.limits.total_bytes:
                self._refuse(rejected.key, pending)
                return Put.NOT_KEPT
            conn.execute(
                "INSERT INTO quarantine (key, key_text, kind, record_id, redis_type, payload, payload_sha256, reason, "
                "first_seen_at, last_seen_at, session_id, payload_length, truncated, read_at_us) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rejected.key,
                    rejected.key.decode("utf-8", "backslashreplace"),
                    rejected.kind.value if rejected.kind else None,
                    rejected.record_id,
                    rejected.redis_type,
                    kept,
                    digest,
                    rejected.reason,
                    seen_at,
                    seen_at,
                    rejected.session_id,
                    len(value),
                    int(truncated),
                    version,
                ),
            )
            pending.used += size
            pending.stored_new = True
            return Put.NEW
        row_id, kept_digest, kept_reason, kept_version, resolved_at, kept_length = found
        if version is not None and kept_version is not None and version < kept_version:
            return Put.STALE
        if kept_digest == digest and kept_reason == rejected.reason:
            conn.execute(
                "UPDATE quarantine SET last_seen_at = ?, times_seen = times_seen + 1, resolved_at = NULL, "
                "read_at_us = coalesce(?, read_at_us) WHERE id = ?",
                (seen_at, version, row_id),
            )
        else:
            conn.execute(
                "UPDATE quarantine SET redis_type = ?, payload = ?, payload_sha256 = ?, payload_length = ?, "
                "truncated = ?, reason = ?, session_id = ?, last_seen_at = ?, times_seen = times_seen + 1, "
                "changes_seen = changes_seen + 1, resolved_at = NULL, read_at_us = coalesce(?, read_at_us) "
                "WHERE id = ?",
                (
                    rejected.redis_type,
                    kept,
                    digest,
                    len(value),
                    int(truncated),
                    rejected.reason,
                    rejected.session_id,
                    seen_at,
                    version,
                    row_id,
                ),
            )
            if pending.used is not None:
                pending.used += len(kept) - kept_length
        return Put.REPEAT if resolved_at is None else Put.NEW

    def _refuse(self, key: bytes, pending: Pending) -> None:
        pending.refused += 1
        digest = hashlib.sha256(key).digest()[:16]
        if digest not in self._counted:
            pending.counted.add(digest)

    def _room_again(self, pending: Pending) -> bool:
        """A new key was stored and a record of the per-record cap would fit too: the cap no longer
        bites (a margin, so a quarantine hovering at its cap is not said to fill and empty again
        with every small key)."""
        return (
            pending.stored_new
            and pending.used is not None
            and pending.used + self.limits.record_bytes <= self.limits.total_bytes
        )

    def note(self, conn: sqlite3.Connection, pending: Pending, now_us: int) -> None:
        """In the transaction: the file's note of the records not kept, when this one refused any,
        and that there is room again."""
        if not pending.refused and not self._room_again(pending):
            return
        noted = not_kept(conn)
        if pending.refused:
            now = iso_utc(now_us)
            noted = noted or {"count": 0, "first_at": now}
            noted.update(
                count=int(noted.get("count", 0)) + len(pending.counted),
                last_at=now,
                max_bytes=self.limits.total_bytes,
                full=True,
            )
        elif noted is None or not noted.get("full"):
            return
        else:
            noted["full"] = False
        conn.execute(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            (STATE_NOT_KEPT, json.dumps(noted), iso_utc(now_us)),
        )

    def committed(self, pending: Pending) -> bool:
        """After the transaction committed: remember the keys counted; True when the total cap
        began to bite with it (the daemon says so once, not once per record)."""
        room = _REMEMBERED - len(self._counted)
        if room > 0:
            self._counted.update(list(pending.counted)[:room])
        if pending.refused:
            began, self._full = not self._full, True
            return began
        if self._room_again(pending):
            self._full = False
        return False
