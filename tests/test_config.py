"""Configuration: desto's own variables, REDIS_URL, ARCHIVER_* knobs, flags over environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from archiver.commands.cli import main
from archiver.config import ConfigError, load_settings

pytestmark = pytest.mark.unit

ENV_PREFIXES = ("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)


def test_defaults_match_desto() -> None:
    settings = load_settings()
    assert settings.redis_address() == "redis://localhost:6379/0"
    assert settings.db_path == Path("desto_data/desto.db")
    assert settings.db_number == 0


def test_desto_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("REDIS_DB", "3")
    monkeypatch.setenv("DESTO_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.redis_kwargs() == {"host": "redis", "port": 6380, "db": 3}
    assert settings.db_number == 3
    assert settings.db_path == tmp_path / "desto.db"
    monkeypatch.setenv("SQLITE_DB_PATH", "/srv/archive.db")
    assert load_settings().db_path == Path("/srv/archive.db")


def test_redis_url_overrides_host_port_db_and_secrets_stay_out_of_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "ignored")
    monkeypatch.setenv("REDIS_URL", "rediss://archiver:s3cret@cache.example:6390/5")
    settings = load_settings()
    assert settings.db_number == 5
    assert settings.redis_kwargs()["url"].startswith("rediss://")
    assert "s3cret" not in settings.redis_address()
    assert settings.redis_address() == "rediss://archiver@cache.example:6390/5"


def test_password_and_username_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "hunter2")
    monkeypatch.setenv("REDIS_USERNAME", "archiver")
    settings = load_settings()
    assert settings.redis_kwargs()["password"] == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.redis_address()


def test_unix_socket_url_uses_db_query() -> None:
    settings = load_settings(redis_url="unix:///run/redis.sock?db=2&password=hunter2")
    assert settings.db_number == 2
    assert settings.redis_address() == "unix:///run/redis.sock?db=2"


def test_archiver_knobs_and_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVER_BATCH_SIZE", "50")
    monkeypatch.setenv("ARCHIVER_LOG_FORMAT", "JSON")
    assert load_settings().batch_size == 50
    assert load_settings().log_format == "json"
    assert load_settings(batch_size="7").batch_size == 7


def test_variable_names_are_read_whatever_their_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """As desto's and the archiver's variables were always read: a unit or a compose file that
    writes them in lower case configures the archiver all the same; a flag still wins."""
    monkeypatch.setenv("archiver_batch_size", "50")
    monkeypatch.setenv("Redis_Host", "redis")
    monkeypatch.setenv("redis_db", "2")
    settings = load_settings()
    assert (settings.batch_size, settings.redis_host, settings.redis_db) == (50, "redis", 2)
    assert load_settings(redis_db=4).redis_db == 4
    monkeypatch.setenv("archiver_flush_interval", "")
    with pytest.raises(ConfigError, match="ARCHIVER_FLUSH_INTERVAL: Input should be a valid number"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("REDIS_PORT", "abc", "REDIS_PORT: Input should be a valid integer"),
        ("REDIS_PORT", "70000", "REDIS_PORT: Input should be less than or equal to 65535"),
        ("REDIS_DB", "-1", "REDIS_DB: Input should be greater than or equal to 0"),
        ("ARCHIVER_BATCH_SIZE", "0", "ARCHIVER_BATCH_SIZE"),
        ("ARCHIVER_SQLITE_CACHE_MB", "0", "ARCHIVER_SQLITE_CACHE_MB: Input should be greater than or equal to 1"),
        ("ARCHIVER_FLUSH_INTERVAL", "soon", "ARCHIVER_FLUSH_INTERVAL"),
        ("ARCHIVER_LOG_LEVEL", "loud", "ARCHIVER_LOG_LEVEL"),
        ("REDIS_URL", "http://localhost", "REDIS_URL: Value error, must start with redis://"),
        ("ARCHIVER_UMASK", "0099", "ARCHIVER_UMASK: Value error, must be octal permission bits"),
        ("ARCHIVER_UMASK", "01000", "ARCHIVER_UMASK: Input should be less than or equal to 511"),
    ],
)
def test_bad_values_are_clear_errors(monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert message in str(caught.value)


def test_a_bad_url_never_echoes_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://user:topsecret@host")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "topsecret" not in str(caught.value)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(redis_port="nope")
    assert "--redis-port" in str(caught.value)


def test_cli_exits_2_on_a_bad_value(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REDIS_PORT", "abc")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "REDIS_PORT" in err


def test_cli_exits_2_on_a_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backfill", "--batch-size", "-5"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_umask_is_octal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVER_UMASK", "0007")
    assert load_settings().umask == 0o007
    monkeypatch.setenv("ARCHIVER_UMASK", "027")
    assert load_settings().umask == 0o027
    monkeypatch.delenv("ARCHIVER_UMASK")
    assert load_settings().umask == 0o007, "the owner's and the group's files unless told"
    monkeypatch.setenv("ARCHIVER_UMASK", "")
    assert load_settings().umask == 0o007
