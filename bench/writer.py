"""The load generator: a separate process writing desto-shaped session hashes at a set rate.

``python -m bench.writer --port P --rate R --seconds S --tag T`` writes ``R * S`` distinct
session keys (one HSET each, pipelined; with ``--keys K``, K keys in turn, each change rewriting a
live record as desto's heartbeats do), paced against a monotonic clock: once at least a
millisecond's worth of changes is due, it sends everything due (at most ``--chunk`` commands per
round trip), otherwise it sleeps until then. Every hash carries the wall time of its send in
``start_time`` and ``last_heartbeat`` (desto's naive local ISO form, to the microsecond), so a
reader of the archive can date each change. It prints one JSON line when it starts sending and
one when done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from bench.records import RawRedis, iso_now, record_id, session_command

# Changes due are sent together once a millisecond's worth of them is due. Sending each as soon as
# it is due would make a round trip per change at high rates: a busy loop whose system calls cost
# the writer and Redis tens of microseconds of CPU per change, taken from the daemon on a small
# machine. A change waits at most this long, and carries the time it was sent.
TICK_S = 0.001


def run(
    port: int,
    rate: float,
    seconds: float,
    tag: str,
    chunk: int = 1000,
    on_start: Callable[[float], None] | None = None,
    keys: int | None = None,
) -> dict[str, float]:
    total = max(1, round(rate * seconds))
    if keys is not None:
        chunk = min(chunk, keys)  # a key at most once per round trip: each change has its own time
    tick = max(1, int(rate * TICK_S))  # the fewest commands per round trip
    sent = 0
    max_behind = 0
    with RawRedis(port) as conn:
        t0 = time.perf_counter()
        wall_first = time.time()
        if on_start is not None:
            on_start(wall_first)
        while sent < total:
            elapsed = time.perf_counter() - t0
            due = min(total, int(elapsed * rate) + 1)
            n = due - sent
            if n < tick and due < total:
                time.sleep(max(0.0, (sent + tick - 1) / rate - elapsed))
                continue
            max_behind = max(max_behind, n)
            n = min(n, chunk)
            ts = iso_now()
            commands = [session_command(record_id(i % keys if keys else i, tag), ts) for i in range(sent, sent + n)]
            conn.pipeline(commands, n)
            sent += n
        elapsed = time.perf_counter() - t0
        wall_last = time.time()
    return {
        "sent": sent,
        "rate": rate,
        "achieved_rate": sent / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
        "wall_first": wall_first,
        "wall_last": wall_last,
        "max_behind": max_behind,
        "cpu_s": time.process_time(),  # this process's own CPU: its cost per change
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.writer", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="changes per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tag", required=True, help="4 hex digits that make this run's keys distinct")
    parser.add_argument("--chunk", type=int, default=1000, help="most commands per round trip")
    parser.add_argument("--keys", type=int, help="write these many keys in turn (default: a new key per change)")
    args = parser.parse_args(argv)

    def started(wall: float) -> None:
        print(json.dumps({"started": wall}), flush=True)

    result = run(args.port, args.rate, args.seconds, args.tag, args.chunk, started, args.keys)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
