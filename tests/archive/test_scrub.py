"""The scrub of every page (archiver/archive/scrub.py): the free bytes of pages SQLite wrote without
secure_delete, zeroed in place, with nothing else changed, also while another connection writes
between its steps. The oracle is the test's own: the tokens it wrote and which of them it erased,
and SQLite's accounting of each page (dbstat)."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from archiver.archive import erase, pages, scrub
from archiver.archive.store import Store

pytestmark = pytest.mark.unit

TOKEN = re.compile(rb"TOK\d{8}X")


class Workload:
    """A writer without secure_delete (as desto's SQLite built without SECURE_DELETE) inserting,
    growing, shrinking and deleting rows that carry unique tokens, some long enough to spill into
    overflow pages; it knows which tokens are live and which it erased."""

    def __init__(self, path: Path, seed: int) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.conn.execute("PRAGMA secure_delete = OFF")
        self.random = random.Random(seed)
        self.count = 0
        self.live: dict[str, set[bytes]] = {}  # row id -> its tokens
        self.erased: set[bytes] = set()

    def token(self) -> bytes:
        self.count += 1
        return b"TOK%08dX" % self.count

    def _value(self) -> tuple[bytes, set[bytes]]:
        tokens = {self.token() for _ in range(self.random.choice([1, 1, 2, 40]))}
        filler = b"." * self.random.choice([0, 30, 600, 3000])
        return b"".join(tokens) + filler, tokens

    def run(self, operations: int) -> None:
        self.conn.execute("BEGIN")
        for _ in range(operations):
            roll = self.random.random()
            if roll < 0.5 or not self.live:
                key = f"k{self.random.getrandbits(48)}"
                value, tokens = self._value()
                self.conn.execute("INSERT INTO t (id, a, b) VALUES (?, ?, ?)", (key, value, value[:20]))
                self.live[key] = tokens
            elif roll < 0.8:
                key = self.random.choice(list(self.live))
                value, tokens = self._value()
                self.conn.execute("UPDATE t SET a = ?, b = ? WHERE id = ?", (value, value[:20], key))
                self.erased |= self.live[key]
                self.live[key] = tokens
            else:
                key = self.random.choice(list(self.live))
                self.conn.execute("DELETE FROM t WHERE id = ?", (key,))
                self.erased |= self.live.pop(key)
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


def archive(tmp_path: Path, page_size: int = 4096, auto_vacuum: int = 0) -> Path:
    path = tmp_path / "desto.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute(f"PRAGMA auto_vacuum = {auto_vacuum}")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, a BLOB, b BLOB)")
    conn.execute("CREATE INDEX t_b ON t(b)")
    conn.close()
    Store.open(path).close()
    return path


def tokens_in(path: Path) -> set[bytes]:
    """The tokens anywhere in the file (read only once no connection holds it)."""
    return set(TOKEN.findall(path.read_bytes()))


def contents(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return conn.execute("SELECT id, a, b FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.fixture
def store_of() -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def test_free_space_is_what_sqlite_itself_counts_unused_on_each_page(tmp_path: Path) -> None:
    path = archive(tmp_path, page_size=1024)
    workload = Workload(path, seed=7)
    workload.run(1500)
    workload.close()
    conn = sqlite3.connect(path)
    if not conn.execute("SELECT 1 FROM pragma_module_list WHERE name = 'dbstat'").fetchone():
        pytest.skip("this SQLite has no dbstat")
    btree = conn.execute("SELECT pageno, unused FROM dbstat WHERE pagetype IN ('internal', 'leaf')").fetchall()
    chains = conn.execute("SELECT count(*) FROM dbstat WHERE pagetype = 'overflow'").fetchone()[0]
    conn.close()
    data = path.read_bytes()
    found_chains = 0
    for page, unused in btree:
        content = data[(page - 1) * 1024 : page * 1024]
        hdr = 100 if page == 1 else 0
        ranges, overflow = pages.free_space(content, hdr, 1024)
        freeblocks, at = 0, struct.unpack_from(">H", content, hdr + 1)[0]
        while at:
            freeblocks, at = freeblocks + 1, struct.unpack_from(">H", content, at)[0]
        assert sum(end - start for start, end in ranges) + 4 * freeblocks == unused, page
        found_chains += len(overflow)
    assert len(btree) > 100 and chains > 0 and found_chains > 0


@pytest.mark.parametrize(("page_size", "auto_vacuum"), [(4096, 0), (1024, 2), (65536, 0)])
def test_the_scrub_of_every_page_leaves_no_erased_token_and_changes_nothing_else(
    tmp_path: Path, store_of: list[Store], page_size: int, auto_vacuum: int
) -> None:
    path = archive(tmp_path, page_size, auto_vacuum)
    workload = Workload(path, seed=page_size + auto_vacuum)
    workload.run(2000)
    workload.close()
    before = contents(path)
    assert len(tokens_in(path) & workload.erased) > 100  # what a writer without secure_delete leaves

    store = Store.open(path)
    store_of.append(store)
    done, _, figures = erase.scrub(store, "pages")
    assert done and figures is not None and figures["passes"] == 1 and figures["zeroed_bytes"] > 0
    store.close()
    assert contents(path) == before
    assert not tokens_in(path) & workload.erased

    store = Store.open(path)  # nothing left to zero
    store_of.append(store)
    done, _, figures = erase.scrub(store, "pages")
    assert done and figures is not None and figures["zeroed_bytes"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pages_written_or_freed_between_the_scrub_s_steps_are_scrubbed_again(
    tmp_path: Path, store_of: list[Store], seed: int
) -> None:
    path = archive(tmp_path, page_size=1024)
    workload = Workload(path, seed=seed)
    workload.run(3000)
    store = Store.open(path)
    store_of.append(store)
    keep = store.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()[0]
    scrubbing = scrub.PageScrub(store.path, scrub.descriptor(store.path), 5.0, keep, chunk_pages=32)
    scrubbing.pause_s = 0.0  # the workload writes between the steps themselves
    store.page_scrub = scrubbing
    steps = 0
    while not scrubbing.step(0.0):  # a write transaction of the scrub, then one of the workload's
        if steps < 80:
            workload.run(15)
        steps += 1
        assert steps < 10_000, f"seed {seed}: the scrub never finished"
    assert steps > 80, f"seed {seed}"
    workload.close()
    store.close()
    # also what the workload erased while the scrub ran: the pages it wrote, and those it freed
    # without writing them, are done again
    assert not tokens_in(path) & workload.erased, f"seed {seed}"
    assert contents(path)


def test_a_page_a_writer_cached_before_the_scrub_is_not_written_back(tmp_path: Path, store_of: list[Store]) -> None:
    path = archive(tmp_path, page_size=1024)
    workload = Workload(path, seed=21)
    workload.run(2000)  # its connection keeps the pages it wrote in its cache, free bytes and all
    erased_before = set(workload.erased)
    store = Store.open(path)
    store_of.append(store)
    keep = store.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()[0]
    scrubbing = scrub.PageScrub(store.path, scrub.descriptor(store.path), 5.0, keep)
    store.page_scrub = scrubbing
    assert scrubbing.step(60.0)
    workload.run(200)  # nobody else wrote since: only the scrub's last write tells the cache is stale
    workload.close()
    store.close()
    assert not tokens_in(path) & erased_before


def test_a_frame_that_could_have_been_missed_starts_the_pass_again(tmp_path: Path, store_of: list[Store]) -> None:
    path = archive(tmp_path)
    workload = Workload(path, seed=11)
    workload.run(1500)
    erased_before = set(workload.erased)
    store = Store.open(path)
    store_of.append(store)
    keep = store.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()[0]
    scrubbing = scrub.PageScrub(store.path, scrub.descriptor(store.path), 5.0, keep)
    store.page_scrub = scrubbing
    restart = scrubbing._restart_wal
    writes = iter([True])

    def restart_then_write() -> tuple[int, int]:
        busy, frames = restart()
        if next(writes, False):
            # Between the scrub's RESTART and its next look, another program writes, and empties
            # the WAL with the frames of that write: the scrub cannot know which pages they were.
            workload.run(5)
            workload.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return busy, frames

    scrubbing._restart_wal = restart_then_write  # type: ignore[method-assign]
    while not scrubbing.step(1.0):
        pass
    assert scrubbing.progress.passes == 2
    workload.close()
    store.close()
    assert not tokens_in(path) & erased_before


def test_a_write_right_after_the_scrub_starts_the_wal_over_is_followed_without_a_new_pass(
    tmp_path: Path, store_of: list[Store]
) -> None:
    path = archive(tmp_path, page_size=1024)
    workload = Workload(path, seed=13)
    workload.run(1500)
    store = Store.open(path)
    store_of.append(store)
    keep = store.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()[0]
    scrubbing = scrub.PageScrub(store.path, scrub.descriptor(store.path), 5.0, keep)
    scrubbing.pause_s = 0.0
    restart = scrubbing._restart_wal
    writes = 0

    def restart_then_write() -> tuple[int, int]:
        nonlocal writes
        busy, frames = restart()
        if writes < 5:  # desto saving at that moment: its write starts the WAL over, many frames long
            workload.run(100)
            writes += 1
        return busy, frames

    scrubbing._restart_wal = restart_then_write  # type: ignore[method-assign]
    while not scrubbing.step(1.0):
        pass
    assert writes == 5 and scrubbing.progress.passes == 1
    workload.close()
    store.close()
    assert not tokens_in(path) & workload.erased


def test_a_page_that_does_not_add_up_is_left_alone_and_a_vacuum_scrubs_instead(
    tmp_path: Path, store_of: list[Store]
) -> None:
    path = archive(tmp_path)
    workload = Workload(path, seed=5)
    workload.run(800)
    workload.close()
    conn = sqlite3.connect(path)
    leaf = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 't'").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:  # no connection holds the file
        f.seek((leaf - 1) * 4096)
        header = bytearray(f.read(12))
        header[7] = (header[7] + 1) % 256  # its fragmented byte count no longer adds up
        f.seek((leaf - 1) * 4096)
        f.write(header)
    store = Store.open(path)
    store_of.append(store)
    with capture_logs() as logs:
        done, _, figures = erase.scrub(store, "pages")
    assert done and figures is None
    assert [e["event"] for e in logs] == ["scrub.vacuum_instead"]
    assert "fragmented" in logs[0]["reason"] or "page" in logs[0]["reason"]
    store.close()
    assert not tokens_in(path) & workload.erased


def test_one_process_scrubs_a_file_at_a_time(tmp_path: Path, store_of: list[Store]) -> None:
    path = archive(tmp_path)
    first, second = Store.open(path), Store.open(path)
    store_of.extend([first, second])
    keep = first.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()[0]
    first.page_scrub = scrub.PageScrub(first.path, scrub.descriptor(first.path), 5.0, keep)
    with pytest.raises(scrub.ScrubBusy):
        scrub.PageScrub(second.path, scrub.descriptor(second.path), 5.0, keep)
    assert erase.scrub(second, "pages")[0] is False  # the other one finishes the work
    assert os.path.exists(f"{path}.archiver-scrub-lock")


_PROBE = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
print(0 if kind == fcntl.F_UNLCK else pid)
"""


def test_the_scrub_leaves_the_locks_sqlite_holds_on_the_file_in_place(tmp_path: Path) -> None:
    """A connection in WAL mode holds a POSIX lock on the database file as long as it is open, and
    closing any descriptor of the file drops every such lock of the process: the scrub's
    descriptor is never closed, whoever closes the store."""
    path = archive(tmp_path)
    other = sqlite3.connect(path)
    other.execute("SELECT count(*) FROM t").fetchone()

    def holder() -> int:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert holder() == os.getpid()
    store = Store.open(path)
    assert erase.scrub(store, "pages")[0]
    store.close()
    assert holder() == os.getpid(), "the process's lock on the file was dropped"
    other.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_scrub_due_when_the_file_is_removed_or_replaced_waits_for_the_file_the_path_names_next(
    tmp_path: Path, store_of: list[Store], how: str
) -> None:
    """The daemon notices a lost file at its next file check and opens the path again; a scrub
    step in between neither stops it (the path names nothing) nor writes to, or creates, a file it
    does not hold."""
    path = archive(tmp_path)
    workload = Workload(path, seed=11)
    workload.run(500)
    workload.close()
    store = Store.open(path)
    store_of.append(store)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "replaced":
        other = sqlite3.connect(path)
        other.execute("CREATE TABLE someone_else (x)")
        other.close()
        before = path.read_bytes()
    done, _, figures = erase.scrub(store, "pages")
    assert not done and figures is None
    if how == "removed":
        assert not path.exists()
    else:
        assert path.read_bytes() == before
