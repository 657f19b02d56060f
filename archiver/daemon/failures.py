"""What the daemon's threads do when Redis or the file fails: back off, log, recover."""

from __future__ import annotations

import random

from archiver.archive.store import store_advice
from archiver.log import get_logger
from archiver.redis_side.redis_client import unreachable_advice

log = get_logger("archiver.daemon.failures")

_LOG_EVERY = 20  # while one thing keeps failing, one warning in this many


def worth_logging(before: str | None, now: str, in_a_row: int) -> bool:
    """An outage is a few lines in the log, not one a retry: its first failure, each failure of
    another kind than the one before, then one in every twenty."""
    return before != now or in_a_row % _LOG_EVERY == 0


class Failures:
    """The failures in a row, what fails, and how long to wait before the next try.

    A failure doubles the wait (from 0.1 s, to ``max_backoff``); with ``jitter``, each wait is
    drawn from its half to its whole, so that readers which failed together do not all come
    back at once. Logged as :func:`worth_logging` says; the first success after them logs the
    recovery."""

    def __init__(self, max_backoff: float, jitter: bool = False) -> None:
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.in_a_row = 0
        self.failing: str | None = None  # "redis" or "sqlite"
        self.write_failures = 0  # every failed write to the file since start, for the metrics
        self.read_failures = 0  # every failed read from Redis since start, for the metrics

    def failed(self, what: str, exc: BaseException) -> float:
        """Note a failure of ``what`` ("redis" or "sqlite"); the seconds to wait before the next try."""
        self.in_a_row += 1
        if what == "sqlite":
            self.write_failures += 1
        else:
            self.read_failures += 1
        delay: float = min(self.max_backoff, 0.1 * 2.0 ** min(self.in_a_row, 10))
        if self.jitter:
            delay *= random.uniform(0.5, 1.0)
        if worth_logging(self.failing, what, self.in_a_row):
            error = str(exc) or type(exc).__name__
            if what == "sqlite":
                advice = store_advice(exc)
                log.warning(
                    "store.write_failed",
                    error=error,
                    failures=self.in_a_row,
                    retry_in_s=delay,
                    **({"action": advice} if advice else {}),
                )
            else:
                log.warning(
                    "redis.read_failed",
                    error=error,
                    failures=self.in_a_row,
                    retry_in_s=delay,
                    action=unreachable_advice(exc),
                )
        self.failing = what
        return delay

    def succeeded(self) -> None:
        if self.failing is not None:
            log.info("archiver.recovered", after=self.failing, failures=self.in_a_row)
            self.failing, self.in_a_row = None, 0
