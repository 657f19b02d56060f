"""Secrets: no password in an output or a log line, whichever way it was given (a URL's user part or
query, a flag, a file), and a warning where the process list shows one."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import structlog

from archiver.archive.store import Store
from archiver.commands.cli import main
from archiver.config import ConfigError, load_settings
from archiver.log import configure, get_logger

pytestmark = pytest.mark.unit

ENV_PREFIXES = ("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_")
NOWHERE = "redis://127.0.0.1:1/0"  # a closed port: refused at once


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    db = tmp_path / "desto_data" / "desto.db"
    db.parent.mkdir()
    Store.open(db).close()
    return db


# ─── PostgreSQL's password ───────────────────────────────────────────────────────────────────────


def postgres_commands(archive: Path) -> list[list[str]]:
    """The commands that open the central database given --postgres-url."""
    return [
        ["ship", "--db", str(archive)],
        ["stats", "--db", str(archive)],
        ["check", "--db", str(archive), "--no-daemon", "--no-verify", "--redis-url", NOWHERE],
    ]


def test_a_postgres_password_libpq_cannot_parse_is_a_config_error_that_never_shows_it(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libpq quotes the token it cannot decode, the password included: the URL is refused at start
    with what is wrong in it, by every command that takes it."""
    for url in (
        "postgresql://u:pa%zzss@127.0.0.1:5432/db",  # a % without two hex digits
        "postgresql://u:pa%00ss@127.0.0.1:5432/db",  # a NUL byte, which libpq forbids
        "postgresql://u:pa ss@127.0.0.1:5432/db",  # a space
        "postgresql://u:pa@zzss@127.0.0.1:5432/db",  # libpq's password ends at the first @, urlsplit's at the last
        "postgresql://u:pa/zzss@127.0.0.1:5432/db",  # libpq's host would be u, its database zzss@...
    ):
        for command in postgres_commands(archive):
            code = main([*command, "--postgres-url", url])
            out = capsys.readouterr()
            said = out.out + out.err
            assert "zzss" not in said and "ss@" not in said, (command, url, said)
            assert code == 2, (command, url, said)
            assert "--postgres-url" in out.err and "user name or password" in out.err, out.err
    assert main(["stats", "--db", str(archive), "--postgres-url", "postgresql://u:pa%25zz@127.0.0.1:1/db"]) == 1
    assert "pa%25zz" not in capsys.readouterr().err  # percent-encoded right: accepted, and not shown either


def test_what_libpq_says_about_a_postgres_url_never_holds_its_password(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password in the URL's query (libpq takes ?password= too) reaches libpq as given: whatever
    libpq says about it comes back with the password hidden."""
    pytest.importorskip("psycopg")
    import psycopg

    from archiver.central.postgres import connect

    url = "postgresql://u@127.0.0.1:5432/db?password=pa%zzss"
    with pytest.raises(psycopg.Error) as raised:
        connect(load_settings(postgres_url=url))
    assert "zzss" not in str(raised.value) and "invalid percent-encoded token" in str(raised.value)
    assert raised.value.__context__ is None and raised.value.__cause__ is None  # not in a traceback either
    for command in postgres_commands(archive):
        code = main([*command, "--postgres-url", url])
        out = capsys.readouterr()
        assert code == 1 and "zzss" not in out.out + out.err, out
        assert "invalid percent-encoded token" in out.out + out.err, out


def test_a_logged_traceback_never_shows_local_variables() -> None:
    """An unexpected error is logged with its traceback (``fetcher.crashed``, ``ship.error``): the
    frames' local variables, a URL or the settings among them, stay out of it."""
    for fmt in ("json", "console"):
        stream = io.StringIO()
        configure(fmt, "info", stream=stream)
        try:
            url = "postgresql://u:local-secret@db.example/desto"
            try:
                raise RuntimeError(f"cannot use {len(url)} characters")
            except RuntimeError:
                get_logger("archiver.test").exception("ship.error")
        finally:
            structlog.reset_defaults()
        logged = stream.getvalue()
        assert "ship.error" in logged and "cannot use" in logged, logged
        assert "local-secret" not in logged, logged


# ─── Redis' password ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://SECRET@cache.example:6379/0", "redis://***@cache.example:6379/0"),
        ("redis://cache.example:6379/0?password=SECRET", "redis://cache.example:6379/0"),
        ("redis://cache.example:6379/0?pass%77ord=SECRET&db=0", "redis://cache.example:6379/0?db=0"),
        ("rediss://cache.example:6380/0?ssl_password=SECRET", "rediss://cache.example:6380/0"),
        ("redis://archiver:SEC%52ET@cache.example/2", "redis://archiver@cache.example/2"),
        ("unix://:SECRET@/run/redis/redis.sock?db=1", "unix:///run/redis/redis.sock?db=1"),
    ],
)
def test_a_redis_address_never_shows_what_redis_py_takes_as_a_password(url: str, shown: str) -> None:
    settings = load_settings(redis_url=url)
    assert settings.redis_address() == shown
    assert "SEC" not in repr(settings)


