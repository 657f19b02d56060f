"""Everything that talks to Redis: connect, keyspace notifications, subscribe, SCAN, fetch.

Replies stay bytes (``decode_responses=False``): desto's values are text, but a hostile or broken
value must reach the quarantine byte for byte, and key names may be any bytes.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, ResponseError
from redis.retry import Retry

from archiver.config import Settings
from archiver.keys import JOB_UPDATES, SCAN_MATCH, SESSION_UPDATES, keyspace_channel_prefix, keyspace_pattern
from archiver.log import get_logger
from archiver.models import Fetched

log = get_logger("archiver.source")

# Errors that mean "Redis cannot be used right now": not reachable, or a permission the user lacks
# (granted later, without a restart). Retried, never fatal: a daemon that exited on them would be
# restarted into the same error over and over.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    NoPermissionError,
    OSError,
)


def unreachable_advice(exc: BaseException) -> str:
    """What to do when Redis cannot be used, for people: a refused login is not a Redis that is down."""
    if isinstance(exc, redis.AuthenticationError):
        return (
            "Redis wants a password, or refused the one given: set REDIS_PASSWORD (and REDIS_USERNAME for an "
            "ACL user), or give them in REDIS_URL as redis://user:password@host:port/db"
        )
    if isinstance(exc, NoPermissionError) or "NOPERM" in str(exc):  # the listener's come as ConnectionError
        return "grant the Redis user what the archiver needs: docs/deployment.md, 'With a Redis ACL user'"
    return "is Redis running? Set REDIS_HOST/REDIS_PORT/REDIS_DB or REDIS_URL (or --redis-url)"


def log_unreachable(settings: Settings, exc: BaseException) -> None:
    """``redis.unreachable``: the first failure to reach Redis, with what to do about it."""
    log.warning("redis.unreachable", error=str(exc), address=settings.redis_address(), action=unreachable_advice(exc))


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


_CLOCK_LOG_S = 60.0  # Redis' clock going back by less than a second is logged once a minute at most


class ReadClock:
    """The version of each read: Redis' clock, moved ahead by as much as that clock went back.

    A row keeps the version of the read that wrote it, and a read older than that is never
    applied, so a slow scan cannot overwrite a newer read. Redis' clock is the one clock every
    reader shares, but it can go back: corrected after running fast, or another host's after a
    failover or a move. By that clock alone, every later change of a record already archived
    would look older than its row and be dropped until the clock caught up again: an hour later,
    or a year. So when a thread finds Redis' clock behind its own previous read, or the first
    read after a file is opened finds it behind the newest version in that file, versions move
    ahead to follow on from the newest one. The times written in the rows stay Redis' own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's previous reading of Redis' clock
        self._offset = 0
        self._newest = 0
        self._check_next = False
        self._unlogged = 0  # steps back not logged yet: small ones are logged once a minute at most
        self._logged_at = -_CLOCK_LOG_S

    @property
    def offset_us(self) -> int:
        return self._offset

    def note_file(self, newest_us: int | None) -> None:
        """The newest version in the file just opened (None: no version yet): the next read
        is checked against it. Every version in the file comes from a read made before now."""
        if newest_us is None:
            return
        with self._lock:
            self._newest = max(self._newest, newest_us)
            self._check_next = True

    def version(self, redis_us: int) -> int:
        """The version of a read made at ``redis_us`` by Redis' clock."""
        local = self._local
        previous = getattr(local, "previous", None)
        local.previous = redis_us
        moved = 0
        with self._lock:
            if self._check_next or (previous is not None and redis_us < previous):
                self._check_next = False
                # one past the newest: a reconcile that begins now counts the rows of the
                # newest version as read before it began, so its sweep still looks at them
                needed = self._newest + 1 - redis_us
                if needed > self._offset:
                    moved, self._offset = needed - self._offset, needed
            version = redis_us + self._offset
            if version > self._newest:
                self._newest = version
            offset, steps = self._offset, 0
            if moved:
                self._unlogged += 1
                now = time.monotonic()
                if moved >= 1_000_000 or now - self._logged_at >= _CLOCK_LOG_S:
                    steps, self._unlogged, self._logged_at = self._unlogged, 0, now
        if steps:
            log.warning(
                "redis.clock_behind",
                behind_s=round(moved / 1e6, 6),
                versions_ahead_s=round(offset / 1e6, 6),
                steps=steps,
                detail="Redis' clock is behind reads already archived (set back, or another host's clock): "
                "later reads are ordered after them, not dropped; the times written stay Redis' own",
            )
        return version


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


def make_client(settings: Settings, name: str) -> redis.Redis:
    """A client that fails fast (no hidden retries): the archiver's loops own retry and backoff."""
    kwargs = settings.redis_kwargs()
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "client_name": name,
        "decode_responses": False,
    }
    url = kwargs.pop("url", None)
    if url is None or not url.startswith("unix://"):
        options["socket_keepalive"] = True  # TCP only: redis-py's unix socket connection refuses it
    if url is not None:
        return redis.Redis.from_url(url, **kwargs, **options)
    return redis.Redis(**kwargs, **options)


# ─── the event listener ──────────────────────────────────────────────────────────────────────────


class EventSink(Protocol):
    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None: ...
    def hint(self, channel: bytes, data: bytes) -> None: ...
    def subscribed(self, notify: NotifyState, reconnected: bool) -> None: ...
    def disconnected(self, error: str) -> None: ...


class DeadConnection(Exception):
    """The pub/sub connection stopped answering (a half-open TCP connection, a frozen Redis)."""


