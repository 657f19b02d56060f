"""The archiver's commands to Redis: keyspace notification flags, SCAN, and the atomic read of a
batch of keys with Redis' clock. (Connections: redis_client; the subscription: listener.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import redis
from redis.exceptions import NoPermissionError, ResponseError, WatchError

from archiver.config import Settings
from archiver.keys import SCAN_MATCH
from archiver.log import get_logger
from archiver.models import (
    MAX_RECORD_BYTES,
    MAX_RECORD_FIELDS,
    MAX_WHOLE_BYTES,
    MAX_WHOLE_ITEMS,
    PREFIX_BYTES,
    PREFIX_ITEMS,
    TOO_BIG,
    Fetched,
    description,
)
from archiver.redis_side.read_clock import ReadClock
from archiver.redis_side.redis_client import make_client, transient_reply

log = get_logger("archiver.redis_side.source")


# K: keyspace channel; g: del/expire/rename; h: hash commands; x: expired; e: evicted.
NEEDED_FLAGS = "Kghxe"
_ALL_ALIAS = frozenset("g$lshzxetd")  # what "A" stands for

# One atomic step per batch: Redis' clock, then each key's type, value, TTL, and whether the value
# is only described. Every key's size is looked at first (O(1) commands, and MEMORY USAGE over
# every item only while there are few): a hash that fits a desto record is read whole, as is a
# key of another type small enough to quarantine byte for byte; anything else is described (its
# type, length, size in Redis' memory, and a prefix of its first items, each cut short), so that
# neither Redis nor the archiver ever handles a value bigger than a record. A key whose value
# would take the reply past its budget is left to the next step, unless it is the first. The
# reply starts with the clock and how many keys it holds.
# ARGV: most fields and bytes of a record, most items and bytes of another type read whole, the
# reply's budget in bytes, and the items and bytes of each that a description keeps.
_READ_SCRIPT = """
local max_fields, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local whole_items, whole_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local prefix_items, prefix_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])