def test_a_redis_url_with_a_lone_user_part_is_not_printed_whole_when_redis_refuses(
    archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backfill", "--db", str(archive), "--redis-url", "redis://SECRET@127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://***@127.0.0.1:1/0" in err and "SECRET" not in err, err


# ─── passwords in the process list, and in files ─────────────────────────────────────────────────


def test_a_password_given_in_a_flag_is_warned_about_once(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Other users read a process' arguments (ps, /proc/PID/cmdline): a password there is said, once,
    with the setting that keeps it out."""
    assert main(["stats", "--db", str(archive), "--redis-url", "redis://:SECRET@127.0.0.1:1/0"]) == 0
    err = capsys.readouterr().err
    assert err.count("password_in_arguments") == 1 and "--redis-url" in err and "REDIS_URL_FILE" in err, err
    assert "SECRET" not in err
    url = "postgresql://archiver:SECRET@127.0.0.1:1/db"
    assert main(["check", "--db", str(archive), "--no-daemon", "--redis-url", NOWHERE, "--postgres-url", url]) == 1
    out = capsys.readouterr()
    assert out.err.count("password_in_arguments") == 1 and "ARCHIVER_POSTGRES_URL_FILE" in out.err, out.err
    assert "SECRET" not in out.out + out.err
    assert main(["stats", "--db", str(archive), "--redis-url", "redis://127.0.0.1:1/0"]) == 0
    assert "password_in_arguments" not in capsys.readouterr().err


def test_secrets_are_read_from_the_files_their_file_settings_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REDIS_URL_FILE, REDIS_PASSWORD_FILE and ARCHIVER_POSTGRES_URL_FILE: a container's secrets, a
    systemd credential; the file's trailing newline is not part of the secret."""
    files = {
        "REDIS_URL_FILE": "redis://archiver:from-file@cache.example:6379/3\n",
        "REDIS_PASSWORD_FILE": "hunter2\n",
        "ARCHIVER_POSTGRES_URL_FILE": "postgresql://gpu1:pg-secret@db.example/desto\r\n",
    }
    for name, text in files.items():
        path = tmp_path / name.lower()
        path.write_text(text)
        monkeypatch.setenv(name, str(path))
    settings = load_settings()
    assert settings.redis_url == "redis://archiver:from-file@cache.example:6379/3" and settings.db_number == 3
    assert settings.redis_password is not None and settings.redis_password.get_secret_value() == "hunter2"
    assert settings.postgres_url is not None
    assert settings.postgres_url.get_secret_value() == "postgresql://gpu1:pg-secret@db.example/desto"
    assert settings.redis_address() == "redis://archiver@cache.example:6379/3"
    # a flag still wins over the environment
    assert load_settings(redis_url="redis://other:6379/0").redis_address() == "redis://other:6379/0"

    (tmp_path / "redis_url_file").write_text("http://not-redis\n")
    with pytest.raises(ConfigError, match=r"REDIS_URL_FILE: .*must start with redis://") as bad:
        load_settings()
    assert "not-redis" not in str(bad.value)
    monkeypatch.setenv("REDIS_URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"REDIS_URL_FILE: cannot read .*missing: No such file"):
        load_settings()
    monkeypatch.delenv("REDIS_URL_FILE")
    monkeypatch.setenv("REDIS_PASSWORD", "also-set")
    with pytest.raises(ConfigError, match="REDIS_PASSWORD and REDIS_PASSWORD_FILE are both set") as both:
        load_settings()
    assert "also-set" not in str(both.value) and "hunter2" not in str(both.value)
    (tmp_path / "empty").write_text("\n")
    monkeypatch.delenv("REDIS_PASSWORD")
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"REDIS_PASSWORD_FILE: .*empty"):
        load_settings()
