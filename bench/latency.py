"""3. Change-to-row latency: from a desto HSET to the row being visible to a reader of the archive.

One daemon (``python -m archiver run``, shipped defaults: flush interval 0.05 s, batch 500) and
one archive file serve three rates in turn, 100, 1 000 and 10 000 changes/s, for 10 s each
(smoke: 1 s). The writer process (``python -m bench.writer``) stamps each hash with the wall time
of its send (``last_heartbeat``, desto's ISO form, to the microsecond). A separate reader (this
process, a read-only SQLite connection) polls every 1 ms for rows it has not seen
(``rowid > last``); a row's latency is the start of the poll that first returned it minus its
stamp. The poll's start is the moment its snapshot was taken, so a latency is exact to within
one poll period (reported too).

Baseline: the **notification floor**, measured in the same trial for the same changes: a
subscriber in this process listens on the keyspace channel of every 16th key and records when
each notification arrives; floor latency = arrival minus the same stamp. No archiver fed by
keyspace notifications can show a row before its notification arrives, so the ratio (latency /
floor, percentile by percentile) says how much of the latency is the archiver's own.

Targets (at 1 000 changes/s): p50 ≤ 20 ms, p99 ≤ 100 ms, on the values. The reader waits up to
60 s after the last send for the last rows, so a rate above what the daemon sustains still
yields its whole (growing) latency distribution; a change not seen by then is reported.
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import datetime
from typing import Any

import redis

from bench.common import Context, DaemonProcess, Figure, Target, WriterProcess, percentile, ro_connect
from tests.redis_server import RedisServer

NAME = "latency"
RATES = (100, 1_000, 10_000)
POLL_S = 0.001
SETTLE_S = 60.0  # the longest the reader waits, after the last send, for the last rows
_PREFIX = b"__keyspace@0__:desto:session:"


class NotificationFloor(threading.Thread):
    """Records when the keyspace notification of each sampled key reaches a subscriber."""

    def __init__(self, server: RedisServer, tag: str) -> None:
        super().__init__(name="notification-floor", daemon=True)
        self.client = redis.Redis(port=server.port, decode_responses=False, socket_timeout=10)
        self.pubsub = self.client.pubsub()
        # record ids are "%08x-<tag>-..." with i * an odd number first: its last hex digit is 0 for every 16th i
        self.pubsub.psubscribe(_PREFIX + b"???????0-" + tag.encode() + b"-*")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "psubscribe":
                break
        else:
            raise RuntimeError("the notification subscriber was not confirmed")
        self.arrivals: dict[str, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        arrivals = self.arrivals
        while not self._stop_event.is_set():
            message = self.pubsub.get_message(timeout=0.05)
            if message is not None and message["type"] == "pmessage":
                now = time.time()
                arrivals.setdefault(message["channel"][len(_PREFIX) :].decode(), now)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)
        self.pubsub.close()
        self.client.close()


def stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def percentiles_ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": percentile(values, 50) * 1000,
        "p95": percentile(values, 95) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": (values[-1] * 1000) if values else float("nan"),
    }


def measure(
    ctx: Context, server: RedisServer, daemon: DaemonProcess, rate: int, seconds: float, after_rowid: int
) -> tuple[dict[str, Any], int]:
    tag = ctx.tag()
    ctx.log(f"latency: {rate:,} changes/s for {seconds:g} s")
    floor = NotificationFloor(server, tag)
    floor.start()
    conn = ro_connect(daemon.db_path)
    seen: dict[str, float] = {}
    stamps: dict[str, str] = {}
    polls: list[float] = []
    last = after_rowid
    result: dict[str, Any] | None = None
    try:
        writer = WriterProcess(ctx, server.port, rate, seconds, tag)
        while True:
            t = time.time()
            rows = conn.execute(
                "SELECT rowid, session_id, last_heartbeat FROM sessions WHERE rowid > ? ORDER BY rowid", (last,)
            ).fetchall()
            polls.append(t)
            for rowid, session_id, heartbeat in rows:
                seen.setdefault(session_id, t)
                stamps[session_id] = heartbeat
                last = rowid
            if result is None and not writer.running():
                result = writer.result()
            if result is not None and (len(seen) >= result["sent"] or t > result["wall_last"] + SETTLE_S):
                break
            time.sleep(POLL_S)
    finally:
        conn.close()
        floor.stop()
    latencies = [seen[sid] - stamp(stamps[sid]) for sid in seen]
    floors = [arrived - stamp(stamps[sid]) for sid, arrived in floor.arrivals.items() if sid in stamps]
    periods = sorted(b - a for a, b in itertools.pairwise(polls))
    out = {
        "rate": rate,
        "seconds": seconds,
        "sent": result["sent"],
        "achieved_rate": result["achieved_rate"],
        "seen": len(seen),
        "lost": result["sent"] - len(seen),
        "latency_ms": percentiles_ms(latencies),
        "floor_samples": len(floors),
        "floor_ms": percentiles_ms(floors),
        "poll_period_ms": percentile(periods, 50) * 1000 if periods else None,
        "polls": len(polls),
    }
    lat = out["latency_ms"]
    ctx.log(
        f"latency: {rate:,}/s p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms "
        f"(floor p50 {out['floor_ms']['p50']:.2f} ms; {out['lost']} not archived in time)"
    )
    return out, last


def run(ctx: Context) -> None:
    seconds = 1.0 if ctx.smoke else 10.0
    runs: list[dict[str, Any]] = []
    with ctx.redis(NAME) as server, DaemonProcess(ctx, server, ctx.fresh_dir(NAME)) as daemon:
        daemon.start()
        last = 0
        for rate in RATES:
            out, last = measure(ctx, server, daemon, rate, seconds, last)
            runs.append(out)
        exit_code = daemon.stop()
        problems = daemon.problems()
    ctx.details[NAME] = {"runs": runs, "daemon_exit_code": exit_code, "daemon_problems": problems}
    for out in runs:
        rate = out["rate"]
        for q in ("p50", "p95", "p99"):
            targets = []
            if rate == 1_000 and q == "p50":
                targets = [Target("value", "<=", 20.0)]
            elif rate == 1_000 and q == "p99":
                targets = [Target("value", "<=", 100.0)]
            ctx.add(
                Figure(
                    NAME,
                    f"{q} at {rate:,} changes/s",
                    out["latency_ms"][q],
                    "ms",
                    baseline=out["floor_ms"][q],
                    baseline_name="notification floor",
                    targets=targets,
                    note=f"{out['lost']} of {out['sent']} changes not archived {SETTLE_S:g} s after the last send"
                    if out["lost"]
                    else "",
                )
            )
    periods = [o["poll_period_ms"] for o in runs if o["poll_period_ms"] is not None]
    if periods:
        ctx.add(Figure(NAME, "reader poll period (median; latency resolution)", max(periods), "ms"))
