"""What the daemon's other threads hand its main loop: changed keys, desto's messages, and news of
the subscription and of Redis' notification flags.

The listener and the fetcher only append here (cheap, thread-safe work: the listener must keep
up with Redis); the main loop drains it and acts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from archiver.daemon.dirty import Dirty, Hints
from archiver.keys import record_key
from archiver.models import TimedHint, parse_hint
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.source import NotifyState


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
        # The keys notifications named while a reconcile measures what they missed (missed.py),
        # bounded; and the barriers asked for (main thread) and reached (listener).
        self._watch_lock = threading.Lock()
        self._watching: set[bytes] | None = None
        self._watch_limit = max_dirty
        self._watch_full = False
        self._barrier_wanted = 0
        self._barrier_reached = 0
        # the listener's, once it runs: sends a barrier at once (else at the listener's next look)
        self.send_barrier: Callable[[], None] = lambda: None

    # ─── from the listener's thread ───────────────────────────────────────────────────────────

    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None:
        self.dirty.add_many(events)
        if self._watching is not None:
            self._saw(key for key, _ in events)

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

    def watching(self) -> bool:
        """A reconcile measures what the notifications miss: a barrier may be asked for."""
        return self._watching is not None

    def barrier_wanted(self) -> int:
        return self._barrier_wanted

    def barrier_reached(self, number: int) -> None:
        self._barrier_reached = max(self._barrier_reached, number)
        self._arrived()  # the reconcile that asked for it may end now

    # ─── from the fetcher's thread ────────────────────────────────────────────────────────────

    def notifications_checked(self, notify: NotifyState) -> None:
        self._news.append(News(notify))
        self._arrived()

    # ─── the main loop's ──────────────────────────────────────────────────────────────────────

    def watch(self) -> None:
        """Keep the keys notifications name from now on (a new set: the one kept so far goes)."""
        with self._watch_lock:
            self._watching, self._watch_full = set(), False

    def watched(self) -> set[bytes] | None:
        """Stop keeping them; the keys kept (None: more than ARCHIVER_MAX_DIRTY, or no watch)."""
        self.drain_hints()  # desto's messages received so far name their records too
        with self._watch_lock:
            found, full = self._watching, self._watch_full
            self._watching, self._watch_full = None, False
        return None if full else found

    def ask_barrier(self) -> int:
        """Ask the listener for a barrier (a PING on its connection); its number."""
        self._barrier_wanted += 1
        self.send_barrier()
        return self._barrier_wanted

    def barrier_passed(self, number: int) -> bool:
        """Every notification Redis sent before it answered barrier ``number`` has been received."""
        return self._barrier_reached >= number

    def _saw(self, keys: Iterable[bytes]) -> None:
        with self._watch_lock:
            watching = self._watching
            if watching is None:
                return
            watching.update(keys)
            if len(watching) > self._watch_limit:
                self._watching, self._watch_full = set(), True  # too many to keep: nothing measured

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
            key = record_key(hint.kind, hint.record_id)
            self.dirty.add(key, None)
            if self._watching is not None:
                self._saw((key,))
