"""The subscription: keyspace notifications and desto's channels, read raw on a connection of
its own, in a thread that only marks keys dirty."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis
import redis
from redis.exceptions import ResponseError

from archiver.config import Settings
from archiver.keys import CHANNEL_KINDS, keyspace_channel_prefix, keyspace_pattern
from archiver.log import get_logger
from archiver.redis_side.redis_client import CONNECTION_ERRORS, log_unreachable, make_client, retryable
from archiver.redis_side.source import NotifyState, Source

log = get_logger("archiver.redis_side.listener")


class EventSink(Protocol):
    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None: ...
    def hint(self, channel: bytes, data: bytes) -> None: ...
    def subscribed(self, notify: NotifyState, reconnected: bool) -> None: ...
    def disconnected(self, error: str) -> None: ...
    def watching(self) -> bool: ...
    def barrier_wanted(self) -> int: ...
    def barrier_reached(self, number: int) -> None: ...


class DeadConnection(Exception):
    """The pub/sub connection stopped answering (a half-open TCP connection, a frozen Redis)."""


LISTENER_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DeadConnection)
# ... and, while connecting, Redis' reply errors, of which those that say "not now" are retried
_CONNECTING_ERRORS: tuple[type[BaseException], ...] = (*LISTENER_ERRORS, ResponseError)
_PING = b"desto-archiver"
# A barrier: a PING whose answer comes after every notification Redis sent before it got the PING.
_BARRIER = b"desto-archiver-barrier:"
# A quiet subscription is read with a timeout that ends when its health check is due; a stop
# shuts the socket down, which ends the read at once. This bounds a read only as a safety net.
_IDLE_READ_S = 60.0
# While a reconcile measures what the notifications missed (missed.py), a quiet subscription is
# looked at this often, so the barrier the reconcile asks for at its end is sent soon.
_MEASURING_READ_S = 0.25


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
            except OSError as exc:  # reset, aborted, a TLS error: the connection is lost
                raise redis.ConnectionError(f"reading the subscription failed: {exc}") from exc
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

    def ping(self, payload: bytes = _PING) -> None:
        self.conn.send_command("PING", payload)

    def interrupt(self) -> None:
        """End a read under way in another thread at once (it sees the connection closed)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

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
        # this thread's PINGs and the main thread's barrier go out one at a time
        self._send_lock = threading.Lock()
        self._barrier_sent = 0

    def barrier_asked(self) -> None:
        """From the main thread: send the barrier a reconcile asked for now, rather than when this
        thread next looks (its read of a quiet subscription may last until the health check)."""
        subscription = self._subscription
        if subscription is None:
            return  # sent once the next connection is subscribed
        with contextlib.suppress(OSError, *LISTENER_ERRORS):  # a lost connection: sent on the next
            self._send_barrier(subscription)

    def _send_barrier(self, subscription: Subscription) -> None:
        with self._send_lock:
            wanted = self.sink.barrier_wanted()
            if wanted > self._barrier_sent:
                subscription.ping(_BARRIER + b"%d" % wanted)
                self._barrier_sent = wanted

    def stop(self) -> None:
        self._stop_event.set()
        subscription = self._subscription
        if subscription is not None:
            subscription.interrupt()

    def run(self) -> None:
        attempt, connected_once, down_since = 0, False, None
        while not self._stop_event.is_set():
            try:
                notify = self.source.ensure_notifications()
                subscription = self._subscribe()
            except _CONNECTING_ERRORS as exc:
                if not isinstance(exc, LISTENER_ERRORS) and not retryable(exc):
                    raise
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
                if self._stop_event.is_set():  # the stop shut the socket down
                    break
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
        """Subscribe and wait for Redis to confirm every subscription (the pattern, each channel)."""
        self._close()
        subscription = self._subscription = Subscription(
            self._client, keyspace_pattern(self.settings.db_number), tuple(CHANNEL_KINDS)
        )
        deadline = time.monotonic() + self.settings.socket_timeout
        confirmed = 0
        while confirmed < 1 + len(CHANNEL_KINDS):
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
        with self._send_lock:
            self._barrier_sent = 0  # a barrier asked for before this connection is sent on it
        while not self._stop_event.is_set():
            self._send_barrier(subscription)
            # until the health check is due: the PING after a silence, or its answer's deadline
            check_at = last_rx + interval if ping_sent is None else ping_sent + interval
            longest = _MEASURING_READ_S if self.sink.watching() else _IDLE_READ_S
            replies = subscription.read(min(longest, max(0.01, check_at - time.monotonic())))
            now = time.monotonic()
            if not replies:
                if ping_sent is not None and now - ping_sent > interval:
                    raise DeadConnection(f"no reply from Redis for {interval:g} s")
                if ping_sent is None and now - last_rx > interval:
                    with self._send_lock:
                        subscription.ping()
                    ping_sent = now
                continue
            last_rx, ping_sent = now, None
            changed = []
            barrier = 0
            for reply in replies:
                if isinstance(reply, bytes):  # a PING's answer under RESP3: the payload alone
                    if reply.startswith(_BARRIER):
                        barrier = int(reply[len(_BARRIER) :])
                    continue
                kind = reply[0]
                if kind == b"pmessage":
                    changed.append((reply[2][prefix_len:], reply[3]))
                elif kind == b"message":
                    hint(reply[1], reply[2])
                elif kind == b"pong" and reply[1].startswith(_BARRIER):  # under RESP2
                    barrier = int(reply[1][len(_BARRIER) :])
            self.messages += len(replies)
            if changed:
                keys_changed(changed)
            if barrier:  # after the notifications that came before it are handed over
                self.sink.barrier_reached(barrier)
