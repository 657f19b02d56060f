"""Prometheus metrics for the daemon (off unless ARCHIVER_METRICS_PORT is set).

Counters are read from the daemon's own totals when Prometheus scrapes, so the hot path pays
nothing for them; only the batch latency histogram is observed per batch.
"""

from __future__ import annotations

import platform
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from archiver import __version__
from archiver.kinds import KINDS

PREFIX = "desto_archiver"
FAILING_OPERATIONS = ("sqlite", "redis")  # what the daemon's ``failing`` state may name


@dataclass
class Snapshot:
    """What the daemon reports at scrape time."""

    events: int = 0
    keys_read: int = 0
    written: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
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


class _DaemonCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        info = build_info()
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info", "Always 1; its labels say which versions run", labels=list(info)
        )
        build.add_metric(list(info.values()), 1)
        yield build
        s = self._snapshot()
        yield _counter("events_received", "Keyspace notifications and desto messages received", s.events)
        yield _counter("keys_read", "Keys read from Redis", s.keys_read)
        rows = CounterMetricFamily(
            f"{PREFIX}_rows_written", "Rows inserted or changed, by record kind", labels=["kind"]
        )
        for kind in KINDS:
            rows.add_metric([kind.value], s.written.get(kind.value, 0))
        yield rows
        yield _counter("quarantined", "Records put in quarantine", s.quarantined)
        yield _counter("tombstones", "Records marked as gone from Redis", s.tombstones)
        yield _counter("erased", "Erasures finished (desto's History tab, forget, retention)", s.erased)
        yield _counter("erased_not_written", "Reads of erased records, not written", s.erased_not_written)
        yield _counter("reconciles", "Full reconciles completed", s.reconciles)
        missed = CounterMetricFamily(
            f"{PREFIX}_missed_changes",
            "Records a reconcile found changed or gone that no notification had named, by record kind",
            labels=["kind"],
        )
        for kind in KINDS:
            missed.add_metric([kind.value], s.missed_changes.get(kind.value, 0))
        yield missed
        yield GaugeMetricFamily(
            f"{PREFIX}_missed_changes_streak",
            "Reconciles in a row, up to the last, that found changes no notification had named",
            value=s.missed_streak,
        )
        yield _counter("reconnects", "Reconnections to Redis", s.reconnects)
        yield GaugeMetricFamily(f"{PREFIX}_lag_seconds", "Age of the oldest change not yet archived", value=s.lag_s)
        yield GaugeMetricFamily(f"{PREFIX}_pending_keys", "Keys waiting to be read", value=s.pending)
        yield GaugeMetricFamily(f"{PREFIX}_redis_subscribed", "1 while subscribed to Redis", value=int(s.subscribed))
        yield _counter(
            "write_failures", "Failed attempts to write a batch to the archive (each is retried)", s.write_failures
        )
        failing = GaugeMetricFamily(
            f"{PREFIX}_failing",
            "1 while the daemon's operations on this side fail and are retried",
            labels=["operation"],
        )
        for operation in FAILING_OPERATIONS:
            failing.add_metric([operation], int(s.failing == operation))
        yield failing
        if s.ship is not None:
            ship = s.ship
            yield _counter("ship_entries_shipped", "Changes shipped to PostgreSQL", ship["shipped"])
            yield _counter("ship_copies", "Whole copies of the file made into PostgreSQL", ship["copies"])
            yield GaugeMetricFamily(
                f"{PREFIX}_ship_backlog",
                "Changes in the file not yet in PostgreSQL (NaN until the first batch)",
                value=float("nan") if ship["backlog"] is None else ship["backlog"],
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_ship_failing",
                "1 while shipping to PostgreSQL fails or has stopped",
                value=int(bool(ship["failing"] or ship["refused"])),
            )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DaemonCollector(snapshot))
        self.batch_seconds = Histogram(
            f"{PREFIX}_batch_seconds",
            "Time to read, normalize and write one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._server: Any = None

    def serve(self, host: str, port: int) -> None:
        self._server = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)
            self._server = None
