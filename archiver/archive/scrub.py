"""Scrubbing the file's free space in place, in short write transactions.

SQLite overwrites what it frees only on a connection with ``secure_delete`` on (the archiver's);
desto's SQLite may not. What such a writer frees stays in the file: a freed cell in its page (a
freeblock, the unallocated gap, a fragment of up to three bytes), a freed page whole, and the old
bytes past the payload of an overflow page allocated from a freed one. VACUUM rewrites all of it,
but holds the write lock for the whole file: 33 s for 2.8 GB here, and desto's writes give up
after 30 s. This module zeroes those bytes where they lie instead, a chunk of pages per write
transaction, reading each page with the file format SQLite documents
(https://sqlite.org/fileformat2.html). No reader ever interprets free bytes: a page keeps its
meaning byte for byte, and a crash half-way leaves a sound file with some of them zeroed. A page
is touched only while the scrub holds the write lock and only when its newest version is the one
in the file, not a frame of the WAL; a page whose layout does not add up is left alone, and the
scrub says so (the caller then falls back to VACUUM).

What others write meanwhile. Between two steps the scrub keeps a read transaction open on a
connection of its own, which stops the WAL from being started over: every page another
connection writes is then in the WAL at the next step, and its frame names it; such a page is
done again once it is back in the file (a page freed by a writer without ``secure_delete`` is
not written at all: it is found on the free list). To get pages back into the file the scrub
starts the WAL over itself (a RESTART checkpoint); its salt goes up by one at each restart,
which tells the next look whether a frame could have been missed, and then the pass starts
again. The scrub is done when, the WAL started over, no page is left to do: every page in the
file is then done, and the step's last write makes every connection read its pages anew, so no
copy of a page cached from before it was zeroed is written back.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.archive.pages import (
    BTREE_PAGES,
    FRAME_HEADER,
    WAL_HEADER,
    Unreadable,
    chains_of,
    free_space,
    layout_of,
    wal_frames,
    wal_salt,
)
from archiver.archive.sql import begin_immediate, existing

CHUNK_PAGES = 512  # pages per write transaction at most ...
CHUNK_S = 0.01  # ... and seconds of work with the write lock held
# Between two chunks the write lock is let go at least this long, and as long as it was held.
# SQLite's busy handler (desto's) tries again after 1, 2, 5, 10, 15 ms and more: after a chunk of
# 10 ms, its try at 18 ms falls in the pause.
PAUSE_S = 0.01
_PENDING_BYTE = 0x40000000  # SQLite's lock-byte page holds this offset: never written
_MAX_PAGES = 1 << 24  # beyond, an overflow page's first byte could pass for a b-tree page's type


_descriptors: dict[tuple[int, int], int] = {}
_descriptors_lock = threading.Lock()


def descriptor(path: Path) -> int:
    """A descriptor of the database file, to read and write free bytes with. Never closed, one per
    file for the process's life: closing any descriptor of a file drops every POSIX lock the
    process holds on it, and a connection in WAL mode holds one on the database file as long as
    it is open (without it, another process closing its last connection would take itself for the
    last one and remove the WAL)."""
    with _descriptors_lock:
        named = os.stat(path)
        key = (named.st_dev, named.st_ino)
        fd = _descriptors.get(key)
        if fd is not None:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) == key and held.st_nlink:
                return fd
        fd = os.open(path, os.O_RDWR)
        _descriptors[key] = fd  # one to a file removed since stays open: it cannot be closed safely
        return fd


class Unsupported(Exception):
    """A file the page scrub does not handle (reserved bytes per page, an unusual header, its size)."""


@dataclass
class Progress:
    """What a scrub did, for the logs and the commands."""

    pages: int = 0  # pages looked at (some more than once)
    zeroed_bytes: int = 0
    passes: int = 1  # a pass starts again when a frame could have been missed
    chunks: int = 0  # write transactions
    longest_lock_s: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "zeroed_bytes": self.zeroed_bytes,
            "passes": self.passes,
            "transactions": self.chunks,
            "longest_lock_ms": round(self.longest_lock_s * 1000, 1),
            "seconds": round(self.seconds, 2),
        }


class ScrubBusy(Exception):
    """Another process is scrubbing the file (its daemon, or a command): it finishes the work."""


@dataclass
class _Window:
    """The WAL as it was when the scrub let go of its snapshot to start the WAL over."""

    salt: tuple[int, int] | None  # None: it was empty
    seen: int  # its frames looked at
    frames: int  # its frames when the RESTART ran
    restarted: bool  # the RESTART went through: every one of them is back in the file


Free = tuple[dict[int, int], set[int]]  # trunk pages -> their leaf count, leaf pages


class PageScrub:
    """One scrub of every page of the file, in steps. Its two connections and the scrub lock are
    its own; ``fd`` is the file's descriptor from :func:`descriptor`. ``keep``: the root page of
    ``archiver_scrub``, which the scrub writes itself and never zeroes."""

    def __init__(self, path: Path, fd: int, busy_timeout: float, keep: int, chunk_pages: int = CHUNK_PAGES) -> None:
        self.path, self.fd, self.busy_timeout, self.keep = path, fd, busy_timeout, keep
        self.chunk_pages = chunk_pages
        self.pause_s = PAUSE_S
        self.covered_until = 0.0  # wall-clock time: a write committed before it is covered, once done
        self.progress = Progress()
        self._lock = os.open(f"{path}.archiver-scrub-lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ScrubBusy("another process is scrubbing the file; it finishes the work") from None
        # The write lock is taken by polling (sql.begin_immediate); a RESTART must not wait.
        self._w = existing(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._r = existing(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self._w.execute("PRAGMA secure_delete = ON")
        head = os.pread(fd, 100, 0)
        size = struct.unpack_from(">H", head, 16)[0] if len(head) == 100 else 0
        self.page_size = 65536 if size == 1 else size
        self.usable = self.page_size
        self._autovacuum = len(head) == 100 and struct.unpack_from(">I", head, 52)[0] != 0
        self._lock_page = _PENDING_BYTE // max(self.page_size, 1) + 1
        if head[:16] != b"SQLite format 3\x00" or size == 0:
            self.close()
            raise Unsupported("not an SQLite database header")
        if head[20]:
            self.close()
            raise Unsupported(f"{head[20]} reserved bytes per page (a checksum or encryption extension)")
        self._started = time.perf_counter()
        self._page_count = 0
        self._wal = -1  # the WAL file, open while the write lock is held
        self._dirty = False
        self._last_hold = 0.0
        self._new_pass()

    def _new_pass(self) -> None:
        self._next = 1  # the sweep's next page
        self._todo: set[int] = set()  # pages to do (again) once their newest version is in the file
        self._free_done: set[int] = set()  # free pages zeroed whole and not written since
        self._fresh = True  # nothing done yet in this pass
        self._salt: tuple[int, int] | None = None  # the WAL generation followed, and ...
        self._seen = 0  # ... how many of its frames were looked at
        self._in_wal: dict[int, int] = {}  # page -> its newest frame, for pages not back in the file
        self._window: _Window | None = None  # set while the snapshot is let go
        self.blocked = False  # the last step met a reader that kept the WAL

    def close(self) -> None:
        for conn in (self._r, self._w):
            with suppress(sqlite3.Error):
                conn.close()
        if self._lock >= 0:
            os.close(self._lock)  # the scrub lock's own file: SQLite keeps no lock on it
            self._lock = -1

    # ─── steps ─────────────────────────────────────────────────────────────────────────────

    def step(self, budget_s: float) -> bool:
        """Scrub for about ``budget_s`` seconds (at least one write transaction), or until a
        reader on an old snapshot keeps the WAL from being started over (``blocked``); True
        once done. Raises sqlite3.OperationalError when the file stays busy (the caller tries
        again later), Unreadable when a page does not add up (the caller falls back to VACUUM)."""
        started = time.monotonic()
        self.blocked = False
        try:
            while True:
                if self.progress.chunks:
                    time.sleep(max(self.pause_s, self._last_hold))  # other writers' turn
                if self._next <= self._page_count or self._fresh:
                    self._sweep_chunk()
                    caught_up = True
                elif self._drain_chunk():
                    return True
                else:
                    # What others wrote since the last step, done back to back with no write of
                    # this process's in between, up to ten times the budget: a daemon writing
                    # between every step would otherwise keep the last chunk from ever being quiet.
                    caught_up = time.monotonic() - started >= 10 * budget_s
                if self.blocked or (caught_up and time.monotonic() - started >= budget_s):
                    return False
        finally:
            self.progress.seconds = time.perf_counter() - self._started

    def _sweep_chunk(self) -> None:
        with self._write_lock():
            self._look()
            free = self._free_list()
            started, page = time.perf_counter(), self._next
            end = min(page + self.chunk_pages, self._page_count + 1)
            while page < end:
                self._scrub_page(page, free)
                page += 1
                if time.perf_counter() - started >= CHUNK_S:
                    break
            self._next = page
            self._hold_snapshot()
        self._copy_back()

    def _drain_chunk(self) -> bool:
        """The pages written meanwhile, once the WAL is started over and they are back in the
        file. True when none is left: every page in the file is then done, and a write from
        then on starts from those pages (the last write of this step makes every connection
        read its pages anew), so it brings back nothing erased."""
        with self._write_lock():
            self._look()
            empty = self._salt is None
            if empty:
                # A frame of the scrub's own, so that the generation the RESTART ends has a salt
                # known to the next look: a generation begun on an empty WAL has none to compare.
                self._w.execute("UPDATE archiver_scrub SET steps = steps + 1")
            self._hold_snapshot()
        if empty:
            # The snapshot began before that frame and keeps it from being copied back, so the
            # WAL cannot be started over meanwhile: its header is the one that frame wrote, and
            # that frame comes first.
            self._wal = os.open(f"{self.path}-wal", os.O_RDONLY)
            try:
                self._salt = wal_salt(self._wal)
                if self._salt is not None:
                    ours = wal_frames(self._wal, self.page_size, self._salt, 0)
                    self._seen = next((i + 1 for i, page, size in ours if page == self.keep and size), 0)
            finally:
                os.close(self._wal)
                self._wal = -1
        self._copy_back()
        self._r.execute("COMMIT")
        assert self._window is None
        busy, frames = self._restart_wal()
        self._window = _Window(self._salt, self._seen, max(frames, 0), restarted=not busy)
        self.blocked = bool(busy)  # a reader on an old snapshot: what can be done now, then later
        with self._write_lock():
            self.covered_until = time.time()
            self._look()
            free = self._free_list()
            self._todo |= (free[0].keys() | free[1]) - self._free_done  # freed meanwhile, never written
            batch = [self._todo.pop() for _ in range(min(len(self._todo), self.chunk_pages))]
            started = time.perf_counter()
            for i, page in enumerate(batch):
                if time.perf_counter() - started >= CHUNK_S:
                    self._todo.update(batch[i:])
                    break
                self._scrub_page(page, free)
            # A write that starts after this one reads its pages anew: no copy cached from before
            # a page was zeroed is ever written back.
            self._w.execute("UPDATE archiver_scrub SET steps = steps + 1")
            self._hold_snapshot()
        return not busy and not self._todo and self._next > self._page_count  # (a lost track starts a pass)

    # ─── the write lock, the snapshot that keeps the WAL, the looks at the WAL ───────────────

    def _copy_back(self) -> None:
        """Copy the frames the snapshot covers into the file (a PASSIVE checkpoint: no lock that
        desto's writes wait for), so starting the WAL over later copies little while it holds
        the write lock."""
        self._w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _restart_wal(self) -> tuple[int, int]:
        """A RESTART checkpoint, without waiting: (busy, frames in the WAL)."""
        busy, frames, _ = self._w.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return int(busy), int(frames)

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        begin_immediate(self._w, self.busy_timeout)
        held = time.perf_counter()
        try:
            named, opened = os.stat(self.path), os.fstat(self.fd)
            if (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
                raise Unsupported("the path names another file than the one the archiver holds")
            try:
                self._wal = os.open(f"{self.path}-wal", os.O_RDONLY)
            except FileNotFoundError:
                self._wal = -1
            self._page_count = int(self._w.execute("PRAGMA page_count").fetchone()[0])
            if self._page_count >= _MAX_PAGES:
                raise Unsupported(f"{self._page_count} pages")
            yield
            self._w.execute("COMMIT")
        except BaseException:
            self._w.execute("ROLLBACK")
            raise
        finally:
            if self._wal >= 0:
                os.close(self._wal)  # SQLite keeps no POSIX lock on the WAL file itself
                self._wal = -1
            self._last_hold = time.perf_counter() - held
            self.progress.chunks += 1
            self.progress.longest_lock_s = max(self.progress.longest_lock_s, self._last_hold)
        if self._dirty:
            # The zeroes on disk before the scrub says it is done; no lock needed for that.
            os.fdatasync(self.fd)
            self._dirty = False

    def _hold_snapshot(self) -> None:
        """Under the write lock: a read transaction from now until the next look. While a reader
        holds a snapshot the WAL is never started over, so every frame written meanwhile is
        still there to be seen."""
        if self._r.in_transaction:
            self._r.execute("COMMIT")
        self._r.execute("BEGIN")
        self._r.execute("SELECT steps FROM archiver_scrub").fetchone()
        self._window = None

    def _look(self) -> bool:
        """Under the write lock: the pages written since the last look go to do again, and
        ``_in_wal`` names those whose newest version is a frame. Returns whether any was found;
        starts the pass again when a frame could have been missed."""
        salt = wal_salt(self._wal)
        window, self._window = self._window, None
        found: list[int] = []
        if self._fresh:  # nothing done yet: only where the newest versions are matters
            self._salt, self._seen, self._in_wal = salt, 0, {}
            if salt is not None:
                self._read_frames(salt, 0)
            self._fresh = False
            return False
        if window is None:
            # The snapshot was held: the WAL may have been started over only with every frame
            # seen and back in the file.
            if salt is not None and salt == self._salt:
                found = self._read_frames(salt, self._seen)
            else:
                self._salt, self._seen, self._in_wal = salt, 0, {}
                found = self._read_frames(salt, 0) if salt is not None else []
        elif salt == window.salt:  # no new generation since
            if salt is None and window.frames:
                return self._lost()  # frames came, then the WAL was emptied by another program
            found = self._read_frames(salt, self._seen) if salt is not None else []
            if window.restarted:
                self._in_wal = {}
        elif window.salt is None:
            # The WAL was empty at the last look. A generation begun after the RESTART is whole;
            # one begun before it may have been started over since, its first frames unseen.
            if window.frames:
                return self._lost()
            assert salt is not None
            self._salt, self._seen, self._in_wal = salt, 0, {}
            found = self._read_frames(salt, 0)
        elif salt is not None and salt[0] == (window.salt[0] + 1) & 0xFFFFFFFF:
            # Started over once, by the first write after the RESTART (or another program's
            # TRUNCATE): the old generation's frames not looked at yet, if any, must have been
            # left there, not written over.
            old: list[int] = []
            if not (window.restarted and window.frames <= window.seen):
                if sum(1 for _ in wal_frames(self._wal, self.page_size, salt, 0)) > window.seen:
                    return self._lost()
                old = [page for _, page, _ in wal_frames(self._wal, self.page_size, window.salt, window.seen)]
                if len(old) < window.frames - window.seen:
                    return self._lost()
            self._salt, self._seen, self._in_wal = salt, 0, {}
            found = old + self._read_frames(salt, 0)
        else:
            return self._lost()
        found = [page for page in found if page != self.keep]  # the scrub's own writes
        for page in found:
            self._todo.add(page)
            self._free_done.discard(page)
        return bool(found)

    def _lost(self) -> bool:
        """Frames written while the snapshot was let go may have been overwritten unseen: the
        pages done so far may have been written again, so the pass starts over."""
        passes = self.progress.passes
        self._new_pass()
        self.progress.passes = passes + 1
        self._look()
        return True

    def _read_frames(self, salt: tuple[int, int], start: int) -> list[int]:
        """The pages of the committed frames from ``start`` on (frames of a transaction not
        committed yet, or rolled back, are not the database's)."""
        pending: list[tuple[int, int]] = []
        pages: list[int] = []
        for index, page, size in wal_frames(self._wal, self.page_size, salt, start):
            pending.append((index, page))
            if size:
                for i, p in pending:
                    self._in_wal[p] = i
                    pages.append(p)
                pending = []
                self._seen = index + 1
        self._salt = salt
        return pages

    # ─── pages ─────────────────────────────────────────────────────────────────────────────

    def _current(self, page: int, size: int) -> bytes:
        """The first ``size`` bytes of a page's newest version: its frame in the WAL, else the file's."""
        frame = self._in_wal.get(page)
        if frame is not None:
            return os.pread(self._wal, size, WAL_HEADER + frame * (FRAME_HEADER + self.page_size) + FRAME_HEADER)
        return os.pread(self.fd, size, (page - 1) * self.page_size)

    def _free_list(self) -> Free:
        """The free list as it is now; Unreadable when it does not add up."""
        trunk, count = struct.unpack_from(">II", self._current(1, 40), 32)
        trunks: dict[int, int] = {}
        leaves: set[int] = set()
        while trunk:
            if not 1 < trunk <= self._page_count or trunk in trunks:
                raise Unreadable(f"free list trunk page {trunk}")
            data = self._current(trunk, self.usable)
            following, n = struct.unpack_from(">II", data)
            if n > self.usable // 4 - 2:
                raise Unreadable(f"free list trunk page {trunk}: {n} leaves")
            trunks[trunk] = n
            leaves.update(struct.unpack_from(f">{n}I", data, 8))
            trunk = following
        if len(trunks) + len(leaves) != count or any(not 1 < p <= self._page_count for p in leaves):
            raise Unreadable(f"free list of {count} pages")
        return trunks, leaves

    def _special(self, page: int) -> bool:
        """The lock-byte page (never written), the pointer-map pages of an auto-vacuum file, and
        the page the scrub writes itself."""
        if page in (self._lock_page, self.keep):
            return True
        if not self._autovacuum or page < 2:
            return False
        per = self.usable // 5 + 1
        first = (page - 2) // per * per + 2
        if first == self._lock_page:
            first += 1
        return first == page

    def _scrub_page(self, page: int, free: Free) -> None:
        if page > self._page_count or self._special(page):
            return
        if page in self._in_wal:
            self._todo.add(page)  # its newest version is a frame: once it is back in the file
            return
        self.progress.pages += 1
        trunks, leaves = free
        if page in leaves or page in trunks:
            start = 8 + 4 * trunks[page] if page in trunks else 0
            self._zero(page, [(start, self.usable)])
            self._free_done.add(page)
            return
        self._free_done.discard(page)
        data = os.pread(self.fd, self.page_size, (page - 1) * self.page_size)
        hdr = 100 if page == 1 else 0
        if data[hdr] not in BTREE_PAGES:
            return  # an overflow page: its owner's cell says where its payload ends
        layout = layout_of(data, hdr, self.usable)
        ranges: list[tuple[int, int]] = []
        quiet = not layout.fragmented and all(data[a:b].count(0) == b - a for a, b in layout.quick_ranges())
        if not quiet or chains_of(data, layout, self.usable):
            # Something to zero, here or past a chain's payload: every byte of the page accounted
            # for first, so that no write can touch a byte in use. (Most pages: neither.)
            ranges, chains = free_space(data, hdr, self.usable)
        else:
            chains = []
        tails = [self._tail(first, length) for first, length in chains]
        if ranges:
            self._zero(page, ranges, data)
        for tail in tails:
            if tail is None:
                self._todo.add(page)  # a chain's last page is in the WAL: its tail later
            else:
                self._zero(tail[0], [(tail[1], self.usable)])

    def _tail(self, first: int, length: int) -> tuple[int, int] | None:
        """(page, offset) where an overflow chain's payload ends, or None while that page's
        newest version is in the WAL."""
        room = self.usable - 4
        page, hops = first, 0
        while True:
            if not 1 < page <= self._page_count or hops > self._page_count:
                raise Unreadable(f"overflow chain at page {page}")
            following = int.from_bytes(self._current(page, 4), "big")
            if length <= room:
                if following:
                    raise Unreadable(f"overflow chain longer than its payload at page {page}")
                return None if page in self._in_wal else (page, 4 + length)
            length -= room
            page, hops = following, hops + 1

    def _zero(self, page: int, ranges: list[tuple[int, int]], data: bytes | None = None) -> None:
        """Zero the ranges of a page that are not zero yet, in one write of the page: its other
        bytes are written back as they were, so even a write torn by a crash changes none."""
        base = (page - 1) * self.page_size
        if data is None:
            data = os.pread(self.fd, self.page_size, base)
        zeroed = bytearray(data)
        for start, end in ranges:
            if data[start:end].count(0) != end - start:
                zeroed[start:end] = bytes(end - start)
                self.progress.zeroed_bytes += end - start
        if zeroed != data:
            os.pwrite(self.fd, zeroed, base)
            self._dirty = True


def truncate_wal(conn: sqlite3.Connection, attempts: int = 20) -> bool:
    """Start the WAL over and empty it (a TRUNCATE checkpoint), so no older page image survives
    there. Without a busy timeout: a reader on an old snapshot would hold each try for all of
    it. False when readers or another checkpoint kept the WAL through ``attempts`` tries 50 ms
    apart."""
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.05)
            if conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                return True
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
