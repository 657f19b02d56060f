"""Fixtures: a real redis-server per test session (and fresh ones for tests that break them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from archiver.log import configure
from tests.redis_server import RedisServer


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
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "desto_data" / "desto.db"


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    configure("json", "debug")
    yield
    structlog.reset_defaults()