local function cut(v)
  if type(v) == 'string' then
    if #v > prefix_bytes then return string.sub(v, 1, prefix_bytes) end
    return v
  elseif type(v) == 'table' then
    local r = {}
    for i = 1, math.min(#v, 2 * prefix_items) do r[i] = cut(v[i]) end
    return r
  end
  return v
end

local function length(k, ty)
  if ty == 'hash' then return redis.call('HLEN', k)
  elseif ty == 'string' then return redis.call('STRLEN', k)
  elseif ty == 'list' then return redis.call('LLEN', k)
  elseif ty == 'set' then return redis.call('SCARD', k)
  elseif ty == 'zset' then return redis.call('ZCARD', k)
  elseif ty == 'stream' then return redis.call('XLEN', k)
  end
  return 0
end

-- bytes in Redis' memory: every item counted when asked (few items), else estimated from a sample
local function memory(k, every)
  local m
  if every then m = redis.pcall('MEMORY', 'USAGE', k, 'SAMPLES', 0) else m = redis.pcall('MEMORY', 'USAGE', k) end
  if type(m) == 'number' then return m end
  return -1
end

local function size_of(k, ty, n)
  if ty == 'string' then return n end
  if ty == 'hash' and n <= max_fields then
    local m = memory(k, true)
    -- the allocator rounds each value up, by at most a quarter: near the limit, count exactly
    if m >= 0 and (m <= max_bytes or m > max_bytes + max_bytes / 4 + 65536) then return m end
    m = 0  -- the few fields' names and values, counted without reading the values
    for _, f in ipairs(redis.call('HKEYS', k)) do m = m + #f + redis.call('HSTRLEN', k, f) end
    return m
  end
  return memory(k, n <= whole_items)
end

local function whole(k, ty)
  if ty == 'hash' then return redis.call('HGETALL', k)
  elseif ty == 'string' then return redis.call('GET', k)
  elseif ty == 'list' then return redis.call('LRANGE', k, 0, -1)
  elseif ty == 'set' then return redis.call('SMEMBERS', k)
  elseif ty == 'zset' then return redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  elseif ty == 'stream' then return redis.call('XRANGE', k, '-', '+')
  end
  return false
end

-- the first items, cut short; none when they are big on average (not even copied into the script)
local function prefix(k, ty, n, size)
  if ty == 'string' then return redis.call('GETRANGE', k, 0, prefix_bytes - 1) end
  if size < 0 or n == 0 or size / n > 64 * 1024 then return {} end
  if ty == 'hash' then return cut(redis.call('HSCAN', k, 0, 'COUNT', prefix_items)[2])
  elseif ty == 'list' then return cut(redis.call('LRANGE', k, 0, prefix_items - 1))
  elseif ty == 'set' then return cut(redis.call('SSCAN', k, 0, 'COUNT', prefix_items)[2])
  elseif ty == 'zset' then return cut(redis.call('ZRANGE', k, 0, prefix_items - 1, 'WITHSCORES'))
  elseif ty == 'stream' then return cut(redis.call('XRANGE', k, '-', '+', 'COUNT', prefix_items))
  end
  return {}
end

local t = redis.call('TIME')
local out = {t[1], t[2], 0}
local used = 0
for i = 1, #KEYS do
  local k = KEYS[i]
  local ty = redis.call('TYPE', k)['ok']
  local v, described = false, 0
  if ty ~= 'none' then
    local n = length(k, ty)
    local size = size_of(k, ty, n)
    local fits
    if ty == 'hash' then fits = n <= max_fields and size <= max_bytes
    elseif ty == 'string' then fits = n <= whole_bytes
    else fits = n <= whole_items and size >= 0 and size <= whole_bytes end
    if fits then
      if used > 0 and used + size > budget then break end
      used = used + size
      v = whole(k, ty)
    else
      described = 1
      v = {'type', ty, 'length', n, 'bytes', size, 'prefix', prefix(k, ty, n, size)}
    end
  end
  out[#out + 1] = ty
  out[#out + 1] = v
  out[#out + 1] = redis.call('PTTL', k)
  out[#out + 1] = described
  out[3] = i
end
return out
"""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one read may carry: the script's ARGV, in its order."""

    max_fields: int = MAX_RECORD_FIELDS
    max_bytes: int = MAX_RECORD_BYTES
    whole_items: int = MAX_WHOLE_ITEMS
    whole_bytes: int = MAX_WHOLE_BYTES
    budget: int = MAX_RECORD_BYTES  # the values of one read, in bytes (its first key's may be all of it)
    prefix_items: int = PREFIX_ITEMS
    prefix_bytes: int = PREFIX_BYTES

    def args(self) -> list[int]:
        return list(astuple(self))


READ = Limits()
DESCRIBE = Limits(max_fields=-1, whole_bytes=-1)  # describe every key, read no value whole
SLOW_TRIES = 3  # reads in a row, with the caller's backoff between them, before a key is taken for slow
_MAX_TIMED_OUT = 10_000


def merge_flags(current: str) -> str:
    """The union of ``current`` and what the archiver needs; never drops a flag someone set."""
    have = set(current)
    covered = have | (_ALL_ALIAS if "A" in have else set())
    return current + "".join(flag for flag in NEEDED_FLAGS if flag not in covered)


def flags_sufficient(current: str) -> bool:
    return merge_flags(current) == current


@dataclass(frozen=True, slots=True)
class NotifyState:
    ok: bool  # keyspace notifications for desto's keys are on
    found: str | None  # the flags Redis had (None: CONFIG GET refused)
    set_to: str | None  # what the archiver set (None: nothing changed)
    error: str | None  # why they could not be ensured


class Source:
    """Commands to Redis on a pooled connection; the listener has a connection of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = make_client(settings, "desto-archiver")
        self._script = self.client.register_script(_READ_SCRIPT)
        self._use_script = True
        # keys whose read alone timed out, and how many times in a row: a key is taken for slow
        # only once it timed out on reads SLOW_TRIES apart (a failover's write pause, or another
        # client's script, holds every read up for a while, and must not have a good record
        # quarantined)
        self._timed_out: dict[bytes, int] = {}
        self._watch = True  # WATCH is allowed (without scripting: keys looked at, then read)
        self.clock = ReadClock()

    def close(self) -> None:
        self.client.close()

    def ping(self) -> bool:
        return bool(self.client.ping())

    def server_version(self) -> str:
        info = self.client.info("server")
        return str(info.get("redis_version", "unknown"))

    def version_now(self) -> int:
        """The version a read made now would get: every read from now on gets this or later."""
        seconds, micros = self.client.time()
        return self.clock.version(int(seconds) * 1_000_000 + int(micros))

    def ensure_notifications(self) -> NotifyState:
        """Make ``notify-keyspace-events`` include what the archiver needs (a union, never less)."""
        try:
            reply: dict[Any, Any] = dict(self.client.config_get("notify-keyspace-events"))
            found = reply.get("notify-keyspace-events", reply.get(b"notify-keyspace-events", b""))
            current = found.decode() if isinstance(found, bytes) else str(found)
        except ResponseError as exc:
            if transient_reply(exc):
                raise  # Redis cannot serve for now: not a refusal
            return NotifyState(False, None, None, f"CONFIG GET refused: {exc}")
        if flags_sufficient(current):
            return NotifyState(True, current, None, None)
        if not self.settings.configure_notifications:
            return NotifyState(False, current, None, "ARCHIVER_CONFIGURE_NOTIFICATIONS is off")
        wanted = merge_flags(current)
        try:
            self.client.config_set("notify-keyspace-events", wanted)
        except ResponseError as exc:
            if transient_reply(exc):
                raise
            return NotifyState(False, current, None, f"CONFIG SET refused: {exc}")
        return NotifyState(True, current, wanted, None)

    def scan_page(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        next_cursor, keys = self.client.scan(cursor=cursor, match=SCAN_MATCH, count=count)
        return int(next_cursor), [k if isinstance(k, bytes) else k.encode() for k in keys]

    def fetch(self, keys: Sequence[bytes]) -> list[Fetched]:
        """Read ``keys`` with Redis' clock: each one's whole value, or a description of one too big
        for a desto record (``Fetched.described``). In atomic steps of as many keys as fit one
        reply's budget; a step that takes longer than ARCHIVER_SOCKET_TIMEOUT is made again on half
        its keys, while Redis itself still answers, down to one key. A single key whose read times
        out fails the read (the caller backs off and reads it again); one that does so SLOW_TRIES
        times in a row is only described, so that no read is retried forever, nor holds Redis up
        again each time."""
        out: list[Fetched] = []
        at, step = 0, len(keys)
        while at < len(keys):
            chunk = keys[at : at + step]
            try:
                got = self._read(chunk, READ)
            except redis.TimeoutError as exc:
                self.ping()  # Redis itself does not answer either: an outage, retried as one
                if len(chunk) > 1:
                    step = len(chunk) // 2
                    log.warning(
                        "redis.read_slow",
                        detail="a read took longer than ARCHIVER_SOCKET_TIMEOUT: reading fewer keys at a time",
                        keys=len(chunk),
                        next_keys=step,
                        timeout_s=self.settings.socket_timeout,
                        error=str(exc),
                    )
                    continue
                tries = self._timed_out.pop(chunk[0], 0) + 1
                if tries < SLOW_TRIES:
                    if len(self._timed_out) >= _MAX_TIMED_OUT:
                        self._timed_out.clear()
                    self._timed_out[chunk[0]] = tries
                    raise  # a failed read: the caller backs off and reads it again
                got = self._read(chunk, DESCRIBE)
                why = (
                    f"could not be read within ARCHIVER_SOCKET_TIMEOUT ({self.settings.socket_timeout} s), "
                    f"{SLOW_TRIES} times in a row"
                )
                got[0].described = why
                log.warning(
                    "redis.key_not_read",
                    detail=f"{why}: quarantined with its type and size; read again when it changes",
                    key=chunk[0].decode("utf-8", "backslashreplace")[:200],
                    redis_type=got[0].redis_type,
                )
            if self._timed_out:
                for fetched in got:
                    self._timed_out.pop(fetched.key, None)
            out.extend(got)
            at += len(got)
        return out

    def _read(self, keys: Sequence[bytes], limits: Limits) -> list[Fetched]:
        """One atomic step: the first of ``keys`` and as many after it as fit the budget."""
        if self._use_script:
            try:
                return _parse_script_reply(keys, self._script(keys=list(keys), args=limits.args()), self.clock)
            except NoPermissionError as exc:
                # "...to run the 'evalsha' command": scripting refused. "...to access one of the
                # keys": the user may not read desto's keys, which MULTI/EXEC cannot mend either.
                if "to run the" not in str(exc):
                    raise
                log.warning(
                    "redis.scripting_refused",
                    detail="EVAL is not allowed for this user: reading with MULTI/EXEC instead",
                    error=str(exc),
                )
                self._use_script = False
        return self._fetch_multi(keys, limits)

    # ─── without scripting: the same reads, the sizes looked at first, then read under WATCH ──────

    def _fetch_multi(self, keys: Sequence[bytes], limits: Limits) -> list[Fetched]:
        """The read script's step with MULTI/EXEC, for a user that may not run scripts: the keys'
        sizes are looked at in a first round trip, then each key is read whole or described in
        one transaction, under WATCH so that a key that grew in between is looked at again."""
        for attempt in range(_WATCH_TRIES):
            plans = self._plans(keys, limits)
            pipe: Any = self.client.pipeline(transaction=True)
            try:
                if self._watch and attempt < _WATCH_TRIES - 1:
                    try:
                        pipe.watch(*plans)
                    except NoPermissionError:  # an ACL from before WATCH was asked for
                        self._watch = False
                        pipe.reset()
                    else:
                        pipe.multi()
                pipe.execute_command("TIME")
                for key, plan in plans.items():
                    pipe.execute_command("TYPE", key)
                    for command in _value_commands(key, plan, limits):
                        pipe.execute_command(*command)
                    pipe.execute_command("PTTL", key)
                replies = pipe.execute(raise_on_error=True)
            except WatchError:
                continue  # a key changed since its size was looked at
            finally:
                pipe.reset()
            return self._parse_multi(plans, replies, limits)
        raise AssertionError("unreachable: the last try is not watched")

    def _plans(self, keys: Sequence[bytes], limits: Limits) -> dict[bytes, tuple[str, int, int, bool]]:
        """Each key's type, length, size in bytes and whether it is read whole, in the order the
        read script would take them (those that fit the budget)."""
        types = [_text(t) for t in self._pipelined([("TYPE", key) for key in keys])]
        lengths = self._pipelined(
            [(_LENGTH[t], key) if t in _LENGTH else ("ECHO", b"0") for key, t in zip(keys, types, strict=True)]
        )
        lengths = [int(n) for n in lengths]
        sizes = self._pipelined(
            [
                ("MEMORY", "USAGE", key, *(("SAMPLES", 0) if _counts_every(t, n, limits) else ()))
                for key, t, n in zip(keys, types, lengths, strict=True)
            ],
            raise_on_error=False,
        )
        plans: dict[bytes, tuple[str, int, int, bool]] = {}
        used = 0
        for key, redis_type, length, reply in zip(keys, types, lengths, sizes, strict=True):
            size = int(reply) if isinstance(reply, int) else -1
            if redis_type == "string":
                size = length
            elif redis_type == "hash" and length <= limits.max_fields and _near_or_unknown(size, limits):
                size = self._hash_bytes(key)
            fits = _fits(redis_type, length, size, limits)
            if fits and plans and used + size > limits.budget:
                break
            used += size if fits else 0
            plans[key] = (redis_type, length, size, fits)
        return plans

    def _hash_bytes(self, key: bytes) -> int:
        """A hash's field names and values in bytes (few fields): when MEMORY USAGE is refused,
        or near the limit, which the allocator's rounding makes it pass."""
        names = self.client.hkeys(key)
        lengths = self._pipelined([("HSTRLEN", key, name) for name in names])
        return sum(len(name) for name in names) + sum(int(n) for n in lengths)

    def _pipelined(self, commands: list[tuple[Any, ...]], raise_on_error: bool = True) -> list[Any]:
        pipe: Any = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=raise_on_error))

    def _parse_multi(
        self, plans: dict[bytes, tuple[str, int, int, bool]], replies: list[Any], limits: Limits
    ) -> list[Fetched]:
        seconds, micros = replies[0]
        read_at = int(seconds) * 1_000_000 + int(micros)
        version = self.clock.version(read_at)
        out = []
        at = 1
        for key, plan in plans.items():
            planned, length, size, whole = plan
            redis_type = _text(replies[at])
            count = len(_value_commands(key, plan, limits))
            values, pttl = replies[at + 1 : at + 1 + count], int(replies[at + 1 + count])
            at += 2 + count
            if redis_type != planned:  # changed type in between (unwatched last try): looked at next time
                out.append(
                    Fetched(key, redis_type, description(redis_type, -1, -1, []), pttl, read_at, version, TOO_BIG)
                )
            elif whole:
                out.append(
                    Fetched(
                        key, redis_type, _whole_value(redis_type, values[0] if values else None), pttl, read_at, version
                    )
                )
            else:
                prefix = _cut(_prefix_value(redis_type, values[0] if values else []), limits)
                out.append(
                    Fetched(
                        key, redis_type, description(redis_type, length, size, prefix), pttl, read_at, version, TOO_BIG
                    )
                )
        return out


_BIG_ITEM = 64 * 1024  # bytes per item on average beyond which a description keeps no items
_WATCH_TRIES = 5  # the last one unwatched: a key that changes on every try is read as it is then
_LENGTH = {"hash": "HLEN", "string": "STRLEN", "list": "LLEN", "set": "SCARD", "zset": "ZCARD", "stream": "XLEN"}


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _counts_every(redis_type: str, length: int, limits: Limits) -> bool:
    return length <= (limits.max_fields if redis_type == "hash" else limits.whole_items)


def _near_or_unknown(size: int, limits: Limits) -> bool:
    """A hash's size in Redis' memory that does not tell whether it fits, as the script judges:
    unknown, or over the limit by no more than the allocator's rounding (a quarter)."""
    return size < 0 or limits.max_bytes < size <= limits.max_bytes + limits.max_bytes // 4 + 65536


def _fits(redis_type: str, length: int, size: int, limits: Limits) -> bool:
    if redis_type == "none":
        return True
    if redis_type == "hash":
        return length <= limits.max_fields and size <= limits.max_bytes
    if redis_type == "string":
        return length <= limits.whole_bytes
    return length <= limits.whole_items and 0 <= size <= limits.whole_bytes


def _value_commands(key: bytes, plan: tuple[str, int, int, bool], limits: Limits) -> list[tuple[Any, ...]]:
    """The commands that read a key's value whole, or the prefix a description keeps (none of
    items big on average, as the read script)."""
    redis_type, length, size, whole = plan
    if redis_type == "none":
        return []
    if whole:
        return [
            {
                "hash": ("HGETALL", key),
                "string": ("GET", key),
                "list": ("LRANGE", key, 0, -1),
                "set": ("SMEMBERS", key),
                "zset": ("ZRANGE", key, 0, -1, "WITHSCORES"),
                "stream": ("XRANGE", key, "-", "+"),
            }[redis_type]
        ]
    n = limits.prefix_items
    if redis_type != "string" and (size < 0 or length == 0 or size / length > _BIG_ITEM):
        return []
    prefixes: dict[str, tuple[Any, ...]] = {
        "string": ("GETRANGE", key, 0, limits.prefix_bytes - 1),
        "hash": ("HSCAN", key, 0, "COUNT", n),
        "list": ("LRANGE", key, 0, n - 1),
        "set": ("SSCAN", key, 0, "COUNT", n),
        "zset": ("ZRANGE", key, 0, n - 1, "WITHSCORES"),
        "stream": ("XRANGE", key, "-", "+", "COUNT", n),
    }
    return [prefixes[redis_type]] if redis_type in prefixes else []


def _parse_script_reply(keys: Sequence[bytes], reply: list[Any], clock: ReadClock) -> list[Fetched]:
    read_at = int(reply[0]) * 1_000_000 + int(reply[1])
    version = clock.version(read_at)
    out = []
    for i, key in enumerate(keys[: int(reply[2])]):
        rtype, value, pttl, described = reply[3 + 4 * i : 7 + 4 * i]
        out.append(Fetched(key, _text(rtype), value, int(pttl), read_at, version, TOO_BIG if described else None))
    return out


def _whole_value(redis_type: str, reply: Any) -> Any:
    """A value read in a transaction, in the shape the read script gives it (redis-py parses some)."""
    if isinstance(reply, dict):  # HGETALL
        return [item for pair in reply.items() for item in pair]
    if isinstance(reply, set):  # SMEMBERS
        return sorted(reply)
    if redis_type == "stream" and isinstance(reply, list):  # XRANGE: [(id, {field: value})]
        return [[entry_id, _whole_value("hash", fields)] for entry_id, fields in reply]
    return reply


def _prefix_value(redis_type: str, reply: Any) -> Any:
    if redis_type in ("hash", "set") and isinstance(reply, (list, tuple)) and len(reply) == 2:  # HSCAN, SSCAN
        return _whole_value(redis_type, reply[1])
    return _whole_value(redis_type, reply)


def _cut(value: Any, limits: Limits) -> Any:
    """At most ``prefix_items`` items (pairs), each at most ``prefix_bytes`` long, as the script cuts."""
    if isinstance(value, bytes):
        return value[: limits.prefix_bytes]
    if isinstance(value, (list, tuple)):
        return [_cut(item, limits) for item in value[: 2 * limits.prefix_items]]
    return value
