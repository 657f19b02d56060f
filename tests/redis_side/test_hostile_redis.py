"""A hostile or struggling Redis: whatever a client writes under desto's keys, the daemon's memory
stays bounded and Redis is never held up long by its reads; Redis' answers that it cannot serve for
now (BUSY, MASTERDOWN...) and reads slower than ARCHIVER_SOCKET_TIMEOUT never stop it; its logs
never carry the local variables of a traceback; a flood of idle connections to its metrics port
neither stops a scrape nor grows it."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import structlog

from archiver import log as archiver_log
from archiver.keys import classify
from archiver.models import Rejected, decode_resp, normalize
from archiver.redis_side import redis_client
from archiver.redis_side.source import SLOW_TRIES, Source
from tests.fault_helpers import settle, start_ready, write_job, write_session
from tests.helpers import daemon_env, query, settings_for, wait_for
from tests.procfs import status_kb, vm_hwm_kb
from tests.redis_server import RedisServer, free_port

MB = 1024 * 1024
HUGE = 17 * MB  # more than a desto record can hold (models.MAX_RECORD_BYTES)
SMALL = 16 * 1024  # a description of a key too big to read, RESP-encoded, is smaller than this


def fill_list(client, key: bytes, items: int) -> None:
    """``items`` numbers under ``key``, pushed by a script in Redis (fast, and nothing in this process)."""
    client.eval(
        "for i = 1, tonumber(ARGV[1]), 1000 do local t = {} for j = 0, 999 do t[#t + 1] = i + j end "
        "redis.call('RPUSH', KEYS[1], unpack(t)) end",
        1,
        key,
        items,
    )


def fill_hash(client, key: bytes, fields: int) -> None:
    client.eval(
        "for i = 1, tonumber(ARGV[1]), 500 do local t = {} for j = 0, 499 do t[#t + 1] = 'f' .. (i + j) "
        "t[#t + 1] = 'value ' .. (i + j) end redis.call('HSET', KEYS[1], unpack(t)) end",
        1,
        key,
        fields,
    )


def hostile_keys(client, big: int) -> dict[bytes, str]:
    """Keys no desto record can be, under desto's prefixes; each with the phrase its reason says."""
    keys = {
        b"desto:session:a-list": "a list of",
        b"desto:job:one-huge-field": "a hash of 3 fields",
        b"desto:session:many-fields": "a hash of 20000 fields",
        b"desto:favorite:a-string": "a string of",
        b"desto:atjob:a-set": "a set of",
        b"desto:session:a-zset": "a zset of",
        b"desto:status:a-stream": "a stream of",
    }
    fill_list(client, b"desto:session:a-list", big)
    client.hset(
        b"desto:job:one-huge-field",
        mapping={b"job_id": b"one-huge-field", b"session_id": b"s", b"command": b"x" * (HUGE)},
    )
    fill_hash(client, b"desto:session:many-fields", 20_000)
    client.set(b"desto:favorite:a-string", b"s" * (HUGE))
    client.sadd(b"desto:atjob:a-set", *[str(i) for i in range(5_000)])
    client.zadd(b"desto:session:a-zset", {str(i): i for i in range(5_000)})
    for i in range(500):
        client.xadd(b"desto:status:a-stream", {b"field": b"v" * 200, b"n": str(i)})
    return keys


def quarantine_rows(db_path: Path) -> dict[bytes, dict[str, Any]]:
    rows = query(db_path, "SELECT key, redis_type, reason, length(payload) AS size, payload FROM quarantine")
    return {bytes(r["key"]): dict(r) for r in rows}


# ─── A: keys too big for a desto record are described, never read whole ──────────────────────────


