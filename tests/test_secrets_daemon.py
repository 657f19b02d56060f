"""Secrets, with the daemon: what it logs and keeps in the archive's heartbeat (which desto's group
reads) holds no password, however the password was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.fault_helpers import heartbeat
from tests.helpers import REPO, count, daemon_env, session_hash, wait_for


def bytes_in_files(needle: str, *paths: Path) -> list[str]:
    """The files among ``paths`` holding ``needle``, looked at by another process: this one must not
    open() the archive's files while it may hold SQLite connections to them."""
    found = subprocess.run(
        ["grep", "-l", "-a", "-F", "--", needle, *[str(p) for p in paths if p.exists()]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return found.stdout.split()


def archive_files(db_path: Path) -> list[Path]:
    return [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}.archiver-lock")]


def test_the_daemon_never_logs_or_keeps_what_libpq_said_about_a_postgres_password(
    redis_server, redis, db_path: Path, daemons
) -> None:
    """A password libpq cannot decode: given in the URL's user part, the daemon refuses to start and
    says why; given in its query (libpq's ?password=), libpq's complaint is logged (ship.failed)
    and kept in the heartbeat with the password hidden."""
    refused = daemons(redis_server, db_path, ARCHIVER_POSTGRES_URL="postgresql://u:pa%zzss@127.0.0.1:5432/db")
    assert refused.proc.wait(timeout=30) == 2
    said = refused.log.read_text()
    assert "ARCHIVER_POSTGRES_URL" in said and "percent" in said and "zzss" not in said, said

    daemon = daemons(redis_server, db_path, ARCHIVER_POSTGRES_URL="postgresql://u@127.0.0.1:5432/db?password=pa%zzss")
    [failed] = daemon.wait_log("ship.failed", timeout=30)
    assert "invalid percent-encoded token" in failed["error"], failed
    beat = wait_for(
        lambda: (b := heartbeat(db_path)) is not None and (b.get("ship") or {}).get("failing") and b,
        timeout=15,
        what="a heartbeat with the shipping failure",
    )
    assert "invalid percent-encoded token" in beat["ship"]["failing"], beat
    daemon.close()
    assert "zzss" not in daemon.log.read_text()
    assert "zzss" not in json.dumps(heartbeat(db_path))
    assert bytes_in_files("zzss", *archive_files(db_path)) == []


def test_a_redis_password_in_the_url_s_query_never_reaches_the_log_or_the_heartbeat(
    fresh_redis, db_path: Path, daemons
) -> None:
    """redis-py takes a password from the URL's query too (?password=, whatever its percent-encoding):
    the daemon authenticates with it, and shows the address without it."""
    fresh_redis.client().config_set("requirepass", "query-secret")
    url = f"redis://127.0.0.1:{fresh_redis.port}/0?pass%77ord=query-secret"
    daemon = daemons(fresh_redis, db_path, REDIS_URL=url)
    [started] = daemon.wait_log("archiver.started", timeout=30)
    assert started["redis"] == f"redis://127.0.0.1:{fresh_redis.port}/0"
    beat = wait_for(lambda: (b := heartbeat(db_path)) is not None and b["subscribed"] and b, 15, what="subscribed")
    assert beat["redis"] == f"redis://127.0.0.1:{fresh_redis.port}/0"
    daemon.close()
    assert "query-secret" not in daemon.log.read_text()
    assert bytes_in_files("query-secret", *archive_files(db_path)) == []


def test_secrets_read_from_files_authenticate_backfill_and_the_daemon(
    fresh_redis, tmp_path: Path, db_path: Path
) -> None:
    fresh_redis.client().config_set("requirepass", "file-secret")
    password = tmp_path / "redis-password"
    password.write_text("file-secret\n")
    password.chmod(0o600)
    url = tmp_path / "redis-url"
    url.write_text(f"redis://127.0.0.1:{fresh_redis.port}/0\n")
    client = fresh_redis.client(password="file-secret")
    record = session_hash(session_name="from-files")
    client.hset(f"desto:session:{record['session_id']}", mapping=record)
    client.close()
    # the files name the test's server; without them, the host and port given here answer nothing
    env = daemon_env(fresh_redis, db_path, REDIS_URL_FILE=str(url), REDIS_PASSWORD_FILE=str(password))
    env.update(REDIS_HOST="127.0.0.1", REDIS_PORT="1")
    del env["REDIS_URL"]
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "backfill", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "file-secret" not in result.stdout + result.stderr
    assert count(db_path, "sessions") == 1
