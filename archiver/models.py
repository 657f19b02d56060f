"""Normalization of desto's Redis records into typed rows. Pure: no I/O.

The rule is desto's own: a row must read back, through desto 0.7.0's ``SQLiteStore``, exactly as
desto's models (``DestoSession.from_dict`` and friends) read the hash from Redis. So every field
is converted the way desto converts it (``int()``, ``datetime.fromisoformat``, ``lower() ==
"true"``), and a record that desto's readers would fail on is rejected with the reason, to be
quarantined with its raw bytes. Lax coercion rules, such as those the settings are read with
(archiver/config.py, pydantic's), differ from desto's: they take ``"yes"`` as true where desto
reads only ``"true"``, and ``"5.0"`` as the integer 5 where desto's ``int()`` fails, which is why
the converters are written out here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from archiver.keys import CHANNEL_KINDS, DESTO_TTL_SECONDS, ID_FIELDS, ParsedKey
from archiver.kinds import JOB_STATUSES, KINDS, SESSION_STATUSES, Kind

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The most a desto record can hold. desto writes each record as one hash of at most 14 short text
# fields (an at-job's; a session has 10): ids, names, statuses, ISO times, and the few free texts
# (a command, an error message, a comma-joined list of job ids). A field a newer desto adds still
# fits, and so does a command of megabytes; anything beyond cannot be a record desto wrote, and
# only a bounded description of it is read from Redis (archiver/redis_side/source.py).
MAX_RECORD_FIELDS = 64
MAX_RECORD_BYTES = 16 * 1024 * 1024  # its field names and values together
# A key of another type than a hash is read whole, for its quarantine entry, while it is this small.
MAX_WHOLE_ITEMS = 2 * MAX_RECORD_FIELDS
MAX_WHOLE_BYTES = 64 * 1024
# What a description of a key too big to read keeps of its value: a prefix of its first items.
PREFIX_ITEMS = 8
PREFIX_BYTES = 512


class Invalid(ValueError):
    """A field value desto's readers could not read."""


@dataclass(slots=True)
class Fetched:
    """One key as read from Redis, with Redis' clock at the moment of the read."""

    key: bytes
    redis_type: str  # "hash", "none" (gone), or another Redis type
    value: Any  # hash: flat [field, value, ...] bytes; other types: their raw reply
    pttl_ms: int  # -1: no TTL, -2: missing
    read_at_us: int
    version_us: int  # orders the reads: Redis' clock, unless it went back (read_clock.ReadClock)
    # Why only a description of the key was read (its type, size and first items, in ``value``:
    # see ``describe``), or None when ``value`` is the key's whole value.
    described: str | None = None


def description(redis_type: str, length: int, size: int, prefix: Any) -> list[Any]:
    """What is kept of a key too big to read: its type, its length (items; bytes for a string),
    its size in Redis' memory (bytes, -1 when Redis would not say) and a prefix of its value."""
    return [b"type", redis_type.encode(), b"length", length, b"bytes", size, b"prefix", prefix]


def describe(fetched: Fetched) -> str:
    """The size a description tells, for people: "a list of 3000000 items, about 24 MB"."""
    value = fetched.value
    length, size = value[3], value[5]
    unit = "bytes" if fetched.redis_type == "string" else ("fields" if fetched.redis_type == "hash" else "items")
    text = f"a {fetched.redis_type} of {length} {unit}"
    return text if size < 0 else f"{text}, {size} bytes in Redis"


@dataclass(slots=True)
class Row:
    """A live record, ready for the store: ``values`` follow ``COLUMNS[kind]``."""

    kind: Kind
    record_id: str
    key: bytes
    values: tuple[Any, ...]
    extra: str | None  # JSON object of fields desto's model does not know, else None
    read_at_us: int
    expires_at_us: int | None
    created_at_us: int  # best estimate of when desto created the record (Redis clock)
    version_us: int  # the read's version (Fetched.version_us): what the store compares

    @property
    def status(self) -> str | None:
        idx = STATUS_INDEX.get(self.kind)
        return None if idx is None else self.values[idx]

    @property
    def name(self) -> str | None:
        return self.values[1] if KINDS[self.kind].renamed else None


@dataclass(frozen=True, slots=True)
class Gone:
    """A key that was not in Redis when read (``kind`` is None for an unrecognized key)."""

    key: bytes
    kind: Kind | None
    record_id: str
    read_at_us: int
    version_us: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A key the archiver will not put in a desto table; kept in quarantine (whole, up to the
    quarantine's per-record cap)."""

    key: bytes
    kind: Kind | None
    record_id: str | None
    redis_type: str
    payload: bytes  # the raw reply, RESP-encoded: byte for byte what Redis held
    reason: str
    read_at_us: int
    session_id: str | None = None  # a job's session, read from its raw hash when it has one
    version_us: int = 0  # the read's version (Fetched.version_us): the quarantine keeps the newest read; 0: unknown


Outcome = Row | Gone | Rejected


# ─── converters: each mirrors how desto's from_dict reads the field ────────────────────────────


def _text(value: str) -> str:
    return value


def _time(value: str) -> str | None:
    if value == "":
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"not an ISO time: {value[:80]!r}") from None
    return value


