"""The shipper's position and its decisions (archiver/central/ship.py, ``ShipPosition``), without
PostgreSQL or a file: a file's change log is a mapping of entry numbers to tokens."""

from __future__ import annotations

import pytest

from archiver.central.ship import NOT_THE_SHIPPED_LOG, ShipPosition

pytestmark = pytest.mark.unit

LOG = {5: b"t5", 6: b"t6", 7: b"t7"}  # the file's log: entries 5 to 7 (those before were trimmed)
token_at = LOG.get


def at(position: int | None = 6, history_id: int | None = 40, head: int | None = 7, token: bytes | None = b"t7"):
    return ShipPosition("file-a", position, history_id, head, token)


def test_the_file_is_the_one_shipped_when_its_log_holds_the_mark() -> None:
    assert at().is_the_shipped_file("file-a", 7, token_at)
    assert not at().is_the_shipped_file("file-b", 7, token_at)  # another file's id
    assert not at(token=b"other").is_the_shipped_file("file-a", 7, token_at)  # a copy: same number, other token
    assert not at(head=9, token=b"t9").is_the_shipped_file("file-a", 7, token_at)  # the mark's entry is not there
    assert not at(token=None).is_the_shipped_file("file-a", 7, token_at)


def test_without_a_mark_a_position_beyond_the_file_s_log_tells_a_copy() -> None:
    """An older desto-archiver's row kept no mark: its own rule, the position against the log."""
    assert at(position=7, head=None, token=None).is_the_shipped_file("file-a", 7, token_at)
    assert not at(position=8, head=None, token=None).is_the_shipped_file("file-a", 7, token_at)
    assert at(position=None, head=None, token=None).is_the_shipped_file("file-a", 7, token_at)


@pytest.mark.parametrize(
    ("known", "file_id", "complete_from", "reason"),
    [
        (None, "file-a", 5, "no position for this file"),
        (at(position=None), "file-a", 5, "no position for this file"),
        (at(history_id=None), "file-a", 5, "no position for this file"),
        (at(), "file-b", 5, "no position for this file"),
        (at(), "file-a", None, "no position for this file"),  # the file keeps no log
        (at(head=None, token=None), "file-a", 5, "PostgreSQL holds no mark of the change log shipped"),
        (at(token=b"other"), "file-a", 5, NOT_THE_SHIPPED_LOG),
        (at(position=3), "file-a", 5, "the change log was cut short"),  # entry 4 is gone, unshipped
        (at(position=4), "file-a", 5, None),  # the log goes on right after the position
        (at(), "file-a", 5, None),
    ],
)
def test_copy_the_whole_file_or_follow_the_log(
    known: ShipPosition | None, file_id: str, complete_from: int | None, reason: str | None
) -> None:
    found = ShipPosition.copy_needed(known, file_id, complete_from, token_at)
    assert (found is None) == (reason is None)
    if reason is not None:
        assert found is not None and found.startswith(reason)


def test_what_is_left_to_ship_is_counted_from_the_position() -> None:
    assert at(position=6).left_to_ship(7) == 1
    assert at(position=7).left_to_ship(7) == 0
    assert at(position=9).left_to_ship(7) == 0  # never below nothing
    assert at(position=None).left_to_ship(7) is None


def test_a_batch_with_nothing_new_ships_nothing() -> None:
    assert at(history_id=40).nothing_to_ship(entries=0, new_history=0)
    assert not at().nothing_to_ship(entries=1, new_history=0)
    assert not at().nothing_to_ship(entries=0, new_history=2)


def test_a_batch_moves_the_position_to_what_it_shipped_and_marks_the_log_it_read() -> None:
    moved = at(position=6, history_id=40).after_batch(7, 45, 7, b"t7")
    assert moved == ShipPosition("file-a", 7, 45, 7, b"t7")
    # no log entry in the batch: the position stays; no history row: history_id stays
    assert at(position=6, history_id=40).after_batch(None, None, 7, b"t7") == ShipPosition("file-a", 6, 40, 7, b"t7")
