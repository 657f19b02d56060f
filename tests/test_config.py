"""Configuration: desto's own variables, REDIS_URL, ARCHIVER_* knobs, flags over environment."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from archiver.commands.cli import main
from archiver.config import ENV_NAMES, ConfigError, InvalidSettings, SecretStr, Settings, load_settings

pytestmark = pytest.mark.unit

ENV_PREFIXES = ("REDIS_", "ARCHIVER_", "SQLITE_", "DESTO_")
REPO = Path(__file__).resolve().parent.parent


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
    assert message in _error_for(monkeypatch, env, value)


def _error_for(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> str:
    """What load_settings says of ``value`` in the variable ``env``."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


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


def test_no_pydantic_in_the_daemon_s_process() -> None:
    """The settings are read and checked by the archiver's own class: pydantic, which took about
    9 MB of an idle daemon's memory for this one model, is never imported by the commands or the
    daemon."""
    probe = (
        "import sys, archiver.commands.cli, archiver.daemon.pipeline; "
        "print(sorted(m for m in sys.modules if m.startswith('pydantic')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("yes", True), ("On", True), ("t", True), ("Y", True), ("1", True),
     ("false", False), ("NO", False), ("off", False), ("F", False), ("n", False), ("0", False)],
)  # fmt: skip
def test_booleans_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("ARCHIVER_ALLOW_ROOT", value)
    assert load_settings().allow_root is expected
    assert load_settings(allow_root=value).allow_root is expected


