"""Shipping into PostgreSQL under faults, each a row of the reliability report: after each, the
archive equals Redis and, once caught up, PostgreSQL equals the file row for row.

How the faults are made (the machine's PostgreSQL is shared, so it is never stopped):

- PostgreSQL unavailable: the daemon reaches it through a TCP proxy in the test, which cuts every
  connection and refuses new ones for a while, then accepts again;
- connections killed: ``pg_terminate_backend`` of the shipper's backends, repeatedly;
- statement timeout: ``ALTER DATABASE ... SET statement_timeout = '1ms'`` and the backends
  terminated, so the shipper's next connection gets it; then reset;
- network lost mid-transaction: the proxy cuts one connection after a few kilobytes from the
  client, in the middle of a batch's statements;
- the daemon SIGKILLed while shipping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from archiver.central.ship import STATE_FILE_ID
from tests.fault_helpers import heartbeat, settle, start_ready
from tests.helpers import REPO, daemon_env, log_events, query, wait_for
from tests.pg_helpers import Proxy, central_differences
from tests.redis_server import RedisServer


def ship_env(url: str, source: str) -> dict[str, str]:
    return {
        "ARCHIVER_POSTGRES_URL": url,
        "ARCHIVER_SOURCE_NAME": source,
        "ARCHIVER_SHIP_INTERVAL": "0.1",
        "ARCHIVER_SHIP_BATCH_SIZE": "200",
    }


def assert_central_equals_file(
    url: str, db_path: Path, source: str, timeout: float = 30.0, this_file_only: bool = False
) -> None:
    """PostgreSQL holds what the file holds; ``this_file_only``: of the numbered tables, the rows
    of the file's own identity (a host's earlier files keep theirs)."""
    last: list[str] = []

    def equal() -> bool:
        file_id = None
        if this_file_only:
            found = query(db_path, "SELECT value FROM archiver_state WHERE name = ?", (STATE_FILE_ID,))
            file_id = found[0][0] if found else "(none yet)"
        last[:] = central_differences(url, db_path, source, file_id=file_id)
        return not last

    try:
        wait_for(equal, timeout, interval=0.3, what="PostgreSQL to equal the file")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {len(last)} difference(s):\n  " + "\n  ".join(last[:15])) from None


def terminate_shippers(url: str) -> int:
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name LIKE 'desto-archiver%%'",
            (database,),
        ).fetchall()
    return len(rows)


def shipper_backends(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'desto-archiver%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def central_count(url: str, table: str, source: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM desto_archiver.{table} WHERE source_name = %s", (source,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
def test_two_archivers_fill_one_database_with_the_union_of_their_files(tmp_path, pg_url, daemons, writers, reliability):
    report = reliability("two hosts into one PostgreSQL", "two Redis, two daemons, two sources, one database")
    servers = [RedisServer(tmp_path / f"redis-{n}").start() for n in (1, 2)]
    try:
        paths = [tmp_path / f"host{n}" / "desto.db" for n in (1, 2)]
        for path in paths:
            path.parent.mkdir()
        procs = [
            start_ready(daemons, s, p, **ship_env(pg_url, f"host{n}"))
            for n, (s, p) in enumerate(zip(servers, paths, strict=True), 1)
        ]
        loads = [writers(s, seed=n) for n, s in enumerate(servers, 1)]
        for w in loads:
            w.wait_steps(400, timeout=30)
        written = [w.finish() for w in loads]
        held = 0
        for server, path, keys in zip(servers, paths, written, strict=True):
            client = server.client()
            settle(report, client, path, keys, timeout=20)
            client.close()
            held += report.records_in_archive or 0
        for n, path in enumerate(paths, 1):
            assert_central_equals_file(pg_url, path, f"host{n}")
        report.measured["central_sessions"] = sum(central_count(pg_url, "sessions", f"host{n}") for n in (1, 2))
        report.records_written, report.records_in_archive = sum(len(k) for k in written), held
        report.lost = report.records_written - held
        assert all(p.proc.poll() is None for p in procs)
    finally:
        for s in servers:
            s.stop()


PG_OUTAGE_S = 30.0  # PostgreSQL stopped for as long as a restart or a failover takes


@pytest.mark.slow
def test_postgres_unavailable_under_load_then_back(redis_server, redis, db_path, pg_url, daemons, writers, reliability):
    report = reliability(
        "PostgreSQL unavailable, then back", f"TCP proxy cuts and refuses connections for {PG_OUTAGE_S:g} s"
    )
    proxy = Proxy()
    try:
        url = proxy.url(pg_url.rsplit("/", 1)[1])
        daemon = start_ready(daemons, redis_server, db_path, **ship_env(url, "gpu1"))
        daemon.wait_log("ship.copied")  # shipping under way: it knows its position when PostgreSQL goes
        writer = writers(redis_server, seed=3)
        writer.wait_steps(150)
        proxy.down()
        down_at = time.monotonic()
        writer.wait_steps(300, timeout=30)  # archived meanwhile: the file does not wait for PostgreSQL
        daemon.wait_log("ship.failed", timeout=15)
        # the heartbeat says so, and what waits in the file grows
        waiting = wait_for(
            lambda: (h := heartbeat(db_path)) and h["ship"]["failing"] and (h["ship"]["backlog"] or 0) > 50 and h,
            15,
            what="the heartbeat to show the failure and a backlog",
        )
        report.measured["backlog_while_down"] = waiting["ship"]["backlog"]
        time.sleep(max(0.0, PG_OUTAGE_S - (time.monotonic() - down_at)))
        proxy.up()
        written = writer.finish()
        settle(report, redis, db_path, written, timeout=20)
        assert_central_equals_file(pg_url, db_path, "gpu1", timeout=40)
        [recovered] = daemon.wait_log("ship.recovered")
        wait_for(lambda: (h := heartbeat(db_path)) and h["ship"]["backlog"] == 0 and not h["ship"]["failing"], 15)
        logged = len(daemon.events("ship.failed"))
        # an outage is a few lines in the log (the first, each new kind of error, every 20th), not one a retry
        assert 1 <= logged <= 3 + recovered["failures"] // 20, (logged, recovered)
        report.measured["ship_failures"] = recovered["failures"]
        report.measured["ship_failures_logged"] = logged
    finally:
        proxy.close()


@pytest.mark.slow
def test_postgres_connections_killed_under_load(redis_server, redis, db_path, pg_url, daemons, writers, reliability):
    report = reliability("PostgreSQL connections killed", "pg_terminate_backend of the shipper x5 under load")
    daemon = start_ready(daemons, redis_server, db_path, **ship_env(pg_url, "gpu1"))
    daemon.wait_log("ship.connected")
    writer = writers(redis_server, seed=4)
    killed = 0
    for _ in range(5):
        writer.wait_steps(80)
        wait_for(lambda: shipper_backends(pg_url) > 0, 15, what="the shipper connected again")
        killed += terminate_shippers(pg_url)
    assert killed >= 5
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=20)
    assert_central_equals_file(pg_url, db_path, "gpu1")
    assert daemon.events("ship.failed")
    report.measured["backends_killed"] = killed


@pytest.mark.slow
def test_statement_timeout_then_lifted(redis_server, redis, db_path, pg_url, daemons, writers, reliability):
    report = reliability("PostgreSQL statement timeout", "statement_timeout 1 ms on the database for 4 s")
    database = pg_url.rsplit("/", 1)[1]
    daemon = start_ready(daemons, redis_server, db_path, **ship_env(pg_url, "gpu1"))
    daemon.wait_log("ship.connected")
    writer = writers(redis_server, seed=5)
    writer.wait_steps(100)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {database} SET statement_timeout = '1ms'")
    terminate_shippers(pg_url)
    writer.wait_steps(200, timeout=30)
    failed = daemon.wait_log("ship.failed", timeout=15)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {database} RESET statement_timeout")
    terminate_shippers(pg_url)
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=20)
    assert_central_equals_file(pg_url, db_path, "gpu1", timeout=40)
    report.measured["timeouts_logged"] = sum("QueryCanceled" in e["error"] for e in daemon.events("ship.failed"))
    assert any("statement timeout" in e["error"] or "QueryCanceled" in e["error"] for e in failed), failed


@pytest.mark.slow
def test_network_lost_mid_transaction(redis_server, redis, db_path, pg_url, daemons, writers, reliability):
    report = reliability("network lost mid-transaction", "proxy drops a connection after 20 kB from the client x3")
    proxy = Proxy()
    try:
        url = proxy.url(pg_url.rsplit("/", 1)[1])
        daemon = start_ready(daemons, redis_server, db_path, **ship_env(url, "gpu1"))
        daemon.wait_log("ship.connected")
        writer = writers(redis_server, seed=6)
        for n in range(1, 4):
            writer.wait_steps(100)
            proxy.cut_after(20_000)  # the next connection is cut in the middle of a batch
            proxy.down()  # ... which the shipper opens at once: the current one is cut now
            proxy.up()
            wait_for(lambda n=n: proxy.cuts >= n, 30, what=f"cut {n}")
        written = writer.finish()
        settle(report, redis, db_path, written, timeout=20)
        assert_central_equals_file(pg_url, db_path, "gpu1", timeout=40)
        report.measured["cuts"] = proxy.cuts
    finally:
        proxy.close()


@pytest.mark.slow
def test_daemon_sigkilled_while_shipping(redis_server, redis, db_path, pg_url, daemons, writers, reliability):
    report = reliability("archiver killed while shipping", "SIGKILL x3 under load with shipping on, restarted")
    env = ship_env(pg_url, "gpu1")
    daemon = start_ready(daemons, redis_server, db_path, **env)
    writer = writers(redis_server, seed=7)
    for _ in range(3):
        writer.wait_steps(150)
        daemon.wait_log("ship.connected")
        daemon.signal(signal.SIGKILL)
        assert daemon.proc.wait(timeout=10) == -signal.SIGKILL
        writer.wait_steps(50)
        daemon = start_ready(daemons, redis_server, db_path, **env)
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=20)
    assert_central_equals_file(pg_url, db_path, "gpu1", timeout=40)
    assert daemon.proc.poll() is None


@pytest.mark.slow
def test_one_shot_ship_beside_the_shipping_daemon_under_load(
    redis_server, redis, db_path, pg_url, daemons, writers, reliability
):
    report = reliability("`ship` beside the shipping daemon", "the one-shot copy run x3 while the daemon ships")
    daemon = start_ready(daemons, redis_server, db_path, **ship_env(pg_url, "gpu1"))
    daemon.wait_log("ship.connected")
    writer = writers(redis_server, seed=8)
    for _ in range(3):
        writer.wait_steps(100)
        done = subprocess.run(
            [sys.executable, "-m", "archiver", "ship", "--json"],
            env=daemon_env(redis_server, db_path, **ship_env(pg_url, "gpu1")),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rows"] > 0
    written = writer.finish()
    settle(report, redis, db_path, written, timeout=20)
    assert_central_equals_file(pg_url, db_path, "gpu1")
    assert not daemon.events("ship.failed")


def test_ship_with_postgres_unreachable_exits_1_and_says_to_run_it_again(redis_server, redis, db_path) -> None:
    from tests.redis_server import free_port

    assert (
        subprocess.run(
            [sys.executable, "-m", "archiver", "backfill"], env=daemon_env(redis_server, db_path), cwd=REPO, timeout=60
        ).returncode
        == 0
    )
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "ship", "--postgres-url", url],
        env=daemon_env(redis_server, db_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"PostgreSQL at {url} failed" in done.stderr and "run the same command again" in done.stderr


def test_the_file_removed_under_a_shipping_daemon_under_load(
    redis_server, redis, db_path, pg_url, daemons, writers, reliability
):
    """`rm desto.db` while the daemon writes and ships, PostgreSQL away or answering: the
    shipper's connection to the lost file must be closed before a new file takes the path (SQLite
    names the WAL and shared memory after the path, and removes the WAL by that name when its
    last connection closes), or the new file's WAL goes: disk I/O errors, a SIGBUS, a daemon
    that exits. The daemon stays up, the file equals Redis and PostgreSQL the file."""
    report = reliability("archive removed under a shipping daemon x4", "rm desto.db under load, PostgreSQL away or not")
    proxy = Proxy()
    try:
        daemon = start_ready(daemons, redis_server, db_path, **ship_env(proxy.url(pg_url.rsplit("/", 1)[1]), "gpu1"))
        daemon.wait_log("ship.copied")
        writer = writers(redis_server, seed=11)
        for n in range(1, 5):
            writer.wait_steps(60 * n, timeout=30)
            away = n % 2 == 1
            if away:  # the shipper waits out its backoff, its file open
                proxy.down()
                daemon.wait_log("ship.failed", timeout=15)
            db_path.unlink()
            daemon.wait_log("archive.reopened", n, timeout=20)
            writer.wait_steps(60 * n + 30, timeout=30)  # written into the new file
            if away:
                proxy.up()
        written = writer.finish()
        settle(report, redis, db_path, written, timeout=30)
        assert_central_equals_file(pg_url, db_path, "gpu1", timeout=40, this_file_only=True)
        assert daemon.proc.poll() is None
        problems = [
            e for e in log_events(daemon.log) if e.get("level") == "error" and e["event"] != "archive.file_lost"
        ]
        assert problems == [], problems
    finally:
        proxy.close()
