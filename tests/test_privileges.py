"""Privileges: nothing handed to the neighbours of the archive's folder (desto's group may write
it): the daemon's lock file, a daemon run as root, the systemd unit the command prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.archive.store import DaemonLock, Store, StoreError
from archiver.config import load_settings
from archiver.daemon.systemd import render_unit
from tests.helpers import REPO

pytestmark = pytest.mark.unit

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the test machine runs as root)")


# ─── the lock file in the shared folder ──────────────────────────────────────────────────────────


def test_the_daemon_s_lock_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    """desto's group may write the archive's folder (2770): a member swapping the lock file for a
    link must not have the daemon truncate and write the file it points at."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    db = tmp_path / "data" / "desto.db"
    db.parent.mkdir()
    Path(f"{db}.archiver-lock").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        DaemonLock(db).acquire()
    assert victim.read_text() == "precious"
    Path(f"{db}.archiver-lock").unlink()
    Path(f"{db}.archiver-lock").symlink_to(tmp_path / "not-yet")  # a dangling link: nothing created there
    with pytest.raises(StoreError, match="symbolic link"):
        DaemonLock(db).acquire()
    assert not (tmp_path / "not-yet").exists()


def test_the_daemon_s_lock_is_a_regular_file_of_its_own_with_one_name(tmp_path: Path) -> None:
    """A lock file that is another name of the archive (a hard link) is not truncated."""
    db = tmp_path / "data" / "desto.db"
    db.parent.mkdir()
    Store.open(db).close()
    size = db.stat().st_size
    os.link(db, f"{db}.archiver-lock")
    with pytest.raises(StoreError, match="other names"):
        DaemonLock(db).acquire()
    assert db.stat().st_size == size
    os.unlink(f"{db}.archiver-lock")
    os.mkfifo(f"{db}.archiver-lock")
    with pytest.raises(StoreError, match="not a regular file"):
        DaemonLock(db).acquire()


@root_only
def test_the_daemon_s_lock_of_another_user_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "data" / "desto.db"
    db.parent.mkdir()
    lock = Path(f"{db}.archiver-lock")
    lock.write_text("theirs")
    os.chown(lock, 12345, 12345)
    with pytest.raises(StoreError, match="belongs to uid 12345"):
        DaemonLock(db).acquire()
    assert lock.read_text() == "theirs"


# ─── the systemd unit ────────────────────────────────────────────────────────────────────────────


@root_only
@pytest.mark.parametrize("login", [None, "alice"], ids=["root", "sudo-keeping-the-caller-s-name"])
def test_systemd_unit_run_as_root_without_user_is_refused(tmp_path: Path, login: str | None) -> None:
    """Run as root (sudo), the command does not guess an account, whatever LOGNAME says: the unit
    must not run the archiver as root, nor as someone the environment named."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOGNAME", "USER", "LNAME", "USERNAME")}
    if login is not None:
        env.update(LOGNAME=login, USER=login, SUDO_USER=login)
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "systemd-unit", "--db", str(tmp_path / "desto.db")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and not result.stdout, result.stdout
    assert "--user" in result.stderr and "root" in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["user", "db", "env_file"])
def test_systemd_unit_values_with_control_characters_are_refused(tmp_path: Path, where: str) -> None:
    """A newline in a path or a name would add directives of its own to the unit."""
    injected = "\nExecStartPre=/bin/sh -c 'id > /tmp/owned'\n"
    db = tmp_path / ("desto_data" + (injected if where == "db" else "")) / "desto.db"
    with pytest.raises(ValueError, match="control character"):
        render_unit(
            load_settings(sqlite_db_path=str(db)),
            executable=Path("/opt/desto-archiver/.venv/bin/desto-archiver"),
            user="desto" + (injected if where == "user" else ""),
            env_file="/etc/desto-archiver/desto-archiver.env" + (injected if where == "env_file" else ""),
        )


# ─── the daemon as root ──────────────────────────────────────────────────────────────────────────


@root_only
def test_run_as_root_refuses_unless_allowed(tmp_path: Path) -> None:
    """As root, the daemon would create and write files in a folder desto's group shares: it says
    so and how to go on, before it touches anything (the other tests' daemons are allowed)."""
    db = tmp_path / "desto_data" / "desto.db"
    db.parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_"))}
    env.update(REDIS_URL="redis://127.0.0.1:1/0", SQLITE_DB_PATH=str(db), ARCHIVER_LOG_FORMAT="json")
    result = subprocess.run(
        [sys.executable, "-m", "archiver", "run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert "as root" in result.stderr and "--allow-root" in result.stderr and "ARCHIVER_ALLOW_ROOT" in result.stderr
    assert list(db.parent.iterdir()) == []
