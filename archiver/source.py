"""The archiver's commands to Redis: keyspace notification flags, SCAN, and the atomic read of a
batch of keys with Redis' clock. (Connections: redis_client; the subscription: listener.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from archiver.config import Settings
from archiver.keys import SCAN_MATCH
from archiver.log import get_logger
from archiver.models import Fetched
from archiver.read_clock import ReadClock
from archiver.redis_client import make_client

log = get_logger("archiver.source")


# K: keyspace channel; g: del/expire/rename; h: hash commands; x: expired; e: evicted.
NEEDED_FLAGS = "Kghxe"
_ALL_ALIAS = frozenset("g$lshzxetd")  # what "A" stands for

# One atomic step per batch: Redis' clock, then each key's type, value and TTL. The value of a
# non-hash key is read too, so a wrong-typed record is quarantined whole.
_READ_SCRIPT = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i = 1, #KEYS do
  local k = KEYS[i]
  local ty = redis.call('TYPE', k)['ok']
  local v = false
  if ty == 'hash' then v = redis.call('HGETALL', k)
  elseif ty == 'string' then v = redis.call('GET', k)
  elseif ty == 'list' then v = redis.call('LRANGE', k, 0, -1)
  elseif ty == 'set' then v = redis.call('SMEMBERS', k)
  elseif ty == 'zset' then v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  elseif ty == 'stream' then v = redis.call('XRANGE', k, '-', '+')
  end
  out[#out + 1] = ty
  out[#out + 1] = v
  out[#out + 1] = redis.call('PTTL', k)
end
return out
"""


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
            return NotifyState(False, None, None, f"CONFIG GET refused: {exc}")
        if flags_sufficient(current):
            return NotifyState(True, current, None, None)
        if not self.settings.configure_notifications:
            return NotifyState(False, current, None, "ARCHIVER_CONFIGURE_NOTIFICATIONS is off")
        wanted = merge_flags(current)
        try:
            self.client.config_set("notify-keyspace-events", wanted)
        except ResponseError as exc:
            return NotifyState(False, current, None, f"CONFIG SET refused: {exc}")
        return NotifyState(True, current, wanted, None)

    def scan_page(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        next_cursor, keys = self.client.scan(cursor=cursor, match=SCAN_MATCH, count=count)
        return int(next_cursor), [k if isinstance(k, bytes) else k.encode() for k in keys]

    def fetch(self, keys: Sequence[bytes]) -> list[Fetched]:
        """Read ``keys`` in one atomic step together with Redis' clock."""
        if not keys:
            return []
        if self._use_script:
            try:
                return _parse_script_reply(keys, self._script(keys=list(keys)), self.clock)
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
        return self._fetch_multi(keys)

    def _fetch_multi(self, keys: Sequence[bytes]) -> list[Fetched]:
        pipe: Any = self.client.pipeline(transaction=True)
        pipe.execute_command("TIME")
        for key in keys:
            pipe.execute_command("TYPE", key)
            pipe.execute_command("HGETALL", key)
            pipe.execute_command("PTTL", key)
        replies = pipe.execute(raise_on_error=False)
        seconds, micros = replies[0]
        read_at = int(seconds) * 1_000_000 + int(micros)
        version = self.clock.version(read_at)
        out = []
        others = []
        for i, key in enumerate(keys):
            rtype, value, pttl = replies[1 + 3 * i : 4 + 3 * i]
            type_name = rtype.decode() if isinstance(rtype, bytes) else str(rtype)
            if type_name == "hash":
                value = [item for pair in value.items() for item in pair] if isinstance(value, dict) else value
            else:
                value = None
                if type_name != "none":
                    others.append(i)
            out.append(Fetched(key, type_name, value, int(pttl), read_at, version))
        for i in others:  # wrong-typed keys: read their value for the quarantine (not atomic: rare)
            value = self._raw_value(keys[i], out[i].redis_type)
            out[i] = Fetched(keys[i], out[i].redis_type, value, -1, read_at, version)
        return out

    def _raw_value(self, key: bytes, redis_type: str) -> Any:
        client: Any = self.client
        readers: dict[str, Callable[[], Any]] = {
            "string": lambda: client.get(key),
            "list": lambda: client.lrange(key, 0, -1),
            "set": lambda: sorted(client.smembers(key)),
            "zset": lambda: [x for m, s in client.zrange(key, 0, -1, withscores=True) for x in (m, repr(s))],
            "stream": lambda: [[i, [x for p in f.items() for x in p]] for i, f in client.xrange(key, "-", "+")],
        }
        reader = readers.get(redis_type)
        return reader() if reader else None


def _parse_script_reply(keys: Sequence[bytes], reply: list[Any], clock: ReadClock) -> list[Fetched]:
    read_at = int(reply[0]) * 1_000_000 + int(reply[1])
    version = clock.version(read_at)
    out = []
    for i, key in enumerate(keys):
        rtype, value, pttl = reply[2 + 3 * i : 5 + 3 * i]
        type_name = rtype.decode() if isinstance(rtype, bytes) else str(rtype)
        out.append(Fetched(key, type_name, value, int(pttl), read_at, version))
    return out
