"""``python -m bench.rewrite_cost``: what ``secure_delete`` costs the daemon's rewrites.

The archiver's connection deletes with ``secure_delete`` on (archiver/archive/erase.py), and every rewrite
of a row (a heartbeat) frees its old cell, which SQLite then overwrites with zeros. This writes
``--rows`` session records through the daemon's write path, then rewrites each twice with a new
heartbeat, timing only the rewrites, with ``secure_delete`` off and on in turn, ``--rounds`` times.

    .venv/bin/python -m bench.rewrite_cost --rows 50000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from archiver.archive.store import Store
from archiver.daemon.archive_file import DAEMON_CACHE_MB
from archiver.daemon.reconcile import write_batch
from bench.write_cost import outcomes

_HEARTBEAT = 6  # its place in COLUMNS[Kind.SESSION]


def measure(path: Path, rows: int, secure_delete: bool, per_transaction: int = 8000) -> float:
    """Microseconds per rewritten row."""
    store = Store.open(path, cache_mb=DAEMON_CACHE_MB)
    try:
        store.conn.execute(f"PRAGMA secure_delete = {'ON' if secure_delete else 'OFF'}")
        at = time.time_ns() // 1000
        for start in range(0, rows, per_transaction):
            write_batch(store, outcomes(start, min(per_transaction, rows - start), at))
        took = 0.0
        for second in (1, 2):
            at += 10_000_000
            for start in range(0, rows, per_transaction):
                batch = outcomes(start, min(per_transaction, rows - start), at)
                for row in batch:
                    values = row.values  # type: ignore[union-attr]
                    row.values = (*values[:_HEARTBEAT], f"2026-11-27T05:00:{second:02d}.000000", *values[7:])  # type: ignore[union-attr]
                started = time.perf_counter()
                write_batch(store, batch)
                took += time.perf_counter() - started
        return took / (2 * rows) * 1e6
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rewrite_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    for round_ in range(1, args.rounds + 1):
        for secure_delete in (False, True):
            with tempfile.TemporaryDirectory(prefix="rewrite-cost-") as folder:
                us = measure(Path(folder) / "desto.db", args.rows, secure_delete)
            print(f"round {round_}, secure_delete {'on ' if secure_delete else 'off'}: {us:.1f} µs per rewritten row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
