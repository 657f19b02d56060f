"""What the daemon reports of itself (its totals, its state), read by the status file, ``stats``,
the start log line and, when they are served, the Prometheus metrics."""

from __future__ import annotations

import platform
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import redis

from archiver import __version__

FAILING_OPERATIONS = ("sqlite", "redis")  # what the daemon's ``failing`` state may name


@dataclass
class Snapshot:
    """What the daemon reports at scrape time."""

    events: int = 0
    keys_read: int = 0
    written: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    quarantine_not_kept: int = 0
    tombstones: int = 0
    erased: int = 0
    erased_not_written: int = 0
    reconciles: int = 0
    missed_changes: dict[str, int] = field(default_factory=dict)  # found by reconciles, no notification named
    missed_streak: int = 0  # measured reconciles in a row, up to the last, that found missed changes
    reconnects: int = 0
    lag_s: float = 0.0
    pending: int = 0
    subscribed: bool = False
    failing: str | None = None  # "sqlite" or "redis" while the daemon retries it
    write_failures: int = 0
    read_failures: int = 0
    ship: dict[str, Any] | None = None  # the shipper's status (ShipperThread.status), when shipping


def build_info() -> dict[str, str]:
    """What is running: this archiver's version and those of Python, SQLite and redis-py under it
    (the start log line says the same)."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "redis_py": redis.__version__,
    }