LISTENER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DeadConnection)
_PING = b"desto-archiver"
_IDLE_READ_S = 0.25  # a quiet subscription is looked at this often (the stop flag, the health check)


class Subscription:
    """One subscribed connection, read raw: redis-py connects it (TCP, TLS or a unix socket,
    AUTH, client name) and sends the commands; the replies are parsed here with hiredis, every
    complete message in the socket buffer at once. redis-py's per-message pub/sub machinery
    costs several times more, and a subscriber that falls behind is one Redis drops."""

    def __init__(self, client: Any, pattern: bytes, channels: Sequence[bytes]) -> None:
        self.conn = client.connection_pool.make_connection()
        self.conn.connect()
        self.sock = self.conn._sock  # redis-py's parser never reads this connection again
        self.reader = hiredis.Reader()
        self.conn.send_command("PSUBSCRIBE", pattern)
        self.conn.send_command("SUBSCRIBE", *channels)

    def read(self, timeout: float) -> list[Any]:
        """The replies that arrive within ``timeout`` (an empty list when none did)."""
        reader = self.reader
        replies: list[Any] = []
        reply = reader.gets()
        if reply is False:
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                return replies
            if not data:
                raise redis.ConnectionError("Redis closed the connection")
            reader.feed(data)
            reply = reader.gets()
        while reply is not False:
            if isinstance(reply, Exception):
                raise redis.ConnectionError(f"Redis replied with an error: {reply}")
            replies.append(reply)
            reply = reader.gets()
        return replies

    def ping(self) -> None:
        self.conn.send_command("PING", _PING)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail
            self.conn.disconnect()


class Listener(threading.Thread):
    """Reads keyspace notifications and desto's channels; never touches SQLite.

    It only marks keys dirty, so a slow disk can never make Redis drop this subscriber for an
    overflowing output buffer. Each (re)connection ensures the notification flags, subscribes,
    waits for Redis to confirm, and only then tells the sink, which reconciles.
    """

    def __init__(self, settings: Settings, source: Source, sink: EventSink) -> None:
        super().__init__(name="archiver-listener", daemon=True)
        self.settings = settings
        self.source = source
        self.sink = sink
        self._stop_event = threading.Event()
        self._client: Any = make_client(settings, "desto-archiver-events")
        self._subscription: Subscription | None = None
        self._prefix_len = len(keyspace_channel_prefix(settings.db_number))
        self.reconnects = 0
        self.messages = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        attempt, connected_once, down_since = 0, False, None
        while not self._stop_event.is_set():
            try:
                notify = self.source.ensure_notifications()
                subscription = self._subscribe()
            except LISTENER_ERRORS as exc:
                self._close()
                attempt += 1
                if down_since is None:
                    down_since = time.monotonic()
                    self.sink.disconnected(str(exc))
                    log_unreachable(self.settings, exc)
                elif attempt % 10 == 0:
                    log.warning("redis.still_unreachable", error=str(exc), attempts=attempt)
                self._backoff(attempt)
                continue
            if connected_once:
                self.reconnects += 1
                outage = time.monotonic() - down_since if down_since is not None else 0.0
                log.info("redis.reconnected", attempts=attempt, outage_s=round(outage, 3))
            attempt, down_since = 0, None
            self.sink.subscribed(notify, reconnected=connected_once)
            connected_once = True
            try:
                self._pump(subscription)
            except LISTENER_ERRORS as exc:
                down_since = time.monotonic()
                self.sink.disconnected(str(exc))
                log.warning("redis.disconnected", error=str(exc) or type(exc).__name__)
            finally:
                self._close()
        self._client.close()

    def _backoff(self, attempt: int) -> None:
        delay = min(self.settings.reconnect_max_backoff, 0.2 * 2 ** min(attempt, 20))
        self._stop_event.wait(delay * random.uniform(0.5, 1.0))

    def _subscribe(self) -> Subscription:
        """Subscribe and wait for Redis to confirm all three subscriptions."""
        self._close()
        subscription = self._subscription = Subscription(
            self._client, keyspace_pattern(self.settings.db_number), (SESSION_UPDATES, JOB_UPDATES)
        )
        deadline = time.monotonic() + self.settings.socket_timeout
        confirmed = 0
        while confirmed < 3:
            if time.monotonic() > deadline:
                raise DeadConnection("Redis did not confirm the subscriptions")
            for reply in subscription.read(0.1):
                if reply[0] in (b"subscribe", b"psubscribe"):
                    confirmed += 1
                # nothing else can come before the confirmations: the commands were just sent
        return subscription

    def _close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _pump(self, subscription: Subscription) -> None:
        interval = self.settings.health_check_interval
        prefix_len = self._prefix_len
        keys_changed, hint = self.sink.keys_changed, self.sink.hint
        last_rx = time.monotonic()
        ping_sent: float | None = None
        while not self._stop_event.is_set():
            replies = subscription.read(_IDLE_READ_S)
            now = time.monotonic()
            if not replies:
                if ping_sent is not None and now - ping_sent > interval:
                    raise DeadConnection(f"no reply from Redis for {interval:g} s")
                if ping_sent is None and now - last_rx > interval:
                    subscription.ping()
                    ping_sent = now
                continue
            last_rx, ping_sent = now, None
            changed = []
            for reply in replies:
                kind = reply[0]
                if kind == b"pmessage":
                    changed.append((reply[2][prefix_len:], reply[3]))
                elif kind == b"message":
                    hint(reply[1], reply[2])
            self.messages += len(replies)
            if changed:
                keys_changed(changed)
