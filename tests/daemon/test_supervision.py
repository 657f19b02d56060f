"""Supervisors' view of a running daemon: the systemd notify protocol on a real datagram socket,
Prometheus metrics, and the unit the systemd-unit command prints."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from archiver.config import load_settings
from archiver.daemon.health import Notifier
from archiver.daemon.systemd import render_unit
from tests.fault_helpers import start_ready
from tests.helpers import REPO, count, job_hash, session_hash, wait_for
from tests.redis_server import RedisServer, free_port


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def receive(sock: socket.socket, within: float = 0.3) -> list[str]:
    """The datagrams that arrive within ``within`` seconds."""
    messages = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(65536).decode())
        except TimeoutError:
            break
    return messages


def test_the_daemon_speaks_the_notify_protocol(redis_server, redis, db_path: Path, daemons, notify_socket):
    sock, path = notify_socket
    daemon = daemons(
        redis_server, db_path, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000", ARCHIVER_HEARTBEAT_INTERVAL="0.2"
    )
    proc = daemon.proc
    messages: list[str] = []
    try:
        wait_for(lambda: messages.extend(receive(sock)) or any("READY=1" in m for m in messages), what="READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=" in ready  # READY comes once the file is open, with what the daemon does
        daemon.wait_reconcile("start")
        redis.hset("desto:job:j1", mapping=job_hash("j1"))
        wait_for(lambda: count(db_path, "jobs") == 1)
        before = len(messages)
        wait_for(lambda: messages.extend(receive(sock)) or len(messages) > before + 6, what="more messages")
        recent = messages[before:]
        assert sum("WATCHDOG=1" in m for m in recent) >= 2  # every half of WATCHDOG_USEC, from the loop
        assert any("STATUS=archiving:" in m and "rows written" in m for m in recent)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        messages.extend(receive(sock))
        assert any("STOPPING=1" in m for m in messages[before:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ready_comes_while_redis_is_down_and_status_names_what_it_waits_for(
    db_path: Path, tmp_path: Path, daemons, notify_socket
) -> None:
    """A daemon waiting for Redis is a healthy daemon: under systemd, READY=1 withheld until Redis
    answers makes TimeoutStartSec kill it and restart it in a loop while Redis is down at boot."""
    sock, path = notify_socket
    server = RedisServer(tmp_path / "late-redis")  # its port, with nothing listening on it yet
    proc = daemons(
        server, db_path, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="400000", ARCHIVER_HEARTBEAT_INTERVAL="0.2"
    ).proc
    messages: list[str] = []
    try:
        wait_for(lambda: messages.extend(receive(sock)) or any("READY=1" in m for m in messages), what="READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"STATUS=waiting for Redis at redis://127.0.0.1:{server.port}/0" in ready, ready
        assert db_path.exists(), "ready means the archive is open"
        # Still waiting, and alive to the watchdog all the while.
        before = len(messages)
        wait_for(lambda: messages.extend(receive(sock)) or len(messages) > before + 6, what="more messages")
        assert sum("WATCHDOG=1" in m for m in messages[before:]) >= 2
        assert any("STATUS=waiting for Redis" in m for m in messages[before:])
        assert proc.poll() is None

        server.start()
        try:
            server.client().hset("desto:job:late", mapping=job_hash("late"))
            wait_for(lambda: count(db_path, "jobs") == 1, 20, what="the job archived once Redis is up")
            wait_for(
                lambda: messages.extend(receive(sock)) or any("STATUS=archiving:" in m for m in messages),
                what="STATUS=archiving",
            )
            assert sum("READY=1" in m for m in messages) == 1, "READY=1 is sent once"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            server.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_notifier_is_silent_without_a_socket_and_handles_abstract_addresses(notify_socket) -> None:
    quiet = Notifier(address="", watchdog_usec="")
    assert not quiet.enabled and quiet.watchdog_interval is None
    quiet.ready("x")  # nothing to send to: no error
    sock, path = notify_socket
    loud = Notifier(address=str(path), watchdog_usec="30000000")
    assert loud.watchdog_interval == 15.0
    loud.status("hello")
    assert receive(sock) == ["STATUS=hello"]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"desto-archiver-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(0.2)
    try:
        notifier = Notifier(address="@" + name)
        notifier.watchdog()
        notifier.close()
        assert receive(abstract) == ["WATCHDOG=1"]
    finally:
        abstract.close()
    loud.close()


def test_metrics_endpoint_serves_prometheus_text(redis_server, redis, db_path: Path, daemons) -> None:
    port = free_port()
    proc = start_ready(daemons, redis_server, db_path, ARCHIVER_METRICS_PORT=str(port)).proc
    try:
        for _ in range(3):
            record = session_hash()
            redis.hset(f"desto:session:{record['session_id']}", mapping=record)
        redis.hset("desto:job:bad", mapping=job_hash("bad", status="exploded"))
        wait_for(lambda: count(db_path, "sessions") == 3 and count(db_path, "quarantine") == 1)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        text = wait_for(lambda: (t := scrape()) and 'desto_archiver_rows_written_total{kind="session"} 3.0' in t and t)
        for line in (
            "desto_archiver_quarantined_total 1.0",
            "desto_archiver_reconciles_total 1.0",
            "desto_archiver_redis_subscribed 1.0",
            "desto_archiver_pending_keys 0.0",
            "desto_archiver_lag_seconds 0.0",
            "desto_archiver_write_failures_total 0.0",
            'desto_archiver_failing{operation="sqlite"} 0.0',
            'desto_archiver_failing{operation="redis"} 0.0',
        ):
            assert line in text, line
        assert "desto_archiver_events_received_total" in text and "desto_archiver_keys_read_total" in text
        assert 'desto_archiver_batch_seconds_bucket{le="0.1"}' in text
        assert "desto_archiver_tombstones_total 0.0" in text and "desto_archiver_reconnects_total 0.0" in text
        with pytest.raises(OSError):  # bound to 127.0.0.1 only, by default
            socket.create_connection((_outside_address(), port), timeout=1).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def _outside_address() -> str:
    """An address of this machine other than loopback (the metrics must not listen there)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        address = probe.getsockname()[0]
    except OSError:
        address = "0.0.0.0"
    finally:
        probe.close()
    assert not address.startswith("127."), "this machine has no address besides loopback"
    return str(address)


