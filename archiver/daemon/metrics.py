"""Prometheus metrics for the daemon (off unless ARCHIVER_METRICS_PORT is set: only then is this
module, and prometheus_client with it, imported).

Counters are read from the daemon's own totals when Prometheus scrapes, so the hot path pays
nothing for them; only the batch latency histogram is observed per batch.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from archiver.daemon.snapshot import FAILING_OPERATIONS, Snapshot, build_info
from archiver.kinds import KINDS

PREFIX = "desto_archiver"
__all__ = ["Metrics", "MetricsServer", "Snapshot", "build_info"]


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
        yield _counter(
            "quarantine_not_kept",
            "Rejected records not kept: the quarantine had reached ARCHIVER_QUARANTINE_MAX_BYTES (each key once)",
            s.quarantine_not_kept,
        )
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
        yield _counter(
            "read_failures",
            "Failed reads from Redis: unreachable, or answering BUSY, LOADING, MASTERDOWN... (each is retried)",
            s.read_failures,
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
        self._server: MetricsServer | None = None

    def serve(self, host: str, port: int) -> None:
        self._server = MetricsServer(host, port, lambda: generate_latest(self.registry))
        self._server.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


class MetricsServer(threading.Thread):
    """The metrics over HTTP, from one thread that waits on every connection at once.

    A connection costs a file descriptor and its request's bytes until it has sent a whole
    request, never a thread: a flood of idle connections (the port may listen on every address)
    cannot grow the daemon nor hold up a scrape. One that sends no whole request within IDLE_S
    is closed, and so is the oldest when MAX_CONNECTIONS are open and another comes. Each answer
    is the whole exposition, and the connection is closed after it (HTTP/1.0)."""

    IDLE_S = 5.0
    MAX_CONNECTIONS = 128
    MAX_REQUEST = 8192  # bytes of a request line and its headers
    SEND_TIMEOUT_S = 2.0

    def __init__(self, host: str, port: int, exposition: Callable[[], bytes]) -> None:
        super().__init__(name="archiver-metrics", daemon=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self._exposition = exposition
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._open: dict[socket.socket, tuple[float, bytearray]] = {}  # insertion order: oldest first
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()  # a stop ends the wait at once
        self._selector.register(self._wake_read, selectors.EVENT_READ)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        self.join(timeout=2)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                # asleep until a connection or a request comes, or the oldest open one is idle too long
                oldest = next(iter(self._open.values()), None)
                timeout = None if oldest is None else max(0.0, oldest[0] + self.IDLE_S - time.monotonic())
                for key, _ in self._selector.select(timeout=timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._wake_read:
                        self._receive(key.fileobj)  # type: ignore[arg-type]
                self._close_idle(time.monotonic() - self.IDLE_S)
        finally:
            for conn in list(self._open):
                self._close(conn)
            self._selector.close()
            self._listener.close()
            self._wake_read.close()
            self._wake_write.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, say: the connection waits in the backlog
                return
            if len(self._open) >= self.MAX_CONNECTIONS:
                self._close(next(iter(self._open)))
            conn.setblocking(False)
            self._open[conn] = (time.monotonic(), bytearray())
            self._selector.register(conn, selectors.EVENT_READ)

    def _receive(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        request = self._open[conn][1]
        request += data
        if b"\r\n\r\n" not in request and b"\n\n" not in request:
            if len(request) > self.MAX_REQUEST:
                self._answer(conn, b"431 Request Header Fields Too Large", b"", b"text/plain")
            return
        method = bytes(request.split(b" ", 1)[0])
        if method in (b"GET", b"HEAD"):
            try:
                body = self._exposition()
            except Exception as exc:  # a bug in a collector: this scrape fails, the server stays
                self._answer(conn, b"500 Internal Server Error", repr(exc).encode(), b"text/plain")
                return
            self._answer(conn, b"200 OK", b"" if method == b"HEAD" else body, CONTENT_TYPE_LATEST.encode(), len(body))
        else:
            self._answer(conn, b"405 Method Not Allowed", b"", b"text/plain")

    def _answer(self, conn: socket.socket, status: bytes, body: bytes, content_type: bytes, length: int = 0) -> None:
        head = b"HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            status,
            content_type,
            length or len(body),
        )
        self._selector.unregister(conn)
        del self._open[conn]
        try:
            conn.settimeout(self.SEND_TIMEOUT_S)  # a few kB: the socket's buffer takes them at once
            conn.sendall(head + body)
        except OSError:
            pass
        finally:
            conn.close()

    def _close_idle(self, before: float) -> None:
        for conn, (opened, _) in list(self._open.items()):
            if opened >= before:
                break  # the rest are younger
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._open[conn]
        conn.close()
