"""The command line as a user runs it: help, exit codes, messages, backfill."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver.cli import build_parser
from archiver.output import to_json, write_json_array, write_table
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
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages if page.exists())
    assert re.search(rf"^#+ .*`{command}`", text, re.MULTILINE), f"README and docs/ have no section for `{command}`"


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


def test_tables_and_json_arrays_are_written_as_their_rows_come() -> None:
    """A long listing is never held whole: the first row is out once the first page is read."""
    produced: list[int] = []

    def rows(n: int) -> Iterator[dict[str, object]]:
        for i in range(n):
            produced.append(i)
            yield {"id": i, "name": "long name here" if i == 1500 else "short"}

    class Out(io.StringIO):
        read_before_first_row: int | None = None

        def write(self, text: str) -> int:
            if self.read_before_first_row is None and text.startswith("0 "):
                self.read_before_first_row = len(produced)
            return super().write(text)

    out = Out()
    assert write_table(rows(5_000), ["id", "name"], out, page=1_000) == 5_000
    assert out.read_before_first_row == 1_000
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["id   name", "---  -----", "0    short"] and len(lines) == 5_002  # widths of page 1
    assert lines[2 + 1500] == "1500  long name here"  # wider than the first page: only its own line shifts
    assert lines[2 + 1501] == "1501  short"
    empty = io.StringIO()
    assert write_table(iter([]), ["id"], empty) == 0 and empty.getvalue() == "(none)\n"

    produced.clear()
    array = io.StringIO()
    assert write_json_array(rows(3), array) == 3
    assert array.getvalue() == to_json(list(rows(3))) + "\n"
    pages = io.StringIO()  # several pages join into one array
    assert write_json_array(rows(1_234), pages, page=500) == 1_234
    assert pages.getvalue() == to_json(list(rows(1_234))) + "\n"
    assert write_json_array(iter([]), array) == 0 and array.getvalue().endswith("[]\n")
