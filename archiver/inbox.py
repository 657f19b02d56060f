"""What the daemon's other threads hand its main loop: changed keys, desto's messages, and news of
the subscription and of Redis' notification flags.

The listener and the fetcher only append here (cheap, thread-safe work: the listener must keep
up with Redis); the main loop drains it and acts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from archiver.dirty import Dirty, Hints
from archiver.keys import record_key
from archiver.models import TimedHint, parse_hint
from archiver.read_clock import now_us
from archiver.source import NotifyState


@dataclass(frozen=True)
class News:
    """The listener subscribed (``reconcile`` says why to reconcile), or a look at the flags."""

    notify: NotifyState | None
    reconcile: str | None = None


class Inbox:
    """The listener's sink (listener.EventSink), and the fetcher's reports."""

    def __init__(self, max_dirty: int, arrived: Callable[[], None] = lambda: None) -> None:
        self._arrived = arrived  # wakes the main loop: news and desto's messages are its to take
        self.dirty = Dirty(max_dirty)
        self.hints = Hints(max_dirty)
        self._raw_hints: deque[tuple[bytes, bytes, int]] = deque(maxlen=max_dirty)
        self._news: deque[News] = deque()
        self.connected = threading.Event()  # subscribed to Redis' notifications and desto's channels

    # ─── from the listener's thread ───────────────────────────────────────────────────────────

    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None:
        self.dirty.add_many(events)

    def hint(self, channel: bytes, data: bytes) -> None:
        self._raw_hints.append((channel, data, now_us()))
        self.dirty.wake.set()
        self._arrived()

    def subscribed(self, notify: NotifyState, reconnected: bool) -> None:
        self._news.append(News(notify, "reconnect" if reconnected else "start"))
        self.connected.set()
        self._arrived()

    def disconnected(self, error: str) -> None:
        self.connected.clear()

    # ─── from the fetcher's thread ────────────────────────────────────────────────────────────

    def notifications_checked(self, notify: NotifyState) -> None:
        self._news.append(News(notify))
        self._arrived()

    # ─── the main loop's ──────────────────────────────────────────────────────────────────────

    def take_news(self) -> list[News]:
        news = self._news
        return [news.popleft() for _ in range(len(news))]

    def drain_hints(self) -> None:
        """Parse desto's messages received (bad ones are dropped: the read decides) and mark
        their records dirty, so each message meets the read it announces."""
        raw = self._raw_hints
        while raw:
            channel, data, received = raw.popleft()
            hint = parse_hint(channel, data)
            if hint is None:
                continue
            self.hints.add(hint.kind, hint.record_id, TimedHint(hint.status, hint.timestamp, received))
            self.dirty.add(record_key(hint.kind, hint.record_id), None)
