"""The version of each read from Redis, which orders the archive's writes (the version guard)."""

from __future__ import annotations

import threading
import time

from archiver.log import get_logger

log = get_logger("archiver.redis_side.read_clock")

_CLOCK_LOG_S = 60.0  # Redis' clock going back by less than a second is logged once a minute at most


def now_us() -> int:
    """This host's wall clock in microseconds: when something happened here (not a read's version)."""
    return time.time_ns() // 1000


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
