"""SQLite's file format, as far as the scrub needs it (https://sqlite.org/fileformat2.html): the
free bytes of a b-tree page, the overflow chains of its cells, and the frames of the WAL. Pure
reads of bytes: nothing here writes a file."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

BTREE_PAGES = frozenset({2, 5, 10, 13})  # index interior, table interior, index leaf, table leaf
WAL_HEADER, FRAME_HEADER = 32, 24
_WAL_MAGIC = (0x377F0682, 0x377F0683)


class Unreadable(Exception):
    """A page (or the free list) whose layout does not add up: left alone."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


@dataclass
class Layout:
    """What a b-tree page's header and free-block chain say, checked for bounds."""

    kind: int
    pointers_end: int
    pointers: tuple[int, ...]  # cell offsets
    freeblocks: list[tuple[int, int]]
    content: int  # where the cell content area starts
    fragmented: int  # bytes in fragments of up to three bytes

    def quick_ranges(self) -> list[tuple[int, int]]:
        """The gap and the freeblocks past their 4-byte headers: free without a look at a cell."""
        gap = [(self.pointers_end, self.content)] if self.pointers_end < self.content else []
        return gap + [(start + 4, end) for start, end in self.freeblocks if end > start + 4]


def layout_of(page: bytes, hdr: int, usable: int) -> Layout:
    kind = page[hdr]
    if kind not in BTREE_PAGES:
        raise Unreadable(f"page type {kind}")
    header = 8 if kind in (10, 13) else 12
    first_free, cells, content, fragmented = struct.unpack_from(">HHHB", page, hdr + 1)
    content = content or 65536
    pointers_end = hdr + header + 2 * cells
    if pointers_end > content or content > usable:
        raise Unreadable("header")
    pointers = struct.unpack_from(f">{cells}H", page, hdr + header)
    if cells and not (content <= min(pointers) and max(pointers) < usable):
        raise Unreadable("cell pointer")
    freeblocks = []
    at = first_free
    while at:
        if not content <= at <= usable - 4:
            raise Unreadable("freeblock")
        following, size = struct.unpack_from(">HH", page, at)
        if size < 4 or at + size > usable or (following and following < at + size):
            raise Unreadable("freeblock chain")
        freeblocks.append((at, at + size))
        at = following
    return Layout(kind, pointers_end, pointers, freeblocks, content, fragmented)


def _cell(page: bytes, start: int, kind: int, usable: int) -> tuple[int, tuple[int, int] | None]:
    """A cell's size on its page, and its overflow chain (first page, payload bytes on it) if any."""
    at = start
    if kind == 5:  # child page number, then the rowid
        _, at = _varint(page, at + 4)
        return at - start, None
    if kind == 2:
        at += 4  # child page number
    payload = page[at]
    if payload < 0x80:
        at += 1
    else:
        payload, at = _varint(page, at)
    if kind == 13:
        _, at = _varint(page, at)  # rowid
        max_local = usable - 35
    else:
        max_local = (usable - 12) * 64 // 255 - 23
    if payload <= max_local:
        return max(at - start + payload, 4), None
    min_local = (usable - 12) * 32 // 255 - 23
    local = min_local + (payload - min_local) % (usable - 4)
    if local > max_local:
        local = min_local
    size = at - start + local + 4
    if start + size > usable:
        raise Unreadable("cell size")
    return size, (int.from_bytes(page[start + size - 4 : start + size], "big"), payload - local)


def chains_of(page: bytes, layout: Layout, usable: int) -> list[tuple[int, int]]:
    """The overflow chains of a page's cells (first page, payload bytes on them)."""
    if layout.kind == 5:
        return []
    lead = 4 if layout.kind == 2 else 0
    limit = usable - 35 if layout.kind == 13 else (usable - 12) * 64 // 255 - 23
    chains = []
    for start in layout.pointers:
        first = page[start + lead]
        # a payload of one or two varint bytes that fits on the page: no chain (most cells)
        if first < 0x80 or (page[start + lead + 1] < 0x80 and ((first & 0x7F) << 7 | page[start + lead + 1]) <= limit):
            continue
        chain = _cell(page, start, layout.kind, usable)[1]
        if chain is not None:
            chains.append(chain)
    return chains


def free_space(page: bytes, hdr: int, usable: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The free bytes of a b-tree page, as ranges to zero (the gap, freeblocks past their 4-byte
    headers, fragments), and its cells' overflow chains (first page, payload bytes on them).
    Raises Unreadable unless cells, freeblocks and fragments account for every byte exactly as
    the page's header says: then no range can touch a byte in use."""
    layout = layout_of(page, hdr, usable)
    used: list[tuple[int, int]] = []
    chains: list[tuple[int, int]] = []
    for start in layout.pointers:
        size, chain = _cell(page, start, layout.kind, usable)
        used.append((start, start + size))
        if chain is not None:
            chains.append(chain)
    ranges = layout.quick_ranges()
    position, fragments = layout.content, 0
    for start, end in sorted(used + layout.freeblocks):
        if start < position:
            raise Unreadable("overlapping cells")
        if start > position:
            ranges.append((position, start))
            fragments += start - position
        position = end
    if position < usable:
        ranges.append((position, usable))
        fragments += usable - position
    if fragments != layout.fragmented:
        raise Unreadable(f"{fragments} fragmented bytes, the header says {layout.fragmented}")
    return ranges, chains


def wal_salt(fd: int) -> tuple[int, int] | None:
    """The salt of the WAL's generation (None: no WAL header, an empty WAL)."""
    if fd < 0:
        return None
    head = os.pread(fd, WAL_HEADER, 0)
    if len(head) < WAL_HEADER or struct.unpack_from(">I", head)[0] not in _WAL_MAGIC:
        return None
    salt1, salt2 = struct.unpack_from(">II", head, 16)
    return salt1, salt2


def wal_frames(fd: int, page_size: int, salt: tuple[int, int], start: int) -> Iterator[tuple[int, int, int]]:
    """(index, page, database size: non-zero on a commit) of the frames of generation ``salt``
    from ``start`` on, until one of another generation or the end of the file."""
    step = FRAME_HEADER + page_size
    index = start
    while fd >= 0:
        head = os.pread(fd, FRAME_HEADER, WAL_HEADER + index * step)
        if len(head) < FRAME_HEADER:
            return
        page, size, salt1, salt2 = struct.unpack_from(">IIII", head)
        if (salt1, salt2) != salt:
            return
        yield index, page, size
        index += 1
