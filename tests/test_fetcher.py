"""The fetcher's hand-off to the writer: joined batches, and when it reads ahead of a slow writer.

No Redis here: batches are put in its queue as its reading loop would, and the decisions that
depend on what is queued are asked directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from archiver.config import load_settings
from archiver.dirty import Dirty
from archiver.fetcher import QUEUE_DEPTH, Fetcher, Work
from archiver.keys import Kind
from archiver.models import Gone
from archiver.reconcile import Reconcile


def gone(key: bytes) -> Gone:
    return Gone(key, Kind.SESSION, key.decode().rsplit(":", 1)[1], 1)


def keys(prefix: str, n: int) -> list[bytes]:
    return [f"desto:session:{prefix}-{i}".encode() for i in range(n)]


@pytest.fixture
def fetcher(tmp_path: Path) -> Fetcher:
    settings = load_settings(sqlite_db_path=tmp_path / "desto.db", batch_size=10)
    return Fetcher(settings, source=None, dirty=Dirty(1000))  # type: ignore[arg-type]


def queue_batch(fetcher: Fetcher, batch: list[bytes], age_s: float = 0.0, reconcile: Reconcile | None = None) -> Work:
    """What the reading loop does with a batch it read: note its keys, queue it."""
    work = Work([(key, None) for key in batch], [gone(key) for key in batch], 0.001, reconcile)
    work.queued_at -= age_s
    fetcher._note(work.items)
    fetcher.queue.put_nowait(work)
    return work


def test_waiting_batches_join_into_one_up_to_the_limit_and_leave_nothing_noted(fetcher: Fetcher) -> None:
    batches = [keys(f"b{i}", 10) for i in range(QUEUE_DEPTH)]
    for batch in batches:
        queue_batch(fetcher, batch)
    first = fetcher.take(0.1)
    assert first is not None
    assert [key for key, _ in first.items] == [key for batch in batches for key in batch]
    assert first.keys == 10 * QUEUE_DEPTH
    assert fetcher.take(0) is None and fetcher._queued == {}


def test_a_reconcile_page_is_never_joined(fetcher: Fetcher) -> None:
    page = object.__new__(Reconcile)  # only its identity matters here
    queue_batch(fetcher, keys("a", 3))
    queue_batch(fetcher, keys("p", 3), reconcile=page)
    queue_batch(fetcher, keys("b", 3))
    first, second, third = fetcher.take(0), fetcher.take(0), fetcher.take(0)
    assert first is not None and second is not None and third is not None
    assert first.keys == 3 and second.reconcile is page and third.keys == 3


def test_a_key_queued_twice_stays_noted_until_both_batches_are_taken(fetcher: Fetcher) -> None:
    hot = b"desto:session:hot"
    queue_batch(fetcher, [hot])
    fetcher.take(0)
    queue_batch(fetcher, [hot], reconcile=object.__new__(Reconcile))
    queue_batch(fetcher, [hot])
    assert fetcher._queued == {hot: 2}
    fetcher.take(0)
    assert fetcher._queued == {hot: 1}
    fetcher.take(0)
    assert fetcher._queued == {}


def test_behind_a_slow_writer_keys_already_queued_wait_and_new_keys_are_read_ahead(fetcher: Fetcher) -> None:
    now = time.monotonic()
    hot = keys("hot", 20)
    queue_batch(fetcher, hot, age_s=1.0)  # read a second ago; the writer has not taken it yet
    fetcher.dirty.add_many([(key, None) for key in hot])  # ... and every key changed again since
    assert fetcher._writer_stalled(now)  # reading them again now would be wasted

    fetcher.dirty.pop(1000)
    fetcher.dirty.add_many([(key, None) for key in keys("new", 20)])  # a stream of new records
    assert not fetcher._writer_stalled(now)

    fetcher.take(0)
    queue_batch(fetcher, hot)  # a fresh batch: the writer is not behind
    fetcher.dirty.add_many([(key, None) for key in hot])
    assert not fetcher._writer_stalled(now)
