"""The README's quick start, as a new user runs it: its exact command, in a copy of the project's
own files, a fresh virtual environment, then Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from tests.helpers import REPO, count, log_events, project_files, session_hash, wait_for


def quick_start_command() -> str:
    """The README's "Quick start" command, the first of its section (the second runs the tests)."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    [command] = blocks[0].strip().splitlines()
    assert command.endswith("desto-archiver run"), command
    return command


def project_copy(dest: Path) -> Path:
    for name in project_files():
        if (REPO / name).is_file():  # a file deleted but not yet committed is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_readme_s_quick_start_archives_into_desto_data_and_stops_at_ctrl_c(fresh_redis, tmp_path: Path) -> None:
    """desto's default Redis is localhost:6379, which the machine's own Redis may hold: the test's
    server stands in through REDIS_PORT, the one thing added to the user's environment (with,
    where the suite runs as root, the permission the README tells root to give)."""
    clone = project_copy(tmp_path / "desto-archiver")
    assert not (clone / ".venv").exists() and not (clone / "desto_data").exists()
    client = fresh_redis.client()
    record = session_hash(session_name="nightly-report")
    client.hset(f"desto:session:{record['session_id']}", mapping=record)
    log_path = tmp_path / "quick-start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHIVER_", "REDIS_", "SQLITE_", "VIRTUAL_ENV"))}
    env["REDIS_PORT"] = str(fresh_redis.port)
    if os.geteuid() == 0:
        assert "`ARCHIVER_ALLOW_ROOT=true`" in (REPO / "README.md").read_text().split("## Quick start", 1)[1]
        env["ARCHIVER_ALLOW_ROOT"] = "true"
    with log_path.open("wb") as out:
        # its own process group, as a terminal's foreground job: Ctrl-C reaches the whole group
        proc = subprocess.Popen(
            ["bash", "-c", quick_start_command()],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        archive = clone / "desto_data" / "desto.db"
        wait_for(lambda: archive.exists() and count(archive, "sessions") == 1, 180, what="the quick start's archive")
        later = session_hash(session_name="after-start")
        client.hset(f"desto:session:{later['session_id']}", mapping=later)
        wait_for(lambda: count(archive, "sessions") == 2, 10, what="a change made while it runs")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        client.close()
    events = [e["event"] for e in log_events(log_path) if "event" in e]
    assert events[:2] == ["archive.created", "archiver.started"] and events[-1] == "archiver.stopped", events
    created = next(e for e in log_events(log_path) if e.get("event") == "archive.created")
    assert created["db"] == str(archive), "a new archive is named by its absolute path"
    # the archive holds command lines: the owner's and its group's, whatever the umask let the world
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in archive.parent.iterdir()}
    assert all(mode & 0o007 == 0 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    stopped = log_events(log_path)[-1]
    assert stopped["left_for_next_start"] == 0 and stopped["written"] == {"session": 2}, stopped
