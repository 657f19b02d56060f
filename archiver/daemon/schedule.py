"""The daemon's deadlines, by name, on the monotonic clock: what its main loop does when."""

from __future__ import annotations

import enum
import math


class Deadline(enum.Enum):
    FILE_CHECK = "file_check"  # look whether the archive's path still names the file held open
    HEARTBEAT = "heartbeat"  # write the heartbeat into the file, tell systemd the status
    WATCHDOG = "watchdog"  # tell systemd's watchdog the daemon lives
    RECHECK = "recheck"  # look for another program's writes to the file (desto's own store)
    RETENTION = "retention"  # erase what left Redis longer ago than the retention
    RECONCILE = "reconcile"  # the next reconcile on the timer
    RETRY = "retry"  # after a failure: nothing touches Redis or the file before it


class Schedule:
    """Each deadline is due at start, but the reconcile timer, which starts with the first
    reconcile's end. Only the main thread moves a deadline later; another thread may bring one
    forward to now (a single assignment: no lock)."""

    def __init__(self) -> None:
        self._at = {deadline: 0.0 for deadline in Deadline}
        self._at[Deadline.RECONCILE] = math.inf

    def due(self, deadline: Deadline, now: float) -> bool:
        return now >= self._at[deadline]

    def at(self, deadline: Deadline) -> float:
        return self._at[deadline]

    def set_after(self, deadline: Deadline, seconds: float, now: float) -> None:
        self._at[deadline] = now + seconds

    def set_now(self, deadline: Deadline) -> None:
        self._at[deadline] = 0.0
