"""Writing archived favorites back into Redis, as desto's ``FavoriteCommandsManager`` writes them.

A Redis restarted without persistence, or flushed, loses desto's favorites for good: they have no
TTL and desto keeps them nowhere else. The archive has each one's last state, so ``restore
favorites`` writes it back: the ``desto:favorite:<id>`` hash with desto's fields, the name index
``desto:favorite:name:<name>`` and the id in ``desto:favorites:all``, in one script that first
makes sure the favorite is still missing and that no other favorite in Redis uses its name.

Only favorites: sessions and jobs written back would show desto "running" sessions whose tmux
sessions are long gone, and their keys would need a TTL desto gave once. A favorite a person
deleted in desto (its ``del`` seen by the archiver: tombstoned ``deleted``) is written back only
when asked; one that went ``missing`` (a flush, a restart, or a delete nobody saw) is.

Safe beside a running daemon: the restore notes each favorite in the file before writing it
(writer.restore_note), so whichever writer reads it back first records its ``reappeared`` with how.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import NoPermissionError, ResponseError

from archiver.archive.sql import erased_among
from archiver.archive.store import Store
from archiver.archive.writer import restore_note
from archiver.config import Settings
from archiver.daemon.reconcile import archive, records_of
from archiver.keys import FAVORITE_NAME_INDEX_PREFIX, FAVORITES_SET, RECORD_PREFIXES, record_key
from archiver.kinds import Kind
from archiver.redis_side.source import Source

BY = "desto-archiver restore favorites"
GRANT = "+hset +set +sadd"  # on desto:favorite* keys: what the restore needs beside reading
SCRIPTING = "+eval +evalsha"  # the check and the writes run as one script
_SCRIPT_COMMANDS = re.compile(r"'(?:eval|evalsha|evalsha_ro|eval_ro|script\|load)' command", re.IGNORECASE)
_PREFIX = RECORD_PREFIXES[Kind.FAVORITE]

# KEYS: the favorite's hash, its name index, desto's set of ids. ARGV: the id, the name, the
# prefix of favorite keys, then the hash's fields and values. Nothing is written unless the hash
# is missing and no other favorite holds the name (the index, or a favorite of the set); on
# Redis 7 the user's permissions are checked first, so a refused grant writes nothing.
_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'present'} end
local id, name, prefix = ARGV[1], ARGV[2], ARGV[3]
local holder = redis.pcall('GET', KEYS[2])
if type(holder) == 'table' then return {'conflict', '', 'the name index is not a string'} end
if holder and holder ~= id and redis.call('EXISTS', prefix .. holder) == 1 then
  return {'conflict', holder, 'name index'}
end
for _, member in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if member ~= id and redis.pcall('HGET', prefix .. member, 'name') == name then
    return {'conflict', member, 'favorites set'}
  end
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
if redis.acl_check_cmd then
  if not redis.acl_check_cmd('hset', KEYS[1], unpack(fields)) then return {'noperm', 'hset', KEYS[1]} end
  if not redis.acl_check_cmd('set', KEYS[2], id) then return {'noperm', 'set', KEYS[2]} end
  if not redis.acl_check_cmd('sadd', KEYS[3], id) then return {'noperm', 'sadd', KEYS[3]} end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SET', KEYS[2], id)
redis.call('SADD', KEYS[3], id)
return {'written'}
"""


class UnknownFavorite(Exception):
    """An id or name the archive does not hold (or erased on purpose)."""


@dataclass
class Favorite:
    """One archived favorite, and what became of it."""

    favorite_id: str
    name: str  # its real name (the archive may hold a disambiguated one, for desto's UNIQUE)
    command: str
    created_at: str | None
    last_used_at: str | None
    use_count: int
    extra: dict[str, str]
    gone_reason: str | None  # None: the archive had not seen it leave Redis
    gone_at: str | None
    outcome: str = "planned"  # restored, would restore, in redis, deleted, conflict, refused
    detail: str | None = None

    @property
    def key(self) -> bytes:
        return record_key(Kind.FAVORITE, self.favorite_id)

    @property
    def name_key(self) -> bytes:
        return FAVORITE_NAME_INDEX_PREFIX + self.name.encode("utf-8")

    def fields(self) -> dict[str, str]:
        """The hash desto's FavoriteCommand.to_dict writes, with the fields it did not know kept."""
        return {
            "favorite_id": self.favorite_id,
            "name": self.name,
            "command": self.command,
            "created_at": self.created_at or "",
            "last_used_at": self.last_used_at or "",
            "use_count": str(self.use_count),
            **{k: v for k, v in self.extra.items() if k not in _DESTO_FIELDS},
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "favorite_id": self.favorite_id,
            "name": self.name,
            "use_count": self.use_count,
            "left_redis": None if self.gone_reason is None else {"reason": self.gone_reason, "at": self.gone_at},
            "outcome": self.outcome,
            "detail": self.detail,
            "keys": {
                "hash": self.key.decode("utf-8"),
                "name_index": self.name_key.decode("utf-8"),
                "set": FAVORITES_SET.decode(),
            },
            "fields": self.fields(),
        }