def _int64(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise Invalid(f"not an integer: {value[:80]!r}") from None
    if not INT64_MIN <= number <= INT64_MAX:
        raise Invalid(f"integer out of SQLite's range: {value[:80]!r}")
    return number


def _int_or_null(value: str) -> int | None:
    return None if value == "" else _int64(value)


def _job_ids(value: str) -> str:
    # desto's model keeps empty ids ("a,,b" -> a, "", b) where its store drops them: such a value
    # cannot read back the same, and desto never writes one.
    if value and "" in value.split(","):
        raise Invalid(f"an empty job id in {value[:80]!r}")
    return value


def _bool_text(value: str) -> int:
    return 1 if value.lower() == "true" else 0


def _status(allowed: frozenset[str]) -> Callable[[str], str]:
    def convert(value: str) -> str:
        if value not in allowed:
            raise Invalid(f"unknown status {value[:80]!r} (desto knows {', '.join(sorted(allowed))})")
        return value

    return convert


@dataclass(frozen=True, slots=True)
class FieldSpec:
    column: str
    convert: Callable[[str], Any]
    default: Any  # the value when the field is absent, as desto's from_dict defaults it
    required: bool = False  # absent: the hash is a fragment, not a record desto wrote


_MISSING = object()

SPECS: dict[Kind, tuple[FieldSpec, ...]] = {
    Kind.SESSION: (
        FieldSpec("session_name", _text, "", required=True),
        FieldSpec("tmux_session_name", _text, ""),
        FieldSpec("status", _status(SESSION_STATUSES), "starting", required=True),
        FieldSpec("start_time", _time, None),
        FieldSpec("end_time", _time, None),
        FieldSpec("last_heartbeat", _time, None),
        FieldSpec("job_ids", _job_ids, ""),
        FieldSpec("tmux_active", _bool_text, 0),
        FieldSpec("at_job_id", _text, ""),
    ),
    Kind.JOB: (
        FieldSpec("session_id", _text, "", required=True),
        FieldSpec("command", _text, ""),
        FieldSpec("script_path", _text, ""),
        FieldSpec("status", _status(JOB_STATUSES), "queued", required=True),
        FieldSpec("start_time", _time, None),
        FieldSpec("end_time", _time, None),
        FieldSpec("exit_code", _int_or_null, None),
        FieldSpec("error_message", _text, ""),
    ),
    Kind.FAVORITE: (
        FieldSpec("name", _text, "", required=True),
        FieldSpec("command", _text, ""),
        FieldSpec("created_at", _time, None),
        FieldSpec("last_used_at", _time, None),
        FieldSpec("use_count", _int64, 0),
    ),
    # desto's readers never parse at-job fields into a model: they are kept as text.
    Kind.ATJOB: tuple(
        FieldSpec(name, _text, "", required=(name == "status"))
        for name in (
            "command",
            "request_time",
            "scheduled_time",
            "user",
            "status",
            "creation_time",
            "queue",
            "session_name",
            "script_path",
            "arguments",
            "error_message",
            "execution_result",
        )
    ),
}

# The id column comes first (and a column that repeats it, for at-jobs), then the parser's.
ID_COLUMNS: dict[Kind, str] = {kind: info.id_column for kind, info in KINDS.items()}
COLUMNS: dict[Kind, tuple[str, ...]] = {
    kind: (
        KINDS[kind].id_column,
        *((KINDS[kind].id_column_repeated,) if KINDS[kind].id_column_repeated else ()),
        *(spec.column for spec in specs),
    )
    for kind, specs in SPECS.items()
}
STATUS_INDEX: dict[Kind, int] = {kind: cols.index("status") for kind, cols in COLUMNS.items() if "status" in cols}
_KNOWN_FIELDS: dict[Kind, frozenset[str]] = {
    kind: frozenset({ID_FIELDS[kind], *(spec.column for spec in specs)}) for kind, specs in SPECS.items()
}
# desto sets its 7-day TTL once, when it creates a session or job: the TTL left dates the creation.
_TTL_MS = DESTO_TTL_SECONDS * 1000
_TTL_KINDS = frozenset(kind for kind, info in KINDS.items() if info.ttl)


# ─── normalize ──────────────────────────────────────────────────────────────────────────────────


def normalize(parsed: ParsedKey, fetched: Fetched) -> Outcome:
    """Turn one fetched key into a row, a tombstone, or a rejection. Never raises."""
    kind = parsed.kind
    try:
        record_id = parsed.raw_id.decode("utf-8")
    except UnicodeDecodeError:
        record_id = None
    if kind is None:
        if fetched.redis_type == "none":
            return Gone(fetched.key, None, "", fetched.read_at_us, fetched.version_us)
        reason = "unrecognized key under desto: it fits no desto record kind"
        if fetched.described is not None:
            reason = f"{reason}; {_described_reason(fetched)}"
        return _reject(fetched, None, None, reason)
    if record_id is None:
        return _reject(fetched, kind, None, "the id in the key is not valid UTF-8")
    if record_id == "":
        return _reject(fetched, kind, record_id, "the key has an empty id")
    if fetched.redis_type == "none":
        return Gone(fetched.key, kind, record_id, fetched.read_at_us, fetched.version_us)
    if fetched.described is not None:
        return _reject(fetched, kind, record_id, _described_reason(fetched))
    if fetched.redis_type != "hash":
        return _reject(fetched, kind, record_id, f"wrong Redis type: {fetched.redis_type} (desto writes a hash)")
    try:
        return _row(kind, record_id, fetched)
    except Invalid as exc:
        return _reject(fetched, kind, record_id, str(exc))


def _described_reason(fetched: Fetched) -> str:
    why = fetched.described
    if fetched.redis_type != "hash" and why == TOO_BIG:
        why = f"wrong Redis type: {fetched.redis_type} (desto writes a hash), too big to read whole"
    return f"{why}: {describe(fetched)}; only its type, size and first items are kept"


TOO_BIG = (
    f"too big for a desto record (more than {MAX_RECORD_FIELDS} fields or {MAX_RECORD_BYTES // (1024 * 1024)} MiB)"
)

# Per kind: (column, converter or None for text kept as is, default when absent, required).
_PLANS: dict[Kind, tuple[tuple[str, Callable[[str], Any] | None, Any, bool], ...]] = {
    kind: tuple((s.column, None if s.convert is _text else s.convert, s.default, s.required) for s in specs)
    for kind, specs in SPECS.items()
}


def _row(kind: Kind, record_id: str, fetched: Fetched) -> Row:
    flat = fetched.value
    fields: dict[str, Any]
    try:
        fields = dict(zip(map(bytes.decode, flat[::2]), map(bytes.decode, flat[1::2]), strict=True))
    except (UnicodeDecodeError, ValueError):
        fields = _decode_hash(flat)  # the slow path says which field is wrong
    id_field = ID_FIELDS[kind]
    claimed = fields.get(id_field, "")
    if claimed and claimed != record_id:
        raise Invalid(f"{id_field} field {claimed[:80]!r} does not match the key's id {record_id[:80]!r}")
    values: list[Any] = [record_id, record_id] if KINDS[kind].id_column_repeated else [record_id]
    append, get = values.append, fields.get
    missing = None
    for column, convert, default, required in _PLANS[kind]:
        raw: Any = get(column, _MISSING)
        if raw is _MISSING:
            if required:
                missing = [*(missing or []), column]
            append(default)
        elif convert is None:
            append(raw)
        else:
            try:
                append(convert(raw))
            except Invalid as exc:
                raise Invalid(f"{column}: {exc}") from None
    if missing:
        raise Invalid(f"missing field(s) {', '.join(missing)}: a fragment, not a record desto wrote")
    unknown = fields.keys() - _KNOWN_FIELDS[kind]
    extra = json.dumps({k: fields[k] for k in sorted(unknown)}, ensure_ascii=False) if unknown else None
    pttl, read_at = fetched.pttl_ms, fetched.read_at_us
    created_at = read_at
    if 0 < pttl <= _TTL_MS and kind in _TTL_KINDS:  # desto's 7-day TTL, set once at creation, dates it
        created_at = read_at - (_TTL_MS - pttl) * 1000
    expires_at = read_at + pttl * 1000 if pttl >= 0 else None
    return Row(kind, record_id, fetched.key, tuple(values), extra, read_at, expires_at, created_at, fetched.version_us)


def _decode_hash(flat: Sequence[bytes]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for i in range(0, len(flat) - 1, 2):
        try:
            name = flat[i].decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"a field name is not valid UTF-8: {flat[i][:80]!r}") from None
        try:
            fields[name] = flat[i + 1].decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"{name[:80]}: value is not valid UTF-8") from None
    return fields


