"""Reaching Redis: the daemon and the commands over each way REDIS_URL can name a Redis, and as
the ACL user the deployment page gives.

Transports: TCP (every other test, on database 0; here also on database 3, whose keyspace
channels differ), a unix socket and TLS. The daemon reads its subscription's
socket itself (source.Subscription), so each is driven through the whole path: the first
reconcile, keyspace notifications, a dropped pub/sub connection and the reconnect, then ``check``
(which compares the archive with Redis) and ``backfill``. Each server also listens on TCP, where
the test writes desto's records as desto would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from archiver.daemon.inbox import Inbox
from archiver.redis_side.listener import Listener
from archiver.redis_side.source import Source
from tests.fault_helpers import (
    archived,
    assert_archive_equals_redis,
    heartbeat,
    start_ready,
    write_job,
    write_session,
)
from tests.helpers import REPO, daemon_env, now_iso, settings_for, wait_for
from tests.redis_server import RedisServer, free_port


@pytest.fixture(params=["unix-socket", "tls", "tcp-database-3"])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[RedisServer, str, int]]:
    """A redis-server of the test's own, the REDIS_URL that reaches it the way asked, and the
    database desto uses there."""
    folder = tmp_path / "redis"
    folder.mkdir()
    db = 0
    if request.param == "tcp-database-3":  # desto's REDIS_DB=3: its own keyspace channels
        extra: list[str] = []
        db = 3
        url = ""
    elif request.param == "unix-socket":
        socket_path = folder / "redis.sock"
        extra = ["--unixsocket", str(socket_path), "--unixsocketperm", "700"]
        url = f"unix://{socket_path}?db=0"
    else:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        cert, key, ca_file = folder / "server.pem", folder / "server.key", folder / "ca.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        tls_port = free_port()
        extra = [
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca_file),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}"
    server = RedisServer(folder, extra=extra).start()
    yield server, url or f"redis://127.0.0.1:{server.port}/{db}", db
    server.stop()


def archiver_cli(server: RedisServer, url: str, db_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", *args],
        cwd=REPO,
        env=daemon_env(server, db_path, REDIS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_daemon_and_the_commands_work_over_the_transport(transport, db_path: Path, daemons) -> None:
    server, url, db = transport
    client = server.client(db=db)
    before = write_session(client)[0]  # found by the first reconcile
    daemon = start_ready(daemons, server, db_path, REDIS_URL=url)
    started = daemon.events("archiver.started")[0]
    assert started["redis"] == url and started["notifications"] == "on", started

    session, _ = write_session(client)
    client.hset(session, mapping={"status": "finished", "end_time": now_iso()})
    wait_for(lambda: (archived(db_path, session) or {"status": None})["status"] == "finished", 5, what="a change")

    assert client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    daemon.wait_log("redis.reconnected")
    daemon.wait_reconcile("reconnect")
    job, _ = write_job(client, session_id=session.rsplit(":", 1)[1])
    wait_for(lambda: archived(db_path, job) is not None, 5, what="a record written after the reconnect")
    assert_archive_equals_redis(client, db_path, [before, session, job], timeout=5)
    assert daemon.proc.poll() is None

    checked = archiver_cli(server, url, db_path, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    backfilled = archiver_cli(server, url, db_path, "backfill", "--json")
    assert backfilled.returncode == 0, backfilled.stderr
    client.close()


def readme_acl_command() -> list[str]:
    """The words of the ACL command the deployment page gives for the archiver's user (the page's
    other one adds the grant ``restore favorites`` needs)."""
    page = (REPO / "docs" / "deployment.md").read_text()
    [line] = [line for line in page.splitlines() if line.startswith("ACL SETUSER desto-archiver on ")]
    return line.split()


def test_the_acl_user_the_readme_gives_is_enough_and_a_missing_permission_is_waited_for(
    fresh_redis, db_path: Path, daemons
) -> None:
    admin = fresh_redis.client()
    admin.execute_command(*(word.replace("CHANGE-ME", "pw") for word in readme_acl_command()))
    url = f"redis://desto-archiver:pw@127.0.0.1:{fresh_redis.port}/0"
    # First that user without TIME: the daemon says what to grant, and waits for it, retrying.
    admin.execute_command("ACL", "SETUSER", "desto-archiver", "-time")
    before = write_session(admin)[0]
    daemon = daemons(fresh_redis, db_path, REDIS_URL=url)
    failed = daemon.wait_log("redis.read_failed")[0]
    assert "no permissions to run the 'time' command" in failed["error"], failed
    advice = "grant the Redis user what the archiver needs: docs/deployment.md, 'With a Redis ACL user'"
    assert failed["action"] == advice
    time.sleep(1.0)
    assert daemon.proc.poll() is None
    assert len(daemon.events("redis.read_failed")) == 1  # retried with a backoff, logged once

    admin.execute_command("ACL", "SETUSER", "desto-archiver", "+time")
    daemon.wait_reconcile("start")
    session, _ = write_session(admin)
    admin.hset(session, mapping={"status": "finished", "end_time": now_iso()})
    wait_for(lambda: (archived(db_path, session) or {"status": None})["status"] == "finished", 5, what="a change")
    assert_archive_equals_redis(admin, db_path, [before, session], timeout=5)
    assert not daemon.events("redis.scripting_refused")  # the user may run the read script
    assert daemon.events("archiver.recovered")

    # the heartbeat (every 0.2 s here) tells check that the reads recovered
    wait_for(lambda: heartbeat(db_path)["failing"] is None, 5, what="a heartbeat with nothing failing")
    checked = archiver_cli(fresh_redis, url, db_path, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "CONFIG SET unknown" in checked.stdout  # this user may not ask (ACL DRYRUN), and check sets nothing
    assert archiver_cli(fresh_redis, url, db_path, "backfill").returncode == 0
    admin.close()


def test_a_user_that_may_not_run_scripts_is_read_with_multi_exec(fresh_redis, db_path: Path, daemons) -> None:
    admin = fresh_redis.client()
    admin.execute_command(*(word.replace("CHANGE-ME", "pw") for word in readme_acl_command()))
    admin.execute_command("ACL", "SETUSER", "desto-archiver", "-eval", "-evalsha", "-script|load")
    url = f"redis://desto-archiver:pw@127.0.0.1:{fresh_redis.port}/0"
    before = write_session(admin)[0]
    daemon = start_ready(daemons, fresh_redis, db_path, REDIS_URL=url)
    session, _ = write_session(admin)
    admin.hset(session, mapping={"status": "failed", "end_time": now_iso()})
    wait_for(lambda: (archived(db_path, session) or {"status": None})["status"] == "failed", 5, what="a change")
    assert_archive_equals_redis(admin, db_path, [before, session], timeout=5)
    [refused] = daemon.events("redis.scripting_refused")
    assert "to run the 'evalsha' command" in refused["error"], refused
    admin.close()


def test_a_user_that_may_not_read_desto_s_keys_is_told_so_not_read_another_way(fresh_redis, db_path: Path) -> None:
    admin = fresh_redis.client()
    words = [word.replace("CHANGE-ME", "pw") for word in readme_acl_command()]
    admin.execute_command(*(("~desto:session:*" if word == "~desto:*" else word) for word in words))
    write_session(admin)
    write_job(admin)  # a key this user may not read
    url = f"redis://desto-archiver:pw@127.0.0.1:{fresh_redis.port}/0"
    result = archiver_cli(fresh_redis, url, db_path, "backfill")
    assert result.returncode == 1
    assert "no permissions to access one of the keys" in result.stderr, result.stderr
    assert "grant the Redis user what the archiver needs" in result.stderr
    assert "scripting_refused" not in result.stderr  # the script was allowed: the keys were not
    admin.close()


class SlowInbox(Inbox):
    """A listener that falls behind: each socket read's notifications are handed over late."""

    def keys_changed(self, events: list[tuple[bytes, bytes]]) -> None:
        time.sleep(0.02)
        super().keys_changed(events)


@pytest.mark.parametrize("protocol", ["2", "3"])
def test_a_barrier_on_the_subscription_comes_after_every_notification_sent_before_it(
    redis_server, redis, db_path: Path, protocol: str
) -> None:
    """What the count of missed changes rests on (archiver/daemon/missed.py): once the listener reaches a
    barrier asked for after some changes, it has handed over the notification of each of them;
    in either of Redis' protocols, whose PING answers differ on a subscribed connection."""
    settings = settings_for(redis_server, db_path, redis_url=f"{redis_server.url}?protocol={protocol}")
    inbox = SlowInbox(10_000)
    source = Source(settings)
    listener = Listener(settings, source, inbox)
    listener.start()
    try:
        wait_for(inbox.connected.is_set, 10, what="the subscription")
        inbox.watch()
        keys = [f"desto:session:s{i}" for i in range(2000)]
        with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hset(key, "status", "running")
            pipe.execute()
        number = inbox.ask_barrier()
        wait_for(lambda: inbox.barrier_passed(number), 10, what="the barrier")
        assert inbox.watched() == {key.encode() for key in keys}
    finally:
        listener.stop()
        listener.join(timeout=5)
        source.close()
