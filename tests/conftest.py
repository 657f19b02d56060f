"""Fixtures: a real redis-server per test session (and fresh ones for tests that break them), the
daemon as a process, a desto-like writer, and the reliability report of the fault scenarios."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from archiver.log import configure
from tests.container_helpers import Image, build_image, engine_unavailable, mb
from tests.fault_helpers import FULL_SIZE, DaemonProcess, DestoWriter, Reliability, spawn_daemon
from tests.helpers import REPO
from tests.redis_server import RedisServer

UNIT_MODULE = "pytestmark = pytest.mark.unit"  # how a module declares that all its tests are unit tests


def pytest_configure(config: pytest.Config) -> None:
    """The daemons the tests start meet SIGINT and SIGHUP as one started from a terminal does: a
    suite run under `nohup`, or as a shell's background job, would otherwise hand them those
    signals ignored, which the daemon leaves ignored on purpose (its tests set that up
    themselves)."""
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``pytest -m unit`` does not even import the other modules: they need desto and servers,
    and the quick loop must run without either."""
    if config.getoption("markexpr") == "unit" and collection_path.name.startswith("test_"):
        return UNIT_MODULE not in collection_path.read_text()
    return None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One shared server; tests that stop, restart or reconfigure it take ``fresh_redis``."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared")).start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer):
    """A clean database and default notification flags on the shared server."""
    client = redis_server.client()
    client.flushall()
    client.config_set("notify-keyspace-events", "")
    yield client
    client.close()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, free to be restarted, frozen or killed."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server without persistence: a restart empties it."""
    server = RedisServer(tmp_path / "volatile-redis", appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def configless_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that refuses CONFIG (as managed Redis services do), notifications off."""
    server = RedisServer(tmp_path / "configless-redis", extra=["--rename-command", "CONFIG", ""]).start()
    yield server
    server.stop()


@pytest.fixture
def tight_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server that drops a subscriber whose unread output passes 256 kB."""
    server = RedisServer(tmp_path / "tight-redis").start()
    client = server.client()
    client.config_set("client-output-buffer-limit", "pubsub 256kb 64kb 1")
    client.close()
    yield server
    server.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "desto_data" / "desto.db"


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    configure("json", "debug")
    yield
    structlog.reset_defaults()


@pytest.fixture
def writers() -> Iterator[Callable[..., DestoWriter]]:
    """Starts desto-like writers; halts whatever still writes at the end."""
    started: list[DestoWriter] = []

    def start(server: RedisServer, seed: int = 0, pause: float = 0.003) -> DestoWriter:
        writer = DestoWriter(server, seed, pause)
        started.append(writer)
        writer.start()
        return writer

    yield start
    for writer in started:
        if writer.is_alive():
            writer.halt()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Starts ``python -m archiver run`` processes; kills whatever is left at the end, and prints
    each one's log (shown by pytest when the test fails)."""
    started: list[DaemonProcess] = []

    def start(
        server: RedisServer, db_path: Path, *, piped: bool = False, wrapper: Sequence[str] = (), **env: str
    ) -> DaemonProcess:
        log = tmp_path / f"daemon-{len(started)}.log"
        daemon = spawn_daemon(server, db_path, log, piped=piped, wrapper=wrapper, **env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
        text = daemon.log.read_text() if daemon.log.exists() else ""
        print(f"--- {daemon.log.name} (pid {daemon.pid}, exit {daemon.proc.returncode}) ---\n{text[-6000:]}")


# ─── the reliability report ──────────────────────────────────────────────────────────────────────

_RELIABILITY = pytest.StashKey[list[Reliability]]()
_REPORT_STARTED = pytest.StashKey[bool]()


def reliability_report_path(config: pytest.Config) -> Path | None:
    """Where the fault scenarios' rows go: $RELIABILITY_REPORT, else pytest's cache folder."""
    if os.environ.get("RELIABILITY_REPORT"):
        return Path(os.environ["RELIABILITY_REPORT"])
    cache = getattr(config, "cache", None)
    return None if cache is None else cache.mkdir("reliability") / "results.jsonl"


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Callable[[str, str], Reliability]:
    """Declares the test a fault scenario: ``reliability(fault, injection)`` gives the row to fill in.
    The row is written, with the test's outcome and duration, when the test has run."""
    rows = request.node.stash.setdefault(_RELIABILITY, [])

    def declare(fault: str, injection: str) -> Reliability:
        report = Reliability(fault, injection)
        rows.append(report)
        return report

    return declare


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    rows = item.stash.get(_RELIABILITY, [])
    if report.when == "call" and rows:
        path = reliability_report_path(item.config)
        if path is not None:
            mode = "a" if item.config.stash.get(_REPORT_STARTED, False) else "w"
            item.config.stash[_REPORT_STARTED] = True
            with open(path, mode) as out:
                for row in rows:
                    line = {
                        **row.as_dict(),
                        "test": item.nodeid,
                        "outcome": report.outcome,
                        "duration_s": round(report.duration, 1),
                        "size": "full" if FULL_SIZE else "ci",
                    }
                    out.write(json.dumps(line) + "\n")
    return report


# ─── the container tier (pytest -m container) ────────────────────────────────────────────────────


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test not marked ``unit`` is an integration test (``pytest -m unit`` runs in seconds).
    The container tier runs wherever an engine answers, and is skipped with the reason elsewhere."""
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.integration)
    tier = [item for item in items if item.get_closest_marker("container")]
    if not tier:
        return
    reason = engine_unavailable()
    if reason is not None:
        for item in tier:
            item.add_marker(pytest.mark.skip(reason=f"container tier: {reason}"))


@pytest.fixture(scope="session")
def archiver_image() -> Image:
    """docker/Dockerfile built once per test session, from the repository root as a user builds it."""
    image = build_image("desto-archiver:test", REPO, REPO / "docker" / "Dockerfile", base="python:3.12-slim-bookworm")
    print(f"\ndesto-archiver image: {mb(image.size)} ({mb(image.added)} over its base), built in {image.build_s:.0f} s")
    return image


@pytest.fixture(scope="session")
def dashboard_image() -> Image:
    """desto 0.7.0's dashboard (tests/fixtures/desto-dashboard), built once per test session."""
    return build_image("desto-dashboard:0.7.0-test", REPO / "tests" / "fixtures" / "desto-dashboard")


# ─── PostgreSQL (the shipping tests) ─────────────────────────────────────────────────────────────


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of the test's own on the machine's PostgreSQL; the test skips where none answers."""
    from tests.pg_helpers import scratch_database, skip_without_postgres

    skip_without_postgres()
    with scratch_database() as url:
        yield url