def test_metrics_on_a_port_in_use_is_a_clear_error(redis_server, db_path: Path, daemons) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        daemon = daemons(redis_server, db_path, ARCHIVER_METRICS_PORT=str(busy.getsockname()[1]))
        assert daemon.proc.wait(timeout=20) == 1
        assert "cannot serve metrics on 127.0.0.1" in daemon.log.read_text()
    finally:
        busy.close()


def test_systemd_unit_command_prints_the_shipped_unit_for_its_paths(tmp_path: Path) -> None:
    shipped = (REPO / "docker" / "systemd" / "desto-archiver.service").read_text()
    settings = load_settings(sqlite_db_path="/var/lib/desto/desto.db")
    rendered = render_unit(settings, executable=Path("/opt/desto-archiver/.venv/bin/desto-archiver"), user="desto")
    assert directives(rendered) == directives(shipped)
    home = render_unit(load_settings(sqlite_db_path="/home/alice/desto_data/desto.db"), user="alice")
    assert "ProtectHome=read-only" in home and "ReadWritePaths=/home/alice/desto_data" in home


def test_systemd_unit_never_names_root() -> None:
    """Root installs system services, but the unit it prints runs the archiver as an unprivileged
    account, as the shipped one does (run as root without --user, tests/test_secrets.py)."""
    with pytest.raises(ValueError, match="unprivileged account"):
        render_unit(load_settings(sqlite_db_path="/var/lib/desto/desto.db"), user="root")
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "systemd-unit", "--user", "root"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "--user root" in result.stderr and not result.stdout


def test_systemd_unit_for_this_installation_passes_systemd_analyze(tmp_path: Path) -> None:
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "desto-archiver"
    result = subprocess.run(
        [str(venv_bin), "systemd-unit", "--user", "desto", "--db", str(tmp_path / "data" / "desto.db")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert f"ExecStart={venv_bin.resolve()} run" in result.stdout
    assert f"ReadWritePaths={tmp_path / 'data'}" in result.stdout
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed to verify the unit (Debian: systemd)"
    unit = tmp_path / "desto-archiver.service"
    unit.write_text(result.stdout)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if "desto-archiver.service" in line]
    assert verify.returncode == 0 and not problems, verify.stdout + verify.stderr