_DESTO_FIELDS = frozenset({"favorite_id", "name", "command", "created_at", "last_used_at", "use_count"})


@dataclass
class Report:
    dry_run: bool
    favorites: list[Favorite] = field(default_factory=list)
    refused: str | None = None  # Redis refused a write: why, and the grant to give

    def count(self, outcome: str) -> int:
        return sum(1 for f in self.favorites if f.outcome == outcome)

    @property
    def ok(self) -> bool:
        return self.refused is None and not any(f.outcome in ("conflict", "refused") for f in self.favorites)

    def as_dict(self) -> dict[str, Any]:
        outcomes = ("restored", "would restore", "in redis", "deleted", "conflict", "refused")
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "counts": {o: self.count(o) for o in outcomes},
            "refused": self.refused,
            "favorites": [f.as_dict() for f in self.favorites],
        }


# ─── which favorites ────────────────────────────────────────────────────────────────────────────


_SELECT = (
    "SELECT favorite_id, coalesce(real_name, name), command, created_at, last_used_at, use_count, extra, "
    "gone_reason, gone_at FROM favorites"
)


def select(conn: sqlite3.Connection, ids: Sequence[str], names: Sequence[str]) -> list[Favorite]:
    """The archived favorites named by ``ids`` and ``names``, or every one when neither is given,
    in the order they are written back. UnknownFavorite for an id or name the archive lacks."""
    rows: dict[str, Favorite] = {}
    if not ids and not names:
        found = conn.execute(_SELECT).fetchall()
    else:
        found = []
        for record_id in dict.fromkeys(ids):
            row = conn.execute(f"{_SELECT} WHERE favorite_id = ?", (record_id,)).fetchone()
            if row is None:
                raise UnknownFavorite(_unknown(conn, record_id, "id"))
            found.append(row)
        for name in dict.fromkeys(names):
            rows_named = conn.execute(f"{_SELECT} WHERE coalesce(real_name, name) = ?", (name,)).fetchall()
            if not rows_named:
                raise UnknownFavorite(f"no favorite named {name!r} in the archive")
            found.extend(rows_named)
    for r in found:
        rows[r[0]] = Favorite(r[0], r[1], r[2], r[3], r[4], int(r[5] or 0), _extra(r[6]), r[7], r[8])
    # Of two favorites that share a name, the one whose state is newest claims it: one the archive
    # still holds as live, else the one that left Redis last; one a person deleted never first.
    ordered = sorted(rows.values(), key=lambda f: f.gone_at or "", reverse=True)
    ordered.sort(key=lambda f: (f.gone_reason == "deleted", f.gone_at is not None))
    return ordered


def _unknown(conn: sqlite3.Connection, record_id: str, what: str) -> str:
    if erased_among(conn, Kind.FAVORITE, [record_id]):
        return f"favorite {record_id} was erased on purpose: the archive keeps only its id, nothing to restore"
    return f"no favorite with {what} {record_id!r} in the archive"