@pytest.mark.parametrize("scripting", [True, False], ids=["script", "multi-exec"])
def test_keys_too_big_for_a_desto_record_are_read_as_a_bounded_description(redis_server, redis, scripting) -> None:
    client = redis_server.client(decode_responses=False)
    keys = hostile_keys(client, 300_000)
    good, _ = write_session(redis)
    client.execute_command("CONFIG", "SET", "slowlog-log-slower-than", 50_000)  # 50 ms
    client.execute_command("SLOWLOG", "RESET")
    source = Source(settings_for(redis_server, Path("/nonexistent/desto.db")))
    source._use_script = scripting  # as for a user that may not run scripts
    try:
        started = time.perf_counter()
        fetched = source.fetch([*keys, good.encode()])
        took = time.perf_counter() - started
    finally:
        source.close()
    for f in fetched[:-1]:
        outcome = normalize(classify(f.key), f)
        assert isinstance(outcome, Rejected), f.key
        assert len(outcome.payload) < SMALL, (f.key, len(outcome.payload))
        assert keys[f.key] in outcome.reason and "only its type, size and first items are kept" in outcome.reason
        described = decode_resp(outcome.payload)
        assert described[:2] == [b"type", f.redis_type.encode()], described[:2]
    assert fetched[-1].described is None and fetched[-1].redis_type == "hash"  # the good record, whole
    assert took < 2.0, f"reading the keys took {took:.2f} s"
    slow = [e for e in client.slowlog_get(128) if e.get("client_name") == b"desto-archiver"]
    assert not slow, f"the archiver's reads held Redis up: {slow}"
    client.close()


def test_a_hostile_key_keeps_the_daemon_s_memory_bounded(redis_server, redis, db_path, daemons, reliability) -> None:
    report = reliability("keys too big for a desto record", "a 2,000,000-item list, 17 MB values, 20,000 fields")
    client = redis_server.client(decode_responses=False)
    daemon = start_ready(daemons, redis_server, db_path, ARCHIVER_RECONCILE_INTERVAL="2")
    written = [write_session(redis)[0], write_job(redis)[0]]
    wait_for(lambda: len(query(db_path, "SELECT 1 FROM sessions")) == 1, 15, what="the first record archived")
    before_kb = vm_hwm_kb(daemon.pid)
    keys = hostile_keys(client, 2_000_000)
    written += [write_session(redis)[0], write_job(redis)[0]]
    wait_for(lambda: set(keys) <= set(quarantine_rows(db_path)), 30, what="every hostile key quarantined")
    peak_kb = vm_hwm_kb(daemon.pid)
    rows = quarantine_rows(db_path)
    report.measured.update(
        peak_rss_mb=round(peak_kb / 1024, 1),
        growth_mb=round((peak_kb - before_kb) / 1024, 1),
        biggest_quarantine_row_bytes=max(rows[key]["size"] for key in keys),
    )
    assert daemon.proc.poll() is None, "the daemon exited"
    for key, phrase in keys.items():
        assert rows[key]["size"] < SMALL and phrase in rows[key]["reason"], rows[key]
    assert peak_kb - before_kb < 48 * 1024, f"the daemon grew by {(peak_kb - before_kb) // 1024} MB"
    client.delete(*keys)  # the check below reads every desto key as a hash
    settle(report, redis, db_path, written)
    client.close()


# ─── C: Redis' "not now" replies are retried ─────────────────────────────────────────────────────


