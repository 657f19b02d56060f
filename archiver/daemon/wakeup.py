"""How the daemon's main loop sleeps: until something is there for it, or its next deadline.

A pipe that other threads, and signal handlers, write a byte into; the loop waits for it to be
readable with ``select``. Writing a byte takes no lock (a signal handler may run while the main
thread holds one), never blocks (a full pipe is readable already), and wakes the loop at once,
so an idle daemon sleeps until its next deadline instead of looking every fraction of a second.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal


class Wakeup:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._on_signals = False

    def notify(self) -> None:
        """Wake the waiting loop (or make its next wait return at once). Signal-safe."""
        with contextlib.suppress(BlockingIOError, OSError):  # full: readable already; closed: stopping
            os.write(self._write, b"\0")

    def wait(self, timeout: float) -> bool:
        """Sleep until notified or ``timeout`` seconds pass; True when notified. The notifications
        that came meanwhile are taken, so the next wait sleeps again."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        return True

    def wake_on_signals(self) -> None:
        """Have a signal wake the loop, whichever thread the kernel delivers it to: Python runs a
        handler in the main thread only, and a main thread asleep in ``select`` is not interrupted
        by a signal another thread took. From the main thread only (as :meth:`close` then)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._on_signals = True

    def close(self) -> None:
        if self._on_signals:
            signal.set_wakeup_fd(-1)
            self._on_signals = False
        fds, self._read, self._write = (self._read, self._write), -1, -1  # a late notify writes nowhere
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
