"""The daemon's work on the file between its writes: other programs' writes looked at again,
their erasures finished, and the retention applied."""

from __future__ import annotations

from archiver.archive import erase
from archiver.archive.store import Store
from archiver.config import Settings
from archiver.daemon.dirty import Dirty
from archiver.daemon.schedule import Deadline, Schedule
from archiver.keys import record_key
from archiver.log import get_logger
from archiver.redis_side.read_clock import now_us

log = get_logger("archiver.daemon.housekeeping")

# How often the daemon looks for another program's writes to the file: with the file check, so an
# idle daemon wakes once every two seconds for both.
_RECHECK_S = 2.0
_RETENTION_S = 3600.0  # how often the daemon erases what left Redis longer ago than ARCHIVER_RETENTION_DAYS
_RETENTION_BATCHES = 4  # transactions of retention per step, between the daemon's writes
# Seconds of a scrub of every page per step (its write transactions are a few milliseconds each):
# a fifth of the daemon's time at most, while the scrub lasts.
_SCRUB_STEP_S = 0.05


class Housekeeping:
    """Only the main thread calls it; each step raises sqlite3.Error when the file is busy or
    fails (the caller backs off) and is taken up again at the next step."""

    def __init__(self, settings: Settings, dirty: Dirty, schedule: Schedule) -> None:
        self.settings = settings
        self.dirty = dirty
        self.schedule = schedule
        self._recheck_more = False
        self._scrub_retry = False

    @property
    def deadlines(self) -> list[Deadline]:
        """The deadlines this part keeps, for the main loop's sleep."""
        return [Deadline.RECHECK, *([Deadline.RETENTION] if self.settings.retention_days is not None else [])]

    def step(self, store: Store, now: float) -> int:
        """What is due now; the records erased."""
        erased = 0
        if self.schedule.due(Deadline.RECHECK, now):
            erased += self._recheck_foreign_writes(store, now)
        if self.settings.retention_days is not None and self.schedule.due(Deadline.RETENTION, now):
            erased += self._retention(store, now)
        return erased

    def _recheck_foreign_writes(self, store: Store, now: float) -> int:
        """Re-read records another program (desto's own store) wrote to the file since the last
        look, so a stale copy it saved never outlives the Redis state."""
        self.schedule.set_after(Deadline.RECHECK, _RECHECK_S, now)
        foreign = store.foreign_commits()
        erased = self.finish_erasures(store) if foreign or self._scrub_retry else 0
        if not (foreign or self._recheck_more):
            return erased
        limit = self.settings.batch_size
        taken = store.take_rechecks(limit)
        self._recheck_more = len(taken) == limit
        for kind, record_id in taken:
            self.dirty.add(record_key(kind, record_id), None)
        return erased

    def finish_erasures(self, store: Store) -> int:
        """Records another program erased (desto's History tab, forget): their history and
        quarantine entries go, and their bytes are scrubbed from the file, a step of the scrub
        at a time. The records erased."""
        self._scrub_retry = True  # until it has run through (a busy file raises: tried again)
        done = erase.finish(store, _SCRUB_STEP_S)
        self._scrub_retry = done is not None and not done.scrub_done
        if done is None:
            return 0
        if done.erasures or done.scrub_done:
            log.info("erasure.finished", **done.as_dict())
        return done.erasures

    def _retention(self, store: Store, now: float) -> int:
        """Erase what left Redis longer ago than ARCHIVER_RETENTION_DAYS, a few small
        transactions per step, so live writes go on between them."""
        days = self.settings.retention_days
        assert days is not None
        cutoff = now_us() - int(days * 86_400 * 1_000_000)
        pruned = erase.prune(store, cutoff, self.settings.batch_size, _RETENTION_BATCHES, _SCRUB_STEP_S)
        self._scrub_retry = self._scrub_retry or not pruned.scrub_done  # the next steps go on with it
        self.schedule.set_after(Deadline.RETENTION, _RETENTION_S if pruned.done else _RECHECK_S, now)
        erased = sum(pruned.records.values())
        if erased:
            log.info("retention.erased", days=days, **pruned.as_dict())
        return erased
