"""Queries every reader and writer of the file shares."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any


def select_in(conn: sqlite3.Connection, query: str, values: Sequence[Any], size: int = 512) -> Iterator[Any]:
    """The rows of ``query`` (ending in ``IN``) for every one of ``values``, asked ``size`` at a
    time: SQLite builds limit a statement's parameters (999 before 3.32, 32,766 since).

    Each list is padded to a power of two with its last value (a repeat changes nothing in an IN
    list), so a query has at most ten texts. With one text per length, the connection's cache
    of prepared statements filled up with one of each batch size the daemon met, megabytes of
    them, each prepared again and again as they pushed each other out."""
    for start in range(0, len(values), size):
        chunk = list(values[start : start + size])
        padded = 1 << (len(chunk) - 1).bit_length()
        chunk.extend(chunk[-1:] * (padded - len(chunk)))
        yield from conn.execute(f"{query} ({', '.join('?' * padded)})", chunk)
