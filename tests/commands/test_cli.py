"""The command line as a user runs it: help, exit codes, messages, backfill."""

from __future__ import annotations

import io
import json
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archiver.commands.cli import build_parser
from archiver.output import to_json, write_json_array, write_table
from tests.helpers import REPO, daemon_env
from tests.redis_server import free_port

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_a_row_in_the_readme(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "Example" in result.stdout and f"desto-archiver {command}" in result.stdout
    readme = (REPO / "README.md").read_text()
    assert re.search(rf"^\| `{command}` \|", readme, re.MULTILINE), f"README's command table has no row for `{command}`"


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
    # a folder that exists but takes no new file, even root's
    result = cli("run", env=daemon_env(redis_server, Path("/proc/desto.db")))
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


# ─── what a new user stumbles on ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("command", ["run", "backfill"])
def test_a_mistyped_folder_is_refused_not_made_into_a_new_archive(command: str, redis_server, tmp_path: Path) -> None:
    typo = tmp_path / "srv" / "dsto" / "desto.db"
    result = cli(command, env=daemon_env(redis_server, typo))
    assert result.returncode == 2, result.stderr
    assert f"the folder {typo.parent} does not exist" in result.stderr and "mkdir -p" in result.stderr
    assert not (tmp_path / "srv").exists(), "nothing is created"
    # a file given where the folder should be is refused the same way
    (tmp_path / "a-file").write_text("")
    result = cli(command, env=daemon_env(redis_server, tmp_path / "a-file" / "desto.db"))
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_a_new_archive_is_never_created_silently(redis_server, redis, tmp_path: Path) -> None:
    """desto's default folder, desto_data/, is created (desto creates it too), and each new
    archive is named with its absolute path; an existing one is not announced again. Run from a
    shell's usual umask (0022), the folder and the archive are the owner's and its group's: the
    archive holds command lines."""
    env = daemon_env(redis_server, Path("desto_data/desto.db"))
    from_a_shell = (
        "import os, sys; os.umask(0o022); from archiver.commands.cli import main; "
        "sys.argv[0] = 'desto-archiver'; sys.exit(main())"
    )
    first = subprocess.run(
        [sys.executable, "-c", from_a_shell, "backfill"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    created = [json.loads(line) for line in first.stderr.splitlines() if '"archive.created"' in line]
    assert [e["db"] for e in created] == [str(tmp_path / "desto_data" / "desto.db")]
    folder = tmp_path / "desto_data"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}
    assert modes["desto_data"] == 0o770 and modes["desto.db"] == 0o660, {k: oct(v) for k, v in modes.items()}
    assert all(mode & 0o007 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    again = subprocess.run(
        [sys.executable, "-m", "archiver", "backfill"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "archive.created" not in again.stderr


def test_the_daemon_names_the_archive_it_creates(redis_server, tmp_path: Path) -> None:
    db = tmp_path / "desto.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver", "run"],
        env=daemon_env(redis_server, db),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        events = []
        for line in proc.stderr:
            events.append(json.loads(line)["event"])
            if events[-1] == "archiver.started":
                break
        assert events[:2] == ["archive.created", "archiver.started"], events
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


@pytest.mark.parametrize("command", [["run"], ["backfill"], ["stats"], ["health"]])
def test_db_pointing_at_a_folder_says_so(command: list[str], redis_server, tmp_path: Path) -> None:
    result = cli(*command, env=daemon_env(redis_server, tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path} is a folder: give the archive's file, e.g. {tmp_path / 'desto.db'}" in result.stderr
    assert "disk I/O" not in result.stderr


def test_a_mistyped_flag_after_a_command_shows_that_command_s_usage() -> None:
    result = cli("history", "--stauts", "failed")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: desto-archiver history "), result.stderr
    assert "unrecognized arguments: --stauts failed" in result.stderr and "did you mean --status?" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["history", "--status", "done"], "'done' is not a status of sessions (one of: failed, finished, running, "),
        (["export", "jobs", "--status", "starting"], "(one of: failed, finished, queued, running, scheduled)"),
        (["export", "quarantine", "--status", "sessions"], "(one of: atjob, favorite, job, session)"),
        (["export", "favorites", "--status", "x"], "favorites have no status"),
    ],
)
def test_a_status_filter_is_checked_against_the_statuses(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli(*args, "--db", str(tmp_path / "desto.db"))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_health_answers_in_json(redis_server, tmp_path: Path) -> None:
    result = cli("health", "--json", env=daemon_env(redis_server, tmp_path / "desto.db"))
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["healthy"] is False and "desto.db" in answer["reason"]


def test_a_quick_backfill_logs_no_progress(redis_server, redis, db_path: Path) -> None:
    """Progress is for long runs: every 5 s, from 5 s on (a run of a few milliseconds used to log it)."""
    redis.hset("desto:job:j1", mapping={"job_id": "j1", "session_id": "s", "command": "true", "status": "running"})
    result = cli("backfill", env=daemon_env(redis_server, db_path))
    assert result.returncode == 0, result.stderr
    assert "backfill.progress" not in result.stderr


def test_a_failed_start_on_a_file_that_is_not_sqlite_leaves_no_lock_file(redis_server, tmp_path: Path) -> None:
    db = tmp_path / "desto.db"
    db.write_text("these are notes, not a database\n" * 100)
    result = cli("run", env=daemon_env(redis_server, db))
    assert result.returncode == 1 and "is it a SQLite file" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desto.db"]
    # a lock file that was there before is another daemon's business: it stays
    lock = tmp_path / "desto.db.archiver-lock"
    lock.write_text("")
    assert cli("run", env=daemon_env(redis_server, db)).returncode == 1
    assert lock.exists()
