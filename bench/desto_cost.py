"""5. desto's own cost: desto 0.7.0's lifecycle operations per second, with and without archiving.

One workload process (``python -m bench.desto_cost``, desto's own ``DestoManager`` on a
``DestoRedisClient``, loguru silenced) serves every round; a round runs, per session: ``start_session_with_job``,
``add_job_to_session`` (a chained job), ``finish_job`` (the first job; desto starts the
chained one), then either ``finish_job`` + ``finish_session`` or, for every 5th session,
``session_manager.fail_session``; then, per favorite: ``add_favorite``, ``increment_usage``
twice, ``delete_favorite``. Every call counts as one operation; ops/s is operations divided by
the workload's wall time (imports and connection set-up excluded).

Three configurations, measured in the same run:

- **none**: no archiving; ``notify-keyspace-events`` empty, as on desto's default Redis;
- **desto-store**: desto's built-in store, ``DestoManager(client, sqlite_store=SQLiteStore(...))``
  writing a fresh file;
- **archiver**: the archiver daemon (``python -m archiver run``, shipped defaults, a fresh file)
  running beside desto as its own process; it turns notifications on as it starts. After the
  workload (off the clock) the archive must match Redis: every session and job with Redis'
  status, no favorite left live (all were deleted).

desto's lookups by name scan every session and job key, so each round starts from an empty
Redis and a round's cost grows with its size: rounds stay small (full: 20 sessions and 5
favorites, 120 operations; smoke: 6 and 2) and many (full: 21 rounds of the three
configurations back to back, their order rotated each round so none always runs first;
smoke: 2). The value of each configuration is the median of its rounds; its **ratio** is the
median of its per-round ratios to **none** (paired: a slow moment of the shared machine hits
the three configurations of a round alike); the quartiles of the per-round ratios are in the
note, as the spread to read it with. desto's per-session heartbeat threads live in the
workload process; they stop once their session is finished. Target: archiver ≥ 0.98 of none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from archiver.archive.sql import read_only
from bench.common import Context, DaemonProcess, Figure, Target, fresh_redis, median, percentile
from tests.redis_server import RedisServer

NAME = "desto"
CONFIGS = ("none", "desto-store", "archiver")


# ─── the workload process ──────────────────────────────────────────────────────────────────────


class Workload:
    """desto's managers on one client, kept for the whole run (one process, many rounds)."""

    def __init__(self, port: int) -> None:
        from desto.redis import DestoRedisClient
        from loguru import logger

        logger.remove()
        self.client = DestoRedisClient(config={"host": "127.0.0.1", "port": port, "db": 0, "enabled": True})
        if not self.client.is_connected():
            raise RuntimeError(f"desto could not reach Redis on port {port}")

    def round(self, sessions: int, favorites: int, tag: str, db: str | None) -> dict[str, Any]:
        from desto.redis import DestoManager, SQLiteStore

        store = SQLiteStore(db_path=db) if db else None
        manager = DestoManager(self.client, sqlite_store=store)
        favs = manager.favorites_manager
        ops = 0
        t0 = time.perf_counter()
        for i in range(sessions):
            name = f"bench-{tag}-{i}"
            session, _ = manager.start_session_with_job(name, "bash run.sh", "/app/desto_scripts/run.sh")
            manager.add_job_to_session(name, "bash next.sh", "/app/desto_scripts/next.sh")
            manager.finish_job(name, 0)
            ops += 3
            if i % 5 == 4:
                manager.session_manager.fail_session(session.session_id, "exit code 1")
                ops += 1
            else:
                manager.finish_job(name, 0)
                manager.finish_session(name)
                ops += 2
        for j in range(favorites):
            favorite = favs.add_favorite(f"fav-{tag}-{j}", f"ls -la /tmp/{j}")
            if favorite is None:
                raise RuntimeError("desto refused to add a favorite")
            favs.increment_usage(favorite.favorite_id)
            favs.increment_usage(favorite.favorite_id)
            favs.delete_favorite(favorite.favorite_id)
            ops += 4
        elapsed = time.perf_counter() - t0
        if store is not None:
            store.close()
        return {"ops": ops, "elapsed_s": elapsed, "ops_per_s": ops / elapsed}


def main(argv: list[str] | None = None) -> int:
    """Serve rounds: one JSON request per stdin line, one JSON result per stdout line."""
    parser = argparse.ArgumentParser(prog="python -m bench.desto_cost", description="desto's lifecycle workload")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    workload = Workload(args.port)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        result = workload.round(request["sessions"], request["favorites"], request["tag"], request.get("db"))
        print(json.dumps(result), flush=True)
    return 0


# ─── the benchmark ─────────────────────────────────────────────────────────────────────────────