def _extra(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


# ─── the restore ────────────────────────────────────────────────────────────────────────────────


def restore(
    settings: Settings, store: Store, source: Source, favorites: list[Favorite], *, include_deleted: bool, dry_run: bool
) -> Report:
    """Write back the ``favorites`` missing from Redis (those a person deleted only with
    ``include_deleted``); with ``dry_run``, only say what would be written."""
    report = Report(dry_run, favorites)
    present: set[bytes] = set()
    for page in _pages(favorites, settings.batch_size):
        fetched = source.fetch([f.key for f in page])
        present.update(f.key for f, found in zip(page, fetched, strict=True) if found.redis_type != "none")
    wanted: list[Favorite] = []
    for f in favorites:
        if f.key in present:
            f.outcome, f.detail = "in redis", "already in Redis: left as it is"
        elif f.gone_reason == "deleted" and not include_deleted:
            f.outcome, f.detail = "deleted", "deleted in desto (the archiver saw its del): add --include-deleted"
        else:
            wanted.append(f)
    if dry_run:
        _plan_conflicts(source, wanted)
        return report
    _note(store, wanted, source.version_now())
    try:
        # the favorites the archive still held as live leave it first, as a reconcile would find them
        for page in _pages(wanted, settings.batch_size):
            archive(source, store, records_of([f.key for f in page]), gone_only=True)
        _left(store, wanted)
        written = _write(settings, source, wanted, report)
        for page in _pages(written, settings.batch_size):
            archive(source, store, records_of([f.key for f in page]))
    finally:
        _forget_notes(store, wanted)
    return report


def _pages(favorites: list[Favorite], size: int) -> list[list[Favorite]]:
    return [favorites[i : i + size] for i in range(0, len(favorites), size)]


def _left(store: Store, favorites: list[Favorite]) -> None:
    """How each favorite left Redis, as the file says now (the read above may have recorded it)."""
    for f in favorites:
        found = store.conn.execute(
            "SELECT gone_reason, gone_at FROM favorites WHERE favorite_id = ?", (f.favorite_id,)
        ).fetchone()
        if found is not None:
            f.gone_reason, f.gone_at = found


def _write(settings: Settings, source: Source, wanted: list[Favorite], report: Report) -> list[Favorite]:
    script = source.client.register_script(_SCRIPT)
    written: list[Favorite] = []
    for f in wanted:
        if report.refused is not None:
            f.outcome, f.detail = "refused", "not tried: Redis refused an earlier write"
            continue
        keys: list[str | bytes] = [f.key, f.name_key, FAVORITES_SET]
        args: list[str | bytes] = [
            f.favorite_id,
            f.name,
            _PREFIX,
            *(part for pair in f.fields().items() for part in pair),
        ]
        try:
            reply = script(keys=keys, args=args)
        except (NoPermissionError, ResponseError) as exc:
            text = str(exc)
            if not isinstance(exc, NoPermissionError) and "NOPERM" not in text and "can't run" not in text:
                raise
            report.refused = refused_advice(settings, text)
            f.outcome, f.detail = "refused", text
            continue
        answer = [part.decode("utf-8", "replace") if isinstance(part, bytes) else str(part) for part in reply]
        if answer[0] == "written":
            f.outcome, f.detail = "restored", None
            written.append(f)
        elif answer[0] == "present":
            f.outcome, f.detail = "in redis", "written back meanwhile by someone else: left as it is"
        elif answer[0] == "conflict":
            holder = f"favorite {answer[1]}" if answer[1] else "a key desto did not write"
            f.outcome, f.detail = "conflict", f"its name is used by {holder} in Redis ({answer[2]}): not written"
        else:  # noperm: Redis 7 said which command the user may not run, before anything was written
            report.refused = refused_advice(settings, f"the user may not run {answer[1].upper()} on {answer[2]}")
            f.outcome, f.detail = "refused", f"Redis refuses {answer[1].upper()} on {answer[2]}"
    return written


def _plan_conflicts(source: Source, wanted: list[Favorite]) -> None:
    """For a dry run: the names other favorites in Redis hold, and names two restores would share."""
    client: Any = source.client
    members = [m.decode("utf-8", "replace") for m in client.smembers(FAVORITES_SET)]
    pipe = client.pipeline(transaction=False)
    for member in members:
        pipe.hget(_PREFIX + member.encode(), "name")
    names = {
        name.decode("utf-8", "replace"): member
        for member, name in zip(members, pipe.execute(), strict=True)
        if isinstance(name, bytes)
    }
    claimed: dict[str, str] = {}
    for f in wanted:
        holder = client.get(f.name_key)
        holder_id = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else None
        if holder_id and holder_id != f.favorite_id and client.exists(_PREFIX + holder):
            f.outcome, f.detail = "conflict", f"its name is used by favorite {holder_id} in Redis (name index)"
        elif f.name in names and names[f.name] != f.favorite_id:
            f.outcome, f.detail = "conflict", f"its name is used by favorite {names[f.name]} in Redis (favorites set)"
        elif f.name in claimed:
            f.outcome, f.detail = "conflict", f"its name is restored with favorite {claimed[f.name]}"
        else:
            claimed[f.name] = f.favorite_id
            f.outcome, f.detail = "would restore", None


def refused_advice(settings: Settings, error: str) -> str:
    user = _user(settings)
    if _SCRIPT_COMMANDS.search(error):
        return (
            f"Redis refused the restore's script ({error}): the user {user} needs {SCRIPTING}, which the restore "
            f"checks and writes each favorite with, e.g. ACL SETUSER {user} {SCRIPTING} "
            "(docs/deployment.md, 'With a Redis ACL user')"
        )
    return (
        f"Redis refused the restore's writes ({error}): the user {user} needs {GRANT} on desto's favorite keys, "
        f"e.g. ACL SETUSER {user} '(~desto:favorite* {GRANT})' (docs/deployment.md, 'With a Redis ACL user')"
    )


def _user(settings: Settings) -> str:
    if settings.redis_username:
        return settings.redis_username
    url = settings.redis_kwargs().get("url")
    if isinstance(url, str):
        found = urlsplit(url).username
        if found:
            return found
    return "default"


# ─── the notes in the file ──────────────────────────────────────────────────────────────────────


def _note(store: Store, favorites: list[Favorite], since_us: int) -> None:
    value = json.dumps({"since_us": since_us, "by": BY})
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ')) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(restore_note(Kind.FAVORITE, f.favorite_id), value) for f in favorites],
        )


def _forget_notes(store: Store, favorites: list[Favorite]) -> None:
    with store.transaction() as conn:
        conn.executemany(
            "DELETE FROM archiver_state WHERE name = ?",
            [(restore_note(Kind.FAVORITE, f.favorite_id),) for f in favorites],
        )