@pytest.mark.parametrize("value", ["", " true", "2", "enabled"])
def test_a_word_that_is_not_a_boolean_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ARCHIVER_CONFIGURE_NOTIFICATIONS", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid configuration:\n  ARCHIVER_CONFIGURE_NOTIFICATIONS: "
        f"Input should be a valid boolean, unable to interpret input (got {value!r})"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7), (" 7 ", 7), ("+7", 7), ("0007", 7), ("5.0", 5), ("5.00", 5), ("1_000", 1000), (5.0, 5), (True, 1)],
)
def test_integers_as_pydantic_read_them(value: object, expected: int) -> None:
    settings = load_settings(batch_size=value)
    assert settings.batch_size == expected and type(settings.batch_size) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e3", "Input should be a valid integer, unable to parse string as an integer"),
        ("5.5", "Input should be a valid integer, unable to parse string as an integer"),
        ("0x10", "Input should be a valid integer, unable to parse string as an integer"),
        ("", "Input should be a valid integer, unable to parse string as an integer"),
        (5.5, "Input should be a valid integer, got a number with a fractional part"),
        (float("inf"), "Input should be a finite number"),
        (Path("7"), "Input should be a valid integer"),
        ("100001", "Input should be less than or equal to 100000"),
        ("-1", "Input should be greater than or equal to 1"),
    ],
)
def test_integers_refused_with_pydantic_s_words(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(batch_size=value)
    assert str(caught.value) == f"invalid configuration:\n  --batch-size: {message} (got {value!r})"


def test_floats_from_integers_strings_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults are checked too: an integer default of a float setting is a float, as a log line
    shows it (``"next_in_s": 300.0``)."""
    settings = load_settings()
    assert settings.reconcile_interval == 300.0 and type(settings.reconcile_interval) is float
    assert type(settings.heartbeat_interval) is float and type(settings.ship_interval) is float
    assert Settings.FIELDS["reconcile_interval"].default == 300, "the declared default, as the reference shows it"
    assert type(load_settings(flush_interval=1).flush_interval) is float
    for text, expected in (("1e3", 1000.0), (".5", 0.5), (" 2.5 ", 2.5), ("1_000.5", 1000.5), ("inf", math.inf)):
        monkeypatch.setenv("ARCHIVER_RECONCILE_INTERVAL", text)
        assert load_settings().reconcile_interval == expected


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("ARCHIVER_SHIP_INTERVAL", "soon", "Input should be a valid number, unable to parse string as a number"),
        ("ARCHIVER_SHIP_INTERVAL", "1_000_", "Input should be a valid number, unable to parse string as a number"),
        ("ARCHIVER_SHIP_INTERVAL", "inf", "Input should be less than or equal to 3600"),
        ("ARCHIVER_SHIP_INTERVAL", "nan", "Input should be less than or equal to 3600"),
        ("ARCHIVER_SHIP_INTERVAL", "0", "Input should be greater than 0"),
        ("ARCHIVER_FLUSH_INTERVAL", "-0.5", "Input should be greater than or equal to 0"),
        ("ARCHIVER_RETENTION_DAYS", "nan", "Input should be greater than 0"),
        ("ARCHIVER_LOG_FORMAT", "plain", "Input should be 'auto', 'json' or 'console'"),
        ("ARCHIVER_LOG_LEVEL", "LOUD", "Input should be 'debug', 'info', 'warning' or 'error'"),
        ("REDIS_HOST", "", "String should have at least 1 character"),
        ("ARCHIVER_SOURCE_NAME", "x" * 201, "String should have at most 200 characters"),
        ("ARCHIVER_POSTGRES_SCHEMA", "Bad-Schema", "String should match pattern '^[a-z_][a-z0-9_]{0,62}$'"),
        ("ARCHIVER_POSTGRES_SCHEMA", "ok\n", "String should match pattern '^[a-z_][a-z0-9_]{0,62}$'"),
        ("REDIS_PORT", "7\udcff", "Input should be a valid string, unable to parse raw data as a unicode string"),
    ],
)
def test_each_check_s_message(monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str) -> None:
    shown = value.lower() if env == "ARCHIVER_LOG_LEVEL" else value  # what the check saw
    assert _error_for(monkeypatch, env, value) == f"invalid configuration:\n  {env}: {message} (got {shown!r})"


def test_every_problem_is_told_in_the_settings_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHIVER_LOG_LEVEL", "loud")
    monkeypatch.setenv("REDIS_PORT", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings(batch_size="many")
    assert str(caught.value).splitlines()[1:] == [
        "  REDIS_PORT: Input should be greater than or equal to 1 (got '0')",
        "  --batch-size: Input should be a valid integer, unable to parse string as an integer (got 'many')",
        "  ARCHIVER_LOG_LEVEL: Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')",
    ]
    with pytest.raises(InvalidSettings) as direct:
        Settings(redis_port=0, batch_size="many")
    assert [(name, value) for name, _, value in direct.value.errors] == [("redis_port", 0), ("batch_size", "many")]


def test_secrets_are_masked_and_compared_by_value() -> None:
    assert str(SecretStr("hunter2")) == "**********" and repr(SecretStr("hunter2")) == "SecretStr('**********')"
    assert str(SecretStr("")) == "" and repr(SecretStr("")) == "SecretStr('')"
    assert SecretStr("hunter2") == SecretStr("hunter2") != SecretStr("other")
    assert SecretStr("hunter2") != "hunter2"
    settings = load_settings(
        redis_url="redis://archiver:s3cret@cache.example/1",
        redis_password="hunter2",
        postgres_url="postgresql://gpu1:pg-secret@db.example/desto",
    )
    assert settings.redis_password == SecretStr("hunter2")
    assert settings.postgres_url is not None
    assert settings.postgres_url.get_secret_value() == "postgresql://gpu1:pg-secret@db.example/desto"
    for shown in (repr(settings), str(settings)):
        assert "redis_password=SecretStr('**********')" in shown
        assert not [secret for secret in ("s3cret", "hunter2", "pg-secret") if secret in shown]
        assert "redis_url=" not in shown


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(AttributeError, match="frozen"):
        settings.batch_size = 3  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del settings.redis_host
    assert settings.batch_size == 500
    assert settings == load_settings() and hash(settings) == hash(load_settings())


def test_every_setting_declares_its_variable_default_and_meaning() -> None:
    assert list(Settings.FIELDS) == list(ENV_NAMES)
    for name, field in Settings.FIELDS.items():
        assert field.name == name and field.env == ENV_NAMES[name] and field.description
    assert Settings.FIELDS["redis_port"].default == 6379 and ENV_NAMES["redis_port"] == "REDIS_PORT"
    assert not hasattr(Settings, "redis_port"), "an instance holds the values, never the class"