def _reject(fetched: Fetched, kind: Kind | None, record_id: str | None, reason: str) -> Rejected:
    return Rejected(
        key=fetched.key,
        kind=kind,
        record_id=record_id,
        redis_type=fetched.redis_type,
        payload=encode_resp(fetched.value),
        reason=reason,
        read_at_us=fetched.read_at_us,
        session_id=job_session(_fields(fetched)) if kind is Kind.JOB and fetched.redis_type == "hash" else None,
        version_us=fetched.version_us,
    )


def _fields(fetched: Fetched) -> Any:
    """A hash's flat fields as read: all of them, or the first few a description kept."""
    return fetched.value if fetched.described is None else fetched.value[7]


def job_session(flat: Any) -> str | None:
    """The ``session_id`` field of a job's raw hash (flat field, value, ... bytes), or None: a
    rejected job still belongs to its session, and goes when the session is erased."""
    if not isinstance(flat, list):
        return None
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == b"session_id" and isinstance(flat[i + 1], bytes):
            try:
                return flat[i + 1].decode("utf-8") or None
            except UnicodeDecodeError:
                return None
    return None


# ─── desto's pub/sub hints ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Hint:
    """desto's own report of a status change: the record is still read from Redis."""

    kind: Kind
    record_id: str
    status: str
    timestamp: str | None  # desto's naive local ISO time of the change