def test_redis_replies_that_mean_not_now_are_retried_and_others_are_not() -> None:
    not_now = (
        redis_lib.ResponseError(
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."
        ),
        redis_lib.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_lib.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        redis_lib.ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
        redis_lib.ResponseError("CLUSTERDOWN The cluster is down"),
        # as redis-py raises those it knows
        redis_lib.exceptions.MasterDownError("Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        redis_lib.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis_lib.exceptions.ClusterDownError("The cluster is down"),
    )
    assert all(redis_client.retryable(exc) for exc in not_now)
    assert not redis_client.retryable(redis_lib.ResponseError("ERR unknown command 'FOO'"))
    assert not redis_client.retryable(redis_lib.ResponseError("BUSYGROUP Consumer Group name already exists"))


@pytest.mark.slow
def test_redis_busy_with_another_client_s_script_never_stops_the_daemon(fresh_redis, db_path, daemons, reliability):
    report = reliability("Redis busy running another client's script", "a 4 s Lua loop past busy-reply-threshold")
    admin = fresh_redis.client()
    admin.config_set("busy-reply-threshold", 100)  # ms (lua-time-limit before Redis 7)
    daemon = start_ready(
        daemons, fresh_redis, db_path, ARCHIVER_RECONCILE_INTERVAL="0.5", ARCHIVER_HEALTH_CHECK_INTERVAL="0.5"
    )
    written = [write_session(admin)[0] for _ in range(5)]
    with a_script_holding_redis(fresh_redis.port) as ended:
        failed = daemon.wait_log("redis.read_failed", timeout=20)
        assert failed[0]["error"].startswith("BUSY"), failed[0]
        assert "script" in failed[0]["action"], failed[0]
        time.sleep(3)  # the daemon keeps retrying while the script runs
        assert daemon.proc.poll() is None, "the daemon exited while Redis was busy"
    assert ended, "the looping script was not killed"
    daemon.wait_log("archiver.recovered", timeout=20)
    written += [write_session(admin)[0], write_job(admin)[0]]
    settle(report, admin, db_path, written, timeout=30)
    assert daemon.proc.poll() is None
    report.measured["read_failures_logged"] = len(daemon.events("redis.read_failed"))
    admin.close()


def test_a_command_run_while_redis_is_busy_says_so_without_a_traceback(fresh_redis, db_path) -> None:
    """The one-shot commands meet the same BUSY reply as the daemon: they end with what it means and
    what to do (exit 1), not a traceback; check reports it as its Redis finding."""
    admin = fresh_redis.client()
    admin.config_set("busy-reply-threshold", 100)
    write_session(admin)
    with a_script_holding_redis(fresh_redis.port):
        wait_for(lambda: _answers_busy(fresh_redis.port), 10, what="Redis to answer BUSY")
        for command in (["backfill"], ["check"], ["restore", "favorites", "--dry-run"]):
            done = subprocess.run(
                [sys.executable, "-m", "archiver", *command],
                env=daemon_env(fresh_redis, db_path),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr, (command, done.stderr)
            said = done.stdout + done.stderr  # check reports on its standard output, the others on errors
            assert "BUSY" in said and "run the command again once it ends (SCRIPT KILL" in said, (command, said)
    admin.close()


@contextlib.contextmanager
def a_script_holding_redis(port: int) -> Iterator[list[BaseException]]:
    """Another client's Lua loop, running until the block ends (then SCRIPT KILL): past
    busy-reply-threshold Redis answers every other client BUSY. Yields the errors the loop ended
    with (Redis' "Script killed by user")."""
    ended: list[BaseException] = []

    def loop() -> None:
        looper = redis_lib.Redis(port=port, socket_timeout=30)
        try:
            looper.eval("local i = 0 while true do i = i + 1 end", 0)
        except redis_lib.ResponseError as exc:
            ended.append(exc)
        finally:
            looper.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield ended
    finally:
        killer = redis_lib.Redis(port=port, socket_timeout=5)
        wait_for(lambda: killer.script_kill() or True, 10, what="SCRIPT KILL")  # the loop may not have begun
        killer.close()
        thread.join(timeout=10)


def _answers_busy(port: int) -> bool:
    probe = redis_lib.Redis(port=port, socket_timeout=5)
    try:
        probe.get("desto:probe")
    except redis_lib.ResponseError as exc:
        return str(exc).startswith("BUSY")
    finally:
        probe.close()
    return False


def test_a_replica_without_its_master_answering_masterdown_never_stops_the_daemon(
    tmp_path: Path, db_path, daemons, reliability
) -> None:
    report = reliability("Redis a replica without its master", "MASTERDOWN to every read, then REPLICAOF NO ONE")
    replica = RedisServer(tmp_path / "replica").start()
    try:
        admin = replica.client()
        admin.config_set("replica-serve-stale-data", "no")
        admin.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a master that is not there
        daemon = daemons(replica, db_path)
        failed = daemon.wait_log("redis.read_failed", timeout=20)
        assert "Link with MASTER is down" in failed[0]["error"], failed[0]
        time.sleep(1)
        assert daemon.proc.poll() is None, "the daemon exited on MASTERDOWN"
        admin.execute_command("REPLICAOF", "NO", "ONE")
        written = [write_session(admin)[0], write_job(admin)[0]]
        settle(report, admin, db_path, written, timeout=30)
        assert daemon.proc.poll() is None
        admin.close()
    finally:
        replica.stop()


# ─── D: no local variables in the logs ───────────────────────────────────────────────────────────


def test_a_logged_exception_carries_no_local_variables() -> None:
    out = io.StringIO()
    archiver_log.configure("json", "info", out)
    try:
        password = "hunter2-in-a-local"  # noqa: F841 (what a traceback's locals would show)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            archiver_log.get_logger("test").exception("fetcher.crashed")
    finally:
        structlog.reset_defaults()
    line = json.loads(out.getvalue().splitlines()[-1])
    [exception] = line["exception"]
    assert exception["exc_type"] == "RuntimeError" and exception["frames"], line
    assert all("locals" not in frame for frame in exception["frames"]), exception["frames"]
    assert "hunter2" not in out.getvalue()


# ─── E: a read slower than ARCHIVER_SOCKET_TIMEOUT ───────────────────────────────────────────────


class SlowLink:
    """A TCP proxy to Redis that forwards each reply only after as long as it takes at ``rate``
    bytes a second, all of it at once: a big reply arrives after a silence longer than the
    client's socket timeout, a small one (PING) at once."""

    def __init__(self, port: int, rate: float) -> None:
        self.target, self.rate = port, rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(1 << 20):
                if slow:
                    source.settimeout(0.02)  # gather the whole reply
                    try:
                        while more := source.recv(1 << 20):
                            data += more
                    except TimeoutError:
                        pass
                    source.settimeout(None)
                    time.sleep(len(data) / self.rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.server.close()


def test_a_read_slower_than_the_socket_timeout_is_split_and_a_key_too_slow_each_time_is_quarantined(
    redis_server, redis
) -> None:
    client = redis_server.client(decode_responses=False)
    small = [write_job(redis, command="c" * 150_000)[0].encode() for _ in range(8)]
    slow_key = write_job(redis, command="s" * 2_000_000)[0].encode()
    link = SlowLink(redis_server.port, rate=MB)
    through_link = f"redis://127.0.0.1:{link.port}/0"
    source = Source(
        settings_for(redis_server, Path("/nonexistent/desto.db"), redis_url=through_link, socket_timeout=0.5)
    )
    out = io.StringIO()
    archiver_log.configure("json", "info", out)
    try:
        # the fetcher reads a failed batch again after its backoff: a key that alone times out is
        # read again, SLOW_TRIES times in a row, before it is taken for slow (a failover's pause
        # holds every read up for a while)
        for _ in range(SLOW_TRIES - 1):
            with pytest.raises(redis_lib.TimeoutError):
                source.fetch([*small, slow_key])
        started = time.perf_counter()
        fetched = source.fetch([*small, slow_key])
        took = time.perf_counter() - started
    finally:
        source.close()
        link.close()
    assert [f.key for f in fetched] == [*small, slow_key]
    assert all(f.described is None and f.redis_type == "hash" for f in fetched[:-1])
    outcome = normalize(classify(slow_key), fetched[-1])
    assert isinstance(outcome, Rejected) and "could not be read within ARCHIVER_SOCKET_TIMEOUT" in outcome.reason
    assert len(outcome.payload) < SMALL
    logged = [json.loads(line) for line in out.getvalue().splitlines()]
    assert any(e["event"] == "redis.read_slow" for e in logged)
    assert [e["key"] for e in logged if e["event"] == "redis.key_not_read"] == [slow_key.decode()]
    assert took < 10, f"{took:.1f} s"
    client.close()


# ─── F: the metrics server under a flood of idle connections ─────────────────────────────────────


@pytest.fixture
def idle_connections() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def test_idle_connections_to_the_metrics_port_neither_stop_a_scrape_nor_grow_the_daemon(
    redis_server, redis, db_path, daemons, idle_connections, reliability
) -> None:
    report = reliability("metrics port flooded", "200 idle connections held open, then a scrape")
    port = free_port()
    daemon = start_ready(
        daemons, redis_server, db_path, ARCHIVER_METRICS_PORT=str(port), ARCHIVER_METRICS_HOST="0.0.0.0"
    )
    threads_before = status_kb(daemon.pid, "Threads")
    for _ in range(200):
        idle_connections.append(socket.create_connection(("127.0.0.1", port)))
    time.sleep(1)
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"desto_archiver_keys_read_total" in reply.read()
    report.measured["scrape_s"] = round(time.perf_counter() - started, 3)
    threads = status_kb(daemon.pid, "Threads")
    report.measured["threads"] = threads
    assert threads - threads_before < 20, f"{threads} threads for {len(idle_connections)} idle connections"
    written = [write_session(redis)[0], write_job(redis)[0]]
    settle(report, redis, db_path, written)
    assert daemon.proc.poll() is None


# ─── all of it at once, beside desto ─────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_a_hostile_client_beside_desto_leaves_the_daemon_up_bounded_and_complete(
    fresh_redis, db_path, daemons, writers, reliability
) -> None:
    """Whoever can write desto's Redis, while desto-like traffic goes on: one bad job changed again
    and again with a big field, keys no desto record can be (a 1,000,000-item list, 17 MB values),
    another client's script holding Redis up past busy-reply-threshold, and names and command lines
    full of terminal escapes. The daemon stays up, within its memory bound; the quarantine stays
    within its caps; every good record is archived; and what `history` prints for people carries
    no escape to the terminal."""
    report = reliability("a hostile client beside desto", "a bad job changed x40, big keys, BUSY, terminal escapes")
    admin = fresh_redis.client(decode_responses=False)
    admin.config_set("busy-reply-threshold", 100)
    daemon = start_ready(daemons, fresh_redis, db_path, ARCHIVER_RECONCILE_INTERVAL="2")
    before_kb = vm_hwm_kb(daemon.pid)
    writer = writers(fresh_redis, seed=27)
    writer.wait_steps(50, timeout=30)
    # 1: one rejected key, changed again and again, its bad field 300 KB
    bad = b"desto:job:bad-and-big"
    for n in range(40):
        admin.hset(
            bad, mapping={b"job_id": b"bad-and-big", b"session_id": b"s", b"exit_code": b"x" * 300_000 + b"%d" % n}
        )
    # 2: keys too big for any desto record (desto's own lookups, which read every session key,
    # fail on them too: the writer waits while they are there)
    writer.hold()
    keys = hostile_keys(admin, 1_000_000)
    wait_for(lambda: set(keys) <= set(quarantine_rows(db_path)), 60, what="every hostile key quarantined")
    rows = quarantine_rows(db_path)
    admin.delete(*keys)
    # 3: another client's script holds Redis up (desto's writes would fail too: the writer waits)
    with a_script_holding_redis(fresh_redis.port) as ended:
        # held until the daemon has met it: its next reconcile reads into the BUSY reply
        wait_for(
            lambda: any(e["error"].startswith("BUSY") for e in daemon.events("redis.read_failed")),
            20,
            what="a read of the daemon answered BUSY",
        )
    assert ended, "the looping script was not killed"
    writer.go_on()
    # 4: terminal escapes in what desto shows
    escapes = "\x1b]0;owned\x07\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\r"
    reader = fresh_redis.client()
    named, _ = write_session(reader, session_name=f"train{escapes}", status="finished")
    writer.wait_steps(100, timeout=60)
    written = writer.finish() | {named}
    assert daemon.proc.poll() is None, "the daemon exited"
    peak_kb = vm_hwm_kb(daemon.pid)
    rows.update(quarantine_rows(db_path))
    admin.delete(bad)  # the check below reads every desto key as a hash
    settle(report, reader, db_path, written, timeout=60)
    kept = query(db_path, "SELECT count(*) AS n, coalesce(sum(length(payload)), 0) AS bytes FROM quarantine")[0]
    report.measured.update(
        peak_rss_mb=round(peak_kb / 1024, 1),
        growth_mb=round((peak_kb - before_kb) / 1024, 1),
        quarantine_rows=kept["n"],
        quarantine_bytes=kept["bytes"],
    )
    assert bad in rows and rows[bad]["size"] <= 64 * 1024, "one bounded row for the changed key"
    assert all(rows[key]["size"] < SMALL for key in keys)
    assert kept["n"] <= len(keys) + 1 + 1, kept["n"]  # each hostile key once (and the bad job)
    assert peak_kb - before_kb < 96 * 1024, f"the daemon grew by {(peak_kb - before_kb) // 1024} MB"
    shown = subprocess.run(
        [sys.executable, "-m", "archiver", "history", "--name", "train", "--db", str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(fresh_redis, db_path),
        check=True,
    ).stdout
    assert "train" in shown and "\x1b" not in shown and "\x07" not in shown and "\\x1b" in shown
    admin.close()
    reader.close()