class WorkloadProcess:
    def __init__(self, ctx: Context, server: RedisServer) -> None:
        self.ctx = ctx
        self.proc = ctx.procs.spawn(
            [sys.executable, "-m", "bench.desto_cost", "--port", str(server.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the desto workload exited with {self.proc.returncode}")
        result: dict[str, Any] = json.loads(line)
        return result

    def round(self, sessions: int, favorites: int, db: Path | None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        request = {"sessions": sessions, "favorites": favorites, "tag": self.ctx.tag(), "db": str(db) if db else None}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.ctx.procs.stop(self.proc, timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def archive_matches(server: RedisServer, db_path: Path, favorites: int) -> list[str]:
    """Where the archive differs from Redis: statuses of sessions and jobs, and favorites still
    live (all were deleted; one that lived less than a flush interval may never be archived)."""
    client = server.client()
    try:
        redis_status = {}
        for prefix, table in (("desto:session:", "sessions"), ("desto:job:", "jobs")):
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                redis_status[(table, key[len(prefix) :])] = client.hget(key, "status")
    finally:
        client.close()
    conn = read_only(db_path, timeout=10)
    try:
        archived = {}
        for table, id_col in (("sessions", "session_id"), ("jobs", "job_id")):
            for record_id, status in conn.execute(f"SELECT {id_col}, status FROM {table} WHERE gone_at IS NULL"):
                archived[(table, record_id)] = status
        live_favorites = conn.execute("SELECT count(*) FROM favorites WHERE gone_at IS NULL").fetchone()[0]
    finally:
        conn.close()
    wrong = [f"{k}: archive {archived.get(k)!r}, Redis {v!r}" for k, v in redis_status.items() if archived.get(k) != v]
    wrong += [f"{k}: archived, not in Redis" for k in archived.keys() - redis_status.keys()]
    if live_favorites:
        wrong.append(f"{live_favorites} favorites live in the archive, all {favorites} were deleted")
    return wrong


def one_round(
    ctx: Context, server: RedisServer, workload: WorkloadProcess, config: str, sessions: int, favorites: int
) -> dict[str, Any]:
    fresh_redis(server)
    directory = ctx.fresh_dir(f"desto-{config}")
    if config == "none":
        return workload.round(sessions, favorites, None)
    if config == "desto-store":
        return workload.round(sessions, favorites, directory / "desto.db")
    with DaemonProcess(ctx, server, directory) as daemon:
        daemon.start()
        result = workload.round(sessions, favorites, None)
        deadline = time.monotonic() + 20
        wrong = archive_matches(server, daemon.db_path, favorites)
        while wrong and time.monotonic() < deadline:
            time.sleep(0.1)
            wrong = archive_matches(server, daemon.db_path, favorites)
        result["archive_differences"] = wrong[:5]
        result["archive_matches"] = not wrong
        result["daemon_exit_code"] = daemon.stop()
        result["daemon_problems"] = daemon.problems()
    return result


def run(ctx: Context) -> None:
    sessions, favorites, rounds = (6, 2, 2) if ctx.smoke else (20, 5, 21)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    with ctx.redis(NAME) as server:
        workload = WorkloadProcess(ctx, server)
        try:
            for r in range(rounds):
                order = CONFIGS[r % 3 :] + CONFIGS[: r % 3]
                for config in order:
                    results[config].append(one_round(ctx, server, workload, config, sessions, favorites))
                ctx.log(
                    f"desto: round {r + 1}/{rounds}: "
                    + ", ".join(f"{c} {results[c][-1]['ops_per_s']:,.0f} ops/s" for c in CONFIGS)
                )
        finally:
            workload.close()
    rates = {c: [o["ops_per_s"] for o in results[c]] for c in CONFIGS}
    medians = {c: median(rates[c]) for c in CONFIGS}
    per_round = {c: sorted(x / a for x, a in zip(rates[c], rates["none"], strict=True)) for c in CONFIGS}
    paired = {c: median(per_round[c]) for c in CONFIGS}
    spread = {c: (percentile(per_round[c], 25), percentile(per_round[c], 75)) for c in CONFIGS}
    ctx.details[NAME] = {
        "sessions_per_round": sessions,
        "favorites_per_round": favorites,
        "rounds": rounds,
        "ops_per_round": results["none"][0]["ops"],
        "results": results,
        "medians": medians,
        "paired_ratio_medians": paired,
        "paired_ratio_quartiles": spread,
    }
    bad = [o for o in results["archiver"] if not o["archive_matches"]]
    ctx.add(Figure(NAME, "ops/s, no archiving", medians["none"], "ops/s"))
    ctx.add(
        Figure(
            NAME,
            "ops/s, desto's built-in SQLite store",
            medians["desto-store"],
            "ops/s",
            medians["none"],
            "none",
            paired_ratio=paired["desto-store"],
            note=f"ratio quartiles {spread['desto-store'][0]:.2f}-{spread['desto-store'][1]:.2f}",
        )
    )
    ctx.add(
        Figure(
            NAME,
            "ops/s, archiver daemon beside desto",
            medians["archiver"],
            "ops/s",
            medians["none"],
            "none",
            targets=[Target("ratio", ">=", 0.98)],
            paired_ratio=paired["archiver"],
            note=(f"{len(bad)} rounds where the archive did not match Redis; " if bad else "")
            + f"ratio: median of {rounds} per-round ratios, quartiles {spread['archiver'][0]:.2f}-"
            f"{spread['archiver'][1]:.2f} (values: medians of the rounds)",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
