"""The operators' commands against a real Redis and a real file: backfill, check, stats, history,
show, export, backup, health."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from archiver.archive.reader import Reader
from archiver.archive.store import Store
from archiver.commands.backfill import Progress, backfill
from tests.helpers import (
    REPO,
    atjob_hash,
    count,
    daemon_env,
    daemon_thread,
    favorite_hash,
    job_hash,
    move_versions_ahead,
    query,
    row,
    session_hash,
    settings_for,
    wait_for,
)
from tests.redis_server import free_port


def cli(server, db_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archiver", *args],
        cwd=REPO,
        env=daemon_env(server, db_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load(redis, sessions: int, jobs_per_session: int = 1, favorites: int = 0, bad: int = 0) -> dict[str, list[str]]:
    """desto-shaped records, pipelined; returns the ids by kind."""
    ids: dict[str, list[str]] = {"session": [], "job": [], "favorite": [], "bad": []}
    with redis.pipeline(transaction=False) as pipe:
        for i in range(sessions):
            record = session_hash(status=("running", "finished", "failed")[i % 3], session_name=f"run-{i}")
            jobs = [
                job_hash(session_id=record["session_id"], status="finished", exit_code="0")
                for _ in range(jobs_per_session)
            ]
            record["job_ids"] = ",".join(j["job_id"] for j in jobs)
            pipe.hset(f"desto:session:{record['session_id']}", mapping=record)
            ids["session"].append(record["session_id"])
            for job in jobs:
                pipe.hset(f"desto:job:{job['job_id']}", mapping=job)
                ids["job"].append(job["job_id"])
        for i in range(favorites):
            fav = favorite_hash(name=f"fav-{i}", use_count=str(i))
            pipe.hset(f"desto:favorite:{fav['favorite_id']}", mapping=fav)
            ids["favorite"].append(fav["favorite_id"])
        for i in range(bad):
            pipe.hset(f"desto:job:bad-{i}", mapping=job_hash(f"bad-{i}", status="exploded"))
            ids["bad"].append(f"bad-{i}")
        pipe.execute()
    return ids


def dump(db_path: Path, tables=("sessions", "jobs", "favorites", "at_jobs", "quarantine", "status_history")) -> dict:
    conn = sqlite3.connect(db_path)
    try:
        return {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()


# ─── backfill ────────────────────────────────────────────────────────────────────────────────────


def test_backfill_of_20000_records_is_complete_idempotent_and_reports(redis_server, redis, db_path: Path) -> None:
    ids = load(redis, sessions=8_000, jobs_per_session=1, favorites=3_990, bad=10)
    redis.hset("desto:atjob:5", mapping=atjob_hash("5"))  # 20 001 records in all
    assert redis.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""

    first = cli(redis_server, db_path, "backfill", ARCHIVER_BATCH_SIZE="1000")
    assert first.returncode == 0, first.stderr
    assert "backfill done:" in first.stdout
    assert "session   8000     8000" in first.stdout and "job       8000     8000" in first.stdout
    assert "favorite  3990     3990" in first.stdout and "atjob     1        1" in first.stdout
    assert "quarantined  10 new, 0 already in quarantine" in first.stdout
    assert "keys/s" in first.stdout
    assert count(db_path, "sessions") == 8_000 and count(db_path, "jobs") == 8_000
    assert count(db_path, "favorites") == 3_990 and count(db_path, "at_jobs") == 1
    assert count(db_path, "quarantine") == 10
    assert redis.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""  # not needed, not set

    before = dump(db_path, tables=("sessions", "jobs", "favorites"))
    second = cli(redis_server, db_path, "backfill", "--json")
    summary = json.loads(second.stdout)
    assert summary["written"] == {} and summary["unchanged"] == 19_991 and summary["quarantined"] == 0
    assert summary["still_quarantined"] == 10
    after = dump(db_path, tables=("sessions", "jobs", "favorites"))
    # only the "last seen" columns moved (read_at_us, last_seen_at, expires_at)
    moving = {"read_at_us", "last_seen_at", "expires_at"}
    for table in after:
        names = [r[1] for r in query(db_path, f"PRAGMA table_info({table})")]
        keep = [i for i, name in enumerate(names) if name not in moving]
        assert [tuple(r[i] for i in keep) for r in before[table]] == [tuple(r[i] for i in keep) for r in after[table]]

    # a dry run after changes reports them and writes nothing
    redis.hset(f"desto:session:{ids['session'][0]}", "status", "failed")
    redis.delete(f"desto:job:{ids['job'][0]}")
    unchanged = dump(db_path)
    dry = json.loads(cli(redis_server, db_path, "backfill", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and dry["written"] == {"session": 1} and dry["tombstoned"] == 1
    assert dump(db_path) == unchanged


def indexes(db_path: Path) -> list[tuple[str, str]]:
    return [tuple(r) for r in query(db_path, "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")]


def test_a_first_backfill_builds_every_index_at_the_end_even_ones_it_did_not_create(
    redis_server, redis, db_path: Path
) -> None:
    load(redis, sessions=2_000, jobs_per_session=1, favorites=5)
    Store.open(db_path).close()
    with sqlite3.connect(db_path) as conn:  # an index of the user's own survives too
        conn.execute("CREATE INDEX my_jobs_by_end ON jobs(end_time) WHERE end_time IS NOT NULL")
    expected = indexes(db_path)
    assert ("my_jobs_by_end", "CREATE INDEX my_jobs_by_end ON jobs(end_time) WHERE end_time IS NOT NULL") in expected

    during: dict[str, set[str]] = {}  # the indexes there while each phase ran

    def progress(p: Progress) -> None:
        during.setdefault(p.phase, {name for name, _ in indexes(db_path)})

    report = backfill(settings_for(redis_server, db_path, batch_size=200), progress)
    assert report.written == {"session": 2_000, "job": 2_000, "favorite": 5}
    phases = list(during)
    assert phases[0] == "scan" and phases[-1] == "index"  # the load ran without them ...
    assert "idx_status_history_record" not in during["scan"] and "my_jobs_by_end" not in during["scan"]
    assert indexes(db_path) == expected  # ... and every one is back
    assert count(db_path, "archiver_state", "name = 'deferred_indexes'") == 0
    plan = query(db_path, "EXPLAIN QUERY PLAN SELECT * FROM status_history WHERE kind = 'job' AND record_id = 'x'")
    assert "idx_status_history_record" in " ".join(str(tuple(r)) for r in plan)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_indexes_a_killed_first_backfill_left_out_are_built_by_the_next_run_not_by_a_dry_run(
    redis_server, redis, db_path: Path
) -> None:
    Store.open(db_path).close()
    expected = indexes(db_path)
    store = Store.open(db_path)
    assert store.is_empty()
    assert store.defer_indexes() == 12  # desto's 6, its History tab's 2, the at-jobs' 2, the history's 2
    store.close()  # as a SIGKILL leaves it: indexes dropped, their definitions noted in the file
    left = indexes(db_path)
    assert "idx_status_history_record" not in dict(left) and "idx_quarantine_unresolved" in dict(left)

    load(redis, sessions=10)
    dry = cli(redis_server, db_path, "backfill", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["written"] == {"session": 10, "job": 10}
    assert indexes(db_path) == left  # a dry run writes nothing, not even the indexes

    Store.open(db_path).close()
    assert indexes(db_path) == expected
    assert count(db_path, "archiver_state", "name = 'deferred_indexes'") == 0


def test_a_backfill_into_an_archive_that_holds_records_keeps_its_indexes(
    redis_server, redis, db_path: Path, monkeypatch
) -> None:
    load(redis, sessions=50)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    load(redis, sessions=50)
    calls: list[str] = []
    original = Store.defer_indexes

    def spy(self: Store) -> int:
        calls.append("defer")
        return original(self)

    monkeypatch.setattr(Store, "defer_indexes", spy)
    expected = indexes(db_path)
    report = backfill(settings_for(redis_server, db_path))
    assert report.written == {"session": 50, "job": 50} and calls == []
    assert indexes(db_path) == expected


def test_a_backfill_with_redis_clock_behind_the_archive_brings_in_every_change(redis_server, redis, db_path) -> None:
    """Reads the archive holds dated an hour after anything Redis' clock dates now (a clock set back)
    must not make the backfill take Redis' records for older ones."""
    done, gone, running = (session_hash(status="running") for _ in range(3))
    for record in (done, gone, running):
        redis.hset(f"desto:session:{record['session_id']}", mapping=record)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    move_versions_ahead(db_path, 3600)
    redis.hset(f"desto:session:{done['session_id']}", mapping={"status": "finished", "end_time": "2026-11-27T14:00:00"})
    redis.delete(f"desto:session:{gone['session_id']}")
    job = job_hash(session_id=running["session_id"], status="running")
    redis.hset(f"desto:job:{job['job_id']}", mapping=job)

    again = cli(redis_server, db_path, "backfill", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["written"] == {"session": 1, "job": 1} and report["tombstoned"] == 1, report
    [behind] = [json.loads(line) for line in again.stderr.splitlines() if "redis.clock_behind" in line]
    assert 3500 < behind["behind_s"] <= 3600
    assert row(db_path, "sessions", "session_id", done["session_id"])["status"] == "finished"
    assert row(db_path, "sessions", "session_id", gone["session_id"])["gone_reason"] == "missing"
    assert row(db_path, "jobs", "job_id", job["job_id"])["status"] == "running"


def test_backfill_progress_is_logged_every_5_s_from_5_s_on_when_not_on_a_terminal(
    redis_server, redis, db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each page of the scan takes 2 s by the command's clock: a line at 6 s, 12 s, ... and none
    before 5 s (a run of a few milliseconds logs none: test_cli)."""
    from archiver.commands import cli as cli_module
    from archiver.commands import running

    load(redis, sessions=50)
    ticks = iter(range(0, 10_000, 2))

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return float(next(ticks))

    monkeypatch.setattr(running, "time", Clock)
    args = ["backfill", "--redis-url", redis_server.url, "--db", str(db_path), "--batch-size", "5"]
    code = cli_module.main([*args, "--log-format", "json"])
    err = capsys.readouterr().err
    assert code == 0, err
    progress = [e for e in map(json.loads, err.splitlines()) if e["event"] == "backfill.progress"]
    assert progress and progress[0]["phase"] == "scan" and progress[0]["keys_read"] > 0
    calls = [int(e["keys_scanned"]) for e in progress]
    assert calls == sorted(calls) and len(progress) < 50 // 5, "at most one line every 5 s (3 pages of 2 s)"


def test_backfill_progress_is_a_live_line_on_a_terminal(redis_server, redis, db_path: Path) -> None:
    load(redis, sessions=3_000)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver", "backfill", "--batch-size", "100"],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        stdout=subprocess.PIPE,
        stderr=child_fd,
    )
    os.close(child_fd)
    seen = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=60)
    os.close(main_fd)
    assert proc.returncode == 0
    assert b"\rscan: " in seen and b"keys scanned" in seen and b"/s)" in seen
    assert b"backfill.progress" not in seen  # people get the line, not log records
    assert b"backfill done:" in out


def test_backfill_beside_a_running_daemon(redis_server, redis, db_path: Path) -> None:
    with daemon_thread(settings_for(redis_server, db_path)):
        stop = threading.Event()

        def writer() -> None:
            while not stop.is_set():
                record = session_hash()
                redis.hset(f"desto:session:{record['session_id']}", mapping=record)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            result = cli(redis_server, db_path, "backfill", "--json")
        finally:
            stop.set()
            thread.join()
        assert result.returncode == 0, result.stderr
        live = redis.dbsize()
        wait_for(lambda: count(db_path, "sessions") == live, what="every session archived")


# ─── check ───────────────────────────────────────────────────────────────────────────────────────


def test_check_passes_on_a_healthy_set_up(redis_server, redis, db_path: Path) -> None:
    load(redis, sessions=20, favorites=3)
    with daemon_thread(settings_for(redis_server, db_path)):
        for path in db_path.parent.iterdir():
            path.chmod(0o660)  # as ARCHIVER_UMASK=0007 creates them
        result = cli(redis_server, db_path, "check", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout
    assert report["ok"] is True
    assert {c["check"]: c["status"] for c in report["checks"]} == {
        "sqlite": "ok",
        "redis": "ok",
        "notifications": "ok",
        "file": "ok",
        "permissions": "ok",
        "wal": "ok",
        "schema": "ok",
        "daemon": "ok",
        "missed changes": "ok",
    }
    assert report["verify"]["records"] == 43 and report["verify"]["missing"] == 0


OLD_SQLITE = (
    "import sqlite3, sys\n"
    "sqlite3.sqlite_version_info, sqlite3.sqlite_version = (3, 31, 1), '3.31.1'  # Ubuntu 20.04's\n"
    "from archiver.commands.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("command", [["run"], ["backfill"]], ids=["run", "backfill"])
def test_an_sqlite_too_old_for_the_archiver_is_refused_at_start_not_retried(
    command, redis_server, redis, db_path: Path
) -> None:
    load(redis, sessions=2)
    result = subprocess.run(
        [sys.executable, "-c", OLD_SQLITE, *command],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "SQLite 3.31.1 is too old: desto-archiver needs 3.35.0 or newer" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not db_path.exists()  # refused before anything was written
    checked = subprocess.run(
        [sys.executable, "-c", OLD_SQLITE, "check", "--no-daemon", "--json"],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    sqlite_check = {c["check"]: c for c in json.loads(checked.stdout)["checks"]}["sqlite"]
    assert checked.returncode == 1 and sqlite_check["status"] == "fail", checked.stdout


def config_sets(redis) -> int:
    """How many CONFIG SET commands the server has run."""
    return int(redis.info("commandstats").get("cmdstat_config|set", {}).get("calls", 0))


def test_check_changes_nothing_in_redis_configuration(fresh_redis, db_path: Path) -> None:
    """A doctor must not change what it examines: writing back the flags it just read would undo
    flags set in between, by the daemon or an operator."""
    admin = fresh_redis.client()
    try:
        admin.config_set("notify-keyspace-events", "KEA")
        before = config_sets(admin)
        result = cli(fresh_redis, db_path, "check", "--no-daemon", "--json")
        notifications = {c["check"]: c for c in json.loads(result.stdout)["checks"]}["notifications"]
        assert notifications["status"] == "ok"
        assert "CONFIG allowed" in notifications["detail"], notifications
        assert config_sets(admin) == before

        # a user that may read the flags but not set them is told so, still without a write
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-config|set")
        url = f"redis://reader:pw@127.0.0.1:{fresh_redis.port}/0"
        result = cli(fresh_redis, db_path, "check", "--no-daemon", "--json", REDIS_URL=url)
        notifications = {c["check"]: c for c in json.loads(result.stdout)["checks"]}["notifications"]
        assert "CONFIG SET refused" in notifications["detail"] and "config|set" in notifications["detail"]
        # one that may not ask Redis about permissions: unknown, not a guess
        admin.execute_command("ACL", "SETUSER", "reader", "-acl|dryrun")
        result = cli(fresh_redis, db_path, "check", "--no-daemon", "--json", REDIS_URL=url)
        notifications = {c["check"]: c for c in json.loads(result.stdout)["checks"]}["notifications"]
        assert "CONFIG SET unknown" in notifications["detail"], notifications
        assert config_sets(admin) == before
    finally:
        admin.close()


def test_a_folder_this_user_may_not_read_is_reported_as_such_not_as_redis_unreachable(
    redis_server, redis, tmp_path: Path
) -> None:
    folder = tmp_path / "private"
    folder.mkdir()
    db_path = folder / "desto.db"
    load(redis, sessions=2)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    if os.geteuid() == 0:  # root reads anything: take its right to, as a process of another user has none
        os.chown(folder, 65534, 65534)
        os.chmod(folder, 0o700)
        wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    else:
        os.chmod(folder, 0o000)
        wrapper = []
    try:
        for command in (["stats"], ["show", "x"], ["backup", str(tmp_path / "copy.db")], ["check", "--no-daemon"]):
            result = subprocess.run(
                [*wrapper, sys.executable, "-m", "archiver", *command],
                cwd=REPO,
                env=daemon_env(redis_server, db_path),
                capture_output=True,
                text=True,
                timeout=60,
            )
            said = result.stdout + result.stderr
            assert result.returncode == 1, (command, said)
            assert "Permission denied" in said, (command, said)
            assert "reach Redis" not in said and "Traceback" not in said, (command, said)
    finally:
        os.chmod(folder, 0o700)


def test_check_warns_of_an_archive_other_users_may_read(redis_server, redis, db_path: Path) -> None:
    with daemon_thread(settings_for(redis_server, db_path)):
        db_path.chmod(0o644)  # SQLite's own mode for a new file, under the usual umask 0022
        result = cli(redis_server, db_path, "check", "--json", "--no-verify")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"] is True, "a warning, not a failure"
    permissions = next(c for c in report["checks"] if c["check"] == "permissions")
    assert permissions["status"] == "warn" and "desto.db 0644" in permissions["detail"], permissions
    assert "ARCHIVER_UMASK=0007" in permissions["hint"] and f"chmod o-rwx {db_path}" in permissions["hint"]


def test_check_catches_a_corrupted_a_missing_and_an_extra_row(redis_server, redis, db_path: Path) -> None:
    ids = load(redis, sessions=10)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE jobs SET exit_code = 3 WHERE job_id = ?", (ids["job"][0],))
        conn.execute("DELETE FROM sessions WHERE session_id = ?", (ids["session"][1],))
        # a row lost, not erased: nobody's deletion is noted
        conn.execute("DELETE FROM archiver_erased WHERE record_id = ?", (ids["session"][1],))
        conn.execute(
            "INSERT INTO sessions (session_id, session_name, status, read_at_us) "
            "VALUES ('ghost', 'ghost', 'running', 1)"
        )
    conn.close()
    result = cli(redis_server, db_path, "check", "--no-daemon", "--show-diffs", "--settle", "0.2")
    assert result.returncode == 1
    assert re.search(r"verify\s+FAIL\s+20 live records: 1 missing, 1 differing, 1 extra", result.stdout)
    assert f"differing: desto:job:{ids['job'][0]}" in result.stdout
    assert "exit_code: archive 3 != redis 0" in result.stdout
    assert f"missing: desto:session:{ids['session'][1]}" in result.stdout
    assert "extra: desto:session:ghost" in result.stdout
    assert "'desto-archiver backfill' brings it in line" in result.stdout
    listed = [m.group(1) for m in re.finditer(r"^  (missing|differing|extra): ", result.stdout, re.MULTILINE)]
    assert listed == ["missing", "differing", "extra"], "listed as the summary counts them, not in SCAN order"


def test_check_counts_a_hundred_thousand_extra_rows_in_flat_memory(redis_server, redis, db_path: Path) -> None:
    """Rows Redis forgot (an archive kept far longer than Redis' 7 days, with no daemon to mark
    them gone) are counted page by page, never held: check's peak memory barely moves."""

    def peak_mb(extra: int) -> float:
        result, peak = peak_of_command(redis_server, db_path, extra, "check", "--no-daemon", "--settle", "0")
        assert result.returncode == 1 and f"0 live records: 0 missing, 0 differing, {extra} extra" in result.stdout
        return peak

    few, many = peak_mb(1_000), peak_mb(100_000)
    assert many - few < 8, (few, many)  # holding a difference per row: about 28 MB more


def peak_of_command(server, db_path: Path, sessions: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``desto-archiver <args>`` over a new archive of ``sessions`` sessions (and a fresh file
    afterwards): its result, and its peak RSS in MB as the process itself read it."""
    many_sessions(db_path, sessions)
    out = db_path.parent / "peak-rss.json"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.peak_rss", str(out), "archiver", *args],
            cwd=REPO,
            env=daemon_env(server, db_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return result, float(json.loads(out.read_text())["vm_hwm_kb"]) / 1024
    finally:
        for path in (out, db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
            path.unlink(missing_ok=True)


def test_check_with_a_big_batch_size_stays_within_sqlites_parameter_limit(redis_server, redis, db_path: Path) -> None:
    """ARCHIVER_BATCH_SIZE=5000: a SCAN page of thousands of keys, compared where SQLite takes
    999 parameters per statement (its default before 3.32; builds differ)."""
    from archiver.commands.check import verify
    from archiver.redis_side.source import Source

    load(redis, sessions=1_500)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    source = Source(settings_for(redis_server, db_path, batch_size=5_000))
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    try:
        report = verify(source, conn, 5_000, settle_s=0)
    finally:
        conn.close()
        source.close()
    assert report.ok and report.records == 3_000


def test_check_reports_an_unreachable_redis_and_a_dead_daemon(db_path: Path) -> None:
    class Nowhere:
        url = f"redis://127.0.0.1:{free_port()}/0"

    result = cli(Nowhere, db_path, "check")
    assert result.returncode == 1
    assert re.search(r"redis\s+FAIL\s+cannot reach", result.stdout) and "is Redis running?" in result.stdout
    assert "does not exist" in result.stdout


def test_a_redis_that_wants_a_password_is_told_apart_from_one_that_is_down(fresh_redis, db_path, daemons) -> None:
    fresh_redis.client().config_set("requirepass", "sekret")
    for given in ({}, {"REDIS_PASSWORD": "wrong"}):
        result = cli(fresh_redis, db_path, "backfill", **given)
        assert result.returncode == 1
        assert "Redis wants a password, or refused the one given: set REDIS_PASSWORD" in result.stderr, result.stderr
        assert "is Redis running?" not in result.stderr
    checked = cli(fresh_redis, db_path, "check")
    assert re.search(r"redis\s+FAIL\s+cannot reach", checked.stdout) and "Redis wants a password" in checked.stdout
    daemon = daemons(fresh_redis, db_path)
    for unreachable in daemon.wait_log("redis.unreachable"):
        assert unreachable["action"].startswith("Redis wants a password"), unreachable
    daemon.close()

    assert cli(fresh_redis, db_path, "backfill", REDIS_PASSWORD="sekret").returncode == 0


# ─── stats, history, show ────────────────────────────────────────────────────────────────────────


@pytest.fixture
def archived(redis_server, redis, db_path: Path) -> dict[str, str]:
    """A small archive made by the daemon: a chained session, a failed one, a deleted one."""
    nightly, failed, gone = session_hash(session_name="nightly"), session_hash(session_name="etl"), session_hash()
    first = job_hash(session_id=nightly["session_id"], status="running", start_time="2026-11-20T01:00:00")
    second = job_hash(session_id=nightly["session_id"], status="queued", start_time="")
    nightly.update(job_ids=f"{first['job_id']},{second['job_id']}", start_time="2026-11-20T01:00:00")
    failed.update(start_time="2026-11-25T09:00:00")
    with daemon_thread(settings_for(redis_server, db_path)):
        for record in (nightly, failed, gone):
            redis.hset(f"desto:session:{record['session_id']}", mapping=record)
        for job in (first, second):
            redis.hset(f"desto:job:{job['job_id']}", mapping=job)
        wait_for(lambda: count(db_path, "jobs") == 2 and count(db_path, "sessions") == 3)
        redis.hset(f"desto:job:{first['job_id']}", mapping={"status": "finished", "end_time": "2026-11-20T01:10:00"})
        redis.hset(f"desto:job:{second['job_id']}", mapping={"status": "running", "start_time": "2026-11-20T01:10:00"})
        redis.hset(f"desto:session:{failed['session_id']}", "status", "failed")
        redis.delete(f"desto:session:{gone['session_id']}")
        wait_for(lambda: row(db_path, "sessions", "session_id", gone["session_id"])["gone_at"] is not None)
        wait_for(lambda: row(db_path, "jobs", "job_id", second["job_id"])["status"] == "running")
        redis.hset(
            f"desto:session:{nightly['session_id']}", mapping={"status": "finished", "end_time": "2026-11-20T02:00:00"}
        )
        wait_for(lambda: row(db_path, "sessions", "session_id", nightly["session_id"])["status"] == "finished")
    return {"nightly": nightly["session_id"], "failed": failed["session_id"], "gone": gone["session_id"]}


def test_stats(redis_server, db_path: Path, archived) -> None:
    result = cli(redis_server, db_path, "stats", "--json")
    stats = json.loads(result.stdout)
    assert stats["records"]["sessions"]["total"] == 3 and stats["records"]["sessions"]["tombstoned"] == 1
    assert stats["records"]["sessions"]["by_status"] == {"failed": 1, "finished": 1, "running": 1}
    assert stats["records"]["jobs"]["by_status"] == {"finished": 1, "running": 1}
    assert stats["schema_version"] >= 2 and stats["file_bytes"] > 0
    assert stats["last_reconcile_at"] and stats["last_event_at"]
    text = cli(redis_server, db_path, "stats").stdout
    assert "sessions   3      1           failed 1, finished 1, running 1" in text
    assert "last reconcile" in text


def test_history_lists_and_filters_sessions(redis_server, db_path: Path, archived) -> None:
    def names(*args: str) -> list[str]:
        result = cli(redis_server, db_path, "history", "--json", *args)
        assert result.returncode == 0, result.stderr
        return sorted(s["session_name"] for s in json.loads(result.stdout))

    assert len(names()) == 3
    assert names("--status", "failed") == ["etl"]
    assert names("--name", "NIGHT") == ["nightly"]
    recent = names("--since", "2026-11-24")
    assert "etl" in recent and "nightly" not in recent and len(recent) == 2  # etl, and the one started today
    assert names("--until", "2026-11-21") == ["nightly"]
    assert len(names("--limit", "1")) == 1
    text = cli(redis_server, db_path, "history").stdout
    assert "nightly" in text and "finished" in text and "deleted" in text  # the gone session says why
    bad = cli(redis_server, db_path, "history", "--since", "last tuesday")
    assert bad.returncode == 2 and "neither an ISO date/time nor a span" in bad.stderr


def test_show_a_session_with_its_jobs_and_history(redis_server, db_path: Path, archived) -> None:
    by_name = json.loads(cli(redis_server, db_path, "show", "nightly", "--json").stdout)
    by_prefix = json.loads(cli(redis_server, db_path, "show", archived["nightly"][:8], "--json").stdout)
    assert by_name == by_prefix
    assert by_name["session"]["status"] == "finished" and by_name["session"]["duration_s"] == 3600.0
    assert [j["status"] for j in by_name["jobs"]] == ["finished", "running"]  # in desto's job order
    assert by_name["jobs"][0]["duration_s"] == 600.0
    events = [(e["kind"], e["event"], e["previous_status"], e["status"]) for e in by_name["history"]]
    assert ("session", "status", "running", "finished") in events
    assert ("job", "status", "queued", "running") in events
    durations = [e["duration_s"] for e in by_name["history"] if e["kind"] == "session"]
    assert durations[0] is not None and durations[-1] is None  # until the next change; the last is open
    text = cli(redis_server, db_path, "show", "nightly").stdout
    assert "status history:" in text and "jobs:" in text and "duration      3600.0 s" in text
    missing = cli(redis_server, db_path, "show", "no-such-session")
    assert missing.returncode == 1 and "no archived session has the id or name 'no-such-session'" in missing.stderr


def test_show_does_not_read_the_whole_archive(redis_server, db_path: Path, archived) -> None:
    """Finding a session by id prefix and reading its history go through the indexes: the work
    (SQLite's virtual-machine steps) stays the same when the archive holds 20,000 more sessions."""

    def shown(ident: str) -> tuple[int, dict[str, object]]:
        steps = [0]

        def tick() -> int:
            steps[0] += 1
            return 0

        with Reader.open(db_path) as reader:
            reader.conn.set_progress_handler(tick, 100)
            found = reader.show(ident)
        return steps[0], found

    prefix = archived["nightly"][:8]
    small_steps, small = shown(prefix)
    with sqlite3.connect(db_path) as conn:  # as the archiver writes them: a job and two events each
        for i in range(20_000):
            sid, jid = f"{i:08x}-0000-4000-8000-000000000000", f"{i:08x}-1111-4000-8000-000000000000"
            conn.execute("INSERT INTO sessions (session_id, session_name) VALUES (?, ?)", (sid, f"other-{i}"))
            conn.execute("INSERT INTO jobs (job_id, session_id) VALUES (?, ?)", (jid, sid))
            for kind, rid in (("session", sid), ("job", jid)):
                conn.execute(
                    "INSERT INTO status_history (kind, record_id, event, status, observed_at, source) "
                    "VALUES (?, ?, 'first_seen', 'running', '2026-11-27T00:00:00.000000Z', 'redis')",
                    (kind, rid),
                )
    big_steps, big = shown(prefix)
    assert big == small
    assert big_steps <= 2 * small_steps + 10, (small_steps, big_steps)  # reading it all: thousands


def test_show_a_session_with_more_jobs_than_sqlite_takes_parameters(db_path: Path) -> None:
    """A chain of 5,000 jobs, read where SQLite takes 999 parameters per statement (its default
    before 3.32; builds differ)."""
    Store.open(db_path).close()
    sid, jobs = "chain-session", [f"job-{i:05d}" for i in range(5_000)]
    event = (
        "INSERT INTO status_history (kind, record_id, event, status, observed_at, source) "
        "VALUES (?, ?, 'first_seen', 'finished', '2026-11-27T00:00:00.000000Z', 'redis')"
    )
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO sessions (session_id, session_name, job_ids) VALUES (?, 'chain', ?)", (sid, ",".join(jobs))
        )
        conn.executemany("INSERT INTO jobs (job_id, session_id) VALUES (?, ?)", [(j, sid) for j in jobs])
        conn.execute(event, ("session", sid))
        conn.executemany(event, [("job", j) for j in reversed(jobs)])
    with Reader.open(db_path) as reader:
        reader.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        shown = reader.show("chain")
    assert [j["job_id"] for j in shown["jobs"]] == jobs  # in the chain's order
    history = shown["history"]
    assert len(history) == 5_001 and history[0]["record_id"] == sid and history[-1]["record_id"] == jobs[0]
    assert [h["id"] for h in history] == sorted(h["id"] for h in history)


def many_sessions(db_path: Path, n: int) -> None:
    """``n`` archived sessions, written straight into a new archive (no Redis needed to read them)."""
    Store.open(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.executemany(
            "INSERT INTO sessions (session_id, session_name, status, created_at) VALUES (?, ?, 'finished', ?)",
            [
                (f"{i:08x}-0000-4000-8000-000000000000", f"run-{i}", f"2026-11-27 00:{i // 60 % 60:02d}:{i % 60:02d}")
                for i in range(n)
            ],
        )


@pytest.mark.parametrize(
    "args", [("history",), ("history", "--json"), ("export", "sessions"), ("export", "history", "--format", "csv")]
)
def test_a_reader_that_stops_early_is_not_an_error(redis_server, db_path: Path, args: tuple[str, ...]) -> None:
    """`desto-archiver history | head`: the command stops writing, exits 0, and says nothing."""
    many_sessions(db_path, 20_000)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO status_history (kind, record_id, event, observed_at, source) "
            "SELECT 'session', session_id, 'first_seen', created_at, 'redis' FROM sessions"
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", "archiver", *args],
        cwd=REPO,
        env=daemon_env(redis_server, db_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # the first line, as `head -1` reads it
    proc.stdout.close()
    errors = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, errors
    assert errors == ""


@pytest.mark.parametrize("json_output", [False, True])
def test_history_lists_a_hundred_thousand_sessions_in_flat_memory(redis_server, db_path: Path, json_output) -> None:
    """A list held whole costs about 1.6 KB per session (160 MB here); streamed, the peak barely moves."""
    args = ("history", "--json") if json_output else ("history",)

    def peak_mb(sessions: int) -> float:
        result, peak = peak_of_command(redis_server, db_path, sessions, *args)
        assert result.returncode == 0 and result.stdout.count("run-") == sessions, result.stderr
        return peak

    few, many = peak_mb(1_000), peak_mb(100_000)
    assert many - few < 8, (few, many)


def test_history_prints_every_session_as_it_reads_them(redis_server, db_path: Path) -> None:
    many_sessions(db_path, 3_000)
    text = cli(redis_server, db_path, "history")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["id", "session_name", "status", "start_time", "end_time", "duration_s", "jobs", "gone"]
    assert len(lines) == 2 + 3_000
    newest_first = [line.split()[1] for line in lines[2:]]
    assert newest_first[:2] == ["run-2999", "run-2998"] and newest_first[-1] == "run-0"
    listed = json.loads(cli(redis_server, db_path, "history", "--json").stdout)
    assert [s["session_name"] for s in listed] == newest_first
    assert cli(redis_server, db_path, "history", "--status", "running").stdout == "(none)\n"
    assert json.loads(cli(redis_server, db_path, "history", "--json", "--status", "running").stdout) == []


# ─── export ──────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("what", ["sessions", "jobs", "favorites", "atjobs", "history", "quarantine"])
def test_export_round_trips_as_csv_and_jsonl(redis_server, redis, db_path: Path, what: str) -> None:
    load(redis, sessions=30, favorites=5, bad=2)
    redis.hset("desto:atjob:9", mapping=atjob_hash("9", arguments='--name "quoted, with comma"\nand a newline'))
    redis.hset("desto:session:comma", mapping=session_hash("comma", session_name='a,b "c"\nd'))
    assert cli(redis_server, db_path, "backfill").returncode == 0
    table = {"atjobs": "at_jobs", "history": "status_history"}.get(what, what)
    stored = [dict(r) for r in query(db_path, f"SELECT * FROM {table} ORDER BY rowid")]

    jsonl = cli(redis_server, db_path, "export", what, "--format", "jsonl")
    assert jsonl.returncode == 0, jsonl.stderr
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(lines) == len(stored) > 0
    key = {"sessions": "session_id", "jobs": "job_id", "favorites": "favorite_id", "atjobs": "at_job_id"}.get(
        what, "id"
    )
    by_key = {r[key]: r for r in stored}
    for item in lines:
        expected = dict(by_key[item[key]])
        if what == "quarantine":
            from archiver.archive.reader import payload_json

            expected.pop("key")
            expected["payload"] = payload_json(expected["payload"])
        assert item == expected  # typed: integers stay integers, NULL is null

    out = db_path.parent / f"{what}.csv"
    # --raw-csv: every cell as the archive holds it (by default, one that starts like a formula gets a ')
    result = cli(redis_server, db_path, "export", what, "--format", "csv", "--raw-csv", "--output", str(out))
    assert result.returncode == 0 and f"{len(stored):,} {what} rows written to {out}" in result.stderr
    with open(out, newline="", encoding="utf-8") as handle:
        read_back = list(csv.DictReader(handle))
    assert len(read_back) == len(stored)
    for item in read_back:
        expected = by_key[int(item[key]) if key == "id" else item[key]]
        for column, value in item.items():
            original = expected.get(column)
            if column == "payload":
                from archiver.archive.reader import payload_json

                assert json.loads(value) == payload_json(original)
            else:
                assert value == ("" if original is None else str(original)), column


def test_export_filters_and_the_spreadsheet_header(redis_server, redis, db_path: Path) -> None:
    load(redis, sessions=9)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    out = db_path.parent / "failed.csv"
    result = cli(
        redis_server,
        db_path,
        "export",
        "sessions",
        "--format",
        "csv",
        "--status",
        "failed",
        "--limit",
        "2",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    raw = out.read_bytes()
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"failed"}
    assert raw.startswith(b"session_id,session_name,tmux_session_name,status,")
    assert raw.count(b"\r\n") == 3  # header and two rows, with the line ending spreadsheets expect


# ─── backup ──────────────────────────────────────────────────────────────────────────────────────


def test_backup_while_a_writer_is_busy_passes_the_integrity_check(redis_server, redis, db_path: Path, tmp_path) -> None:
    load(redis, sessions=500)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    initial_history = count(db_path, "status_history")
    stop = threading.Event()
    writes = [0]

    def busy_writer() -> None:
        conn = sqlite3.connect(db_path, timeout=30)
        while not stop.is_set():
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                for _ in range(200):
                    conn.execute(
                        "INSERT INTO status_history (kind, record_id, event, observed_at, source) "
                        "VALUES ('session', ?, 'status', '2026-11-26T00:00:00Z', 'redis')",
                        (str(uuid.uuid4()),),
                    )
            writes[0] += 1
        conn.close()

    thread = threading.Thread(target=busy_writer)
    thread.start()
    try:
        wait_for(lambda: writes[0] >= 3, what="the writer under way")
        dest = tmp_path / "backups" / "copy.db"
        result = cli(redis_server, db_path, "backup", str(dest), "--json")
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["integrity"] == "ok" and report["bytes"] == dest.stat().st_size
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        assert copy.execute("SELECT count(*) FROM sessions").fetchone()[0] == 500
        history = copy.execute("SELECT count(*) FROM status_history").fetchone()[0]
    finally:
        copy.close()
    assert history > initial_history and (history - initial_history) % 200 == 0  # whole transactions only
    assert not list(dest.parent.glob(".*partial*"))

    again = cli(redis_server, db_path, "backup", str(dest))
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    forced = cli(redis_server, db_path, "backup", str(dest), "--force")
    assert forced.returncode == 0 and "integrity ok" in forced.stdout


def test_backup_to_an_unwritable_place_says_so(redis_server, redis, db_path: Path) -> None:
    assert cli(redis_server, db_path, "backfill").returncode == 0
    result = cli(redis_server, db_path, "backup", "/sys/desto-backup/copy.db")
    assert result.returncode == 1 and "cannot create /sys/desto-backup" in result.stderr
    # a folder that exists but takes no new file (even root's): the destination is named, not the source
    result = cli(redis_server, db_path, "backup", "/proc/desto-copy.db")
    assert result.returncode == 1 and "cannot write /proc/desto-copy.db" in result.stderr, result.stderr
    assert str(db_path) not in result.stderr


# ─── errors every command shares ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "command", [["stats"], ["history"], ["show", "x"], ["export", "sessions"], ["check", "--no-verify"]]
)
def test_a_file_from_a_newer_schema_is_refused(redis_server, redis, db_path: Path, command: list[str]) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    result = cli(redis_server, db_path, *command)
    assert result.returncode == 1
    assert "upgrade desto-archiver" in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["stats"], ["history"], ["export", "jobs"]])
def test_reading_commands_on_a_missing_file_say_what_to_do(redis_server, db_path: Path, command: list[str]) -> None:
    result = cli(redis_server, db_path, *command)
    assert result.returncode == 1
    assert f"no archive at {db_path}" in result.stderr and "backfill" in result.stderr
    assert not db_path.exists()  # reading never creates a file


def test_health_follows_the_daemon(redis_server, redis, db_path: Path) -> None:
    assert cli(redis_server, db_path, "health").returncode == 1
    with daemon_thread(settings_for(redis_server, db_path)):
        wait_for(lambda: cli(redis_server, db_path, "health").returncode == 0, what="healthy")
        assert cli(redis_server, db_path, "health").stdout.startswith("healthy: ok: pid")
    result = cli(redis_server, db_path, "health")
    assert result.returncode == 1 and "stopped" in result.stdout


def test_the_backfill_keeps_a_small_page_cache_unless_set(redis_server, redis, db_path: Path, monkeypatch) -> None:
    load(redis, sessions=5)
    sizes: list[int] = []
    original = Store.open.__func__  # type: ignore[attr-defined]

    def spy(cls, path, busy_timeout=5.0, **options):
        store = original(cls, path, busy_timeout, **options)
        sizes.append(store.conn.execute("PRAGMA cache_size").fetchone()[0])
        return store

    monkeypatch.setattr(Store, "open", classmethod(spy))
    backfill(settings_for(redis_server, db_path))
    backfill(settings_for(redis_server, db_path, sqlite_cache_mb=32))
    assert sizes == [-8 * 1024, -32 * 1024]
