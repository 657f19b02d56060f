"""The command line as a user runs it: help, exit codes, messages, backfill."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.cli import build_parser
from tests.helpers import REPO, daemon_env
from tests.redis_server import free_port

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_a_readme_section(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout and f"desto-archiver {command}" in result.stdout
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^#+ .*`{command}`", readme, re.MULTILINE), f"README has no section for `{command}`"


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("desto-archiver ")


def test_unknown_command_is_a_usage_error() -> None:
    result = cli("archive-everything")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_backfill_with_redis_unreachable_says_what_to_do(db_path: Path) -> None:
    port = free_port()

    class Nowhere:
        url = f"redis://127.0.0.1:{port}/0"

    result = cli("backfill", env=daemon_env(Nowhere, db_path))
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in result.stderr
    assert "REDIS_HOST" in result.stderr


def test_run_with_an_unusable_path_exits_1_with_the_reason(redis_server, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = cli("run", env=daemon_env(redis_server, blocker / "desto.db"))
    assert result.returncode == 1
    assert "archive's folder must be writable" in result.stderr or "cannot create" in result.stderr


def test_run_refuses_a_file_from_a_newer_schema(redis_server, db_path: Path) -> None:
    import sqlite3

    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    result = cli("run", env=daemon_env(redis_server, db_path))
    assert result.returncode == 1
    assert "upgrade desto-archiver" in result.stderr