@dataclass(frozen=True, slots=True)
class TimedHint:
    """One of desto's pub/sub status messages, with when the archiver received it."""

    status: str
    timestamp: str | None
    received_us: int


def parse_hint(channel: bytes, data: bytes) -> Hint | None:
    """Parse a desto channel message; ``None`` when it is not one desto would send."""
    kind = CHANNEL_KINDS.get(channel)
    if kind is None:
        return None
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict):
        return None
    record_id = message.get(ID_FIELDS[kind])
    status = message.get("status")
    timestamp = message.get("timestamp")
    if not isinstance(record_id, str) or not record_id or not isinstance(status, str):
        return None
    if isinstance(timestamp, str):
        try:
            datetime.fromisoformat(timestamp)
        except ValueError:
            timestamp = None
    else:
        timestamp = None
    return Hint(kind, record_id, status, timestamp)


# ─── RESP: the byte-exact form of a quarantined payload ─────────────────────────────────────────


def encode_resp(value: Any) -> bytes:
    """Encode a Redis reply as RESP2, so quarantine keeps exactly the bytes Redis held."""
    out: list[bytes] = []
    _encode_into(value, out)
    return b"".join(out)


def _encode_into(value: Any, out: list[bytes]) -> None:
    if value is None:
        out.append(b"$-1\r\n")
    elif isinstance(value, bytes):
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    elif isinstance(value, str):
        _encode_into(value.encode("utf-8"), out)
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, (list, tuple)):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode_into(item, out)
    else:
        _encode_into(repr(value), out)


def decode_resp(data: bytes) -> Any:
    """Decode :func:`encode_resp`'s output back into bytes, ints, lists and ``None``."""
    value, end = _decode_at(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after the RESP value")
    return value


def _decode_at(data: bytes, pos: int) -> tuple[Any, int]:
    line_end = data.index(b"\r\n", pos)
    marker, head = data[pos : pos + 1], data[pos + 1 : line_end]
    pos = line_end + 2
    if marker == b"$":
        length = int(head)
        if length < 0:
            return None, pos
        return data[pos : pos + length], pos + length + 2
    if marker == b":":
        return int(head), pos
    if marker == b"*":
        items = []
        for _ in range(int(head)):
            item, pos = _decode_at(data, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP value at byte {pos}")


# ─── time formats ────────────────────────────────────────────────────────────────────────────────


class _SecondsFormat:
    """strftime of whole seconds, remembered: a batch's rows share a few seconds far more often
    than not (one read time, records created and expiring close together). The memory is
    dropped whole when it fills, which a long-running daemon reaches only every few hours."""

    __slots__ = ("fmt", "memo")
    _LIMIT = 4096

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.memo: dict[int, str] = {}

    def __call__(self, seconds: int) -> str:
        text = self.memo.get(seconds)
        if text is None:
            if len(self.memo) >= self._LIMIT:
                self.memo.clear()
            text = self.memo[seconds] = time.strftime(self.fmt, time.gmtime(seconds))
        return text


_sqlite_seconds = _SecondsFormat("%Y-%m-%d %H:%M:%S")
_iso_seconds = _SecondsFormat("%Y-%m-%dT%H:%M:%S")


def sqlite_utc(us: int) -> str:
    """The form of SQLite's ``datetime('now')``, which desto uses for created_at/updated_at."""
    return _sqlite_seconds(us // 1_000_000)


def iso_utc(us: int) -> str:
    """The archiver's own timestamps: ISO 8601 in UTC, to the microsecond."""
    seconds, micros = divmod(us, 1_000_000)
    return f"{_iso_seconds(seconds)}.{micros:06d}Z"
