"""desto's key and channel grammar (desto 0.7.0). Nothing else in the archiver spells ``desto:``."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from archiver.kinds import KINDS, Kind


class KeyClass(StrEnum):
    """What a key under ``desto:`` is, for the archiver."""

    RECORD = "record"  # one of the four record kinds: archived
    INDEX = "index"  # desto's own derived index (favorite name index, favorites set): ignored
    UNKNOWN = "unknown"  # under desto: but fits no known shape: quarantined, never archived as a record


PREFIX = b"desto:"
SCAN_MATCH = b"desto:*"

# desto:<kind>:<id> for every kind of the registry.
RECORD_PREFIXES: dict[Kind, bytes] = {kind: PREFIX + kind.value.encode() + b":" for kind in KINDS}
FAVORITE_NAME_INDEX_PREFIX = b"desto:favorite:name:"
FAVORITES_SET = b"desto:favorites:all"

# The field of each record that repeats the id in the key.
ID_FIELDS: dict[Kind, str] = {kind: info.id_field for kind, info in KINDS.items()}

# The keyspace events that say a key left Redis, and the reason the archive records for each.
GONE_EVENTS = {b"del": "deleted", b"expired": "expired", b"evicted": "evicted"}

# desto's plain pub/sub channels, desto:session_updates and desto:job_updates: JSON hints with
# desto's own timestamp of a status change.
CHANNEL_KINDS: dict[bytes, Kind] = {
    PREFIX + kind.value.encode() + b"_updates": kind for kind, info in KINDS.items() if info.channel
}

# desto sets EXPIRE 604800 once, when it creates a session or job key.
DESTO_TTL_SECONDS = 7 * 86400


class ParsedKey(NamedTuple):
    key: bytes
    cls: KeyClass
    kind: Kind | None = None
    raw_id: bytes = b""


def keyspace_pattern(db: int) -> bytes:
    """The PSUBSCRIBE pattern for keyspace notifications on desto's keys in ``db``."""
    return b"__keyspace@%d__:" % db + SCAN_MATCH


def keyspace_channel_prefix(db: int) -> bytes:
    return b"__keyspace@%d__:" % db


_KINDS_BY_NAME: dict[bytes, Kind] = {prefix.split(b":")[1]: kind for kind, prefix in RECORD_PREFIXES.items()}
_NAME_INDEX_ID = FAVORITE_NAME_INDEX_PREFIX[len(RECORD_PREFIXES[Kind.FAVORITE]) :]


def classify(key: bytes) -> ParsedKey | None:
    """Classify a Redis key; ``None`` when it is not under ``desto:`` at all."""
    if not key.startswith(PREFIX):
        return None
    parts = key.split(b":", 2)  # desto, kind, id (the id may hold colons)
    if len(parts) == 3:
        kind = _KINDS_BY_NAME.get(parts[1])
        if kind is not None and not (kind is Kind.FAVORITE and parts[2].startswith(_NAME_INDEX_ID)):
            return ParsedKey(key, KeyClass.RECORD, kind, parts[2])
    if is_index(key):
        return ParsedKey(key, KeyClass.INDEX)
    return ParsedKey(key, KeyClass.UNKNOWN)


def is_index(key: bytes) -> bool:
    """desto's derived indexes under desto: (the favorite name index, the favorites set)."""
    return key.startswith(FAVORITE_NAME_INDEX_PREFIX) or key == FAVORITES_SET


def record_key(kind: Kind, record_id: str) -> bytes:
    return RECORD_PREFIXES[kind] + record_id.encode("utf-8")
