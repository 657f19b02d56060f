"""Configuration: the only place that reads the environment.

desto's own variables (REDIS_HOST, REDIS_PORT, REDIS_DB, SQLITE_DB_PATH, DESTO_DATA_DIR) are read
as desto reads them, so one environment block serves both; the archiver's own knobs are
ARCHIVER_*. Names are matched whatever their case. Command-line flags override both.

The settings are a pydantic model; the environment is read here, not by a settings library
(pydantic-settings took 6 MB of the idle daemon's memory, for reading some forty variables).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# The archive holds command lines: its files are the owner's and its group's (0660), whichever way
# the archiver runs (the image and the systemd unit say the same).
DEFAULT_UMASK = 0o007

# The quarantine's bounds: a value above the first is kept as its digest, length and first bytes;
# past the second, rejected keys not in the quarantine yet are counted, not stored.
DEFAULT_QUARANTINE_RECORD_BYTES = 64 * 1024
DEFAULT_QUARANTINE_BYTES = 64 * 1024 * 1024


class ConfigError(Exception):
    """A configuration value is unusable; the message says which and why."""


# What stands for a password wherever one would be shown.
HIDDEN = "***"

# What a URL's user name and password may hold as they are (RFC 3986's unreserved characters and
# sub-delimiters); anything else is percent-encoded. Where libpq and Python's urlsplit would read
# another user part (an @ or a / in a password), or libpq would refuse it and quote it whole in
# its error (a % without two hex digits), the URL is refused at start, without showing it.
_USER_PART = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:")
_HEX = frozenset("0123456789abcdefABCDEF")


def _postgres_user_part_problem(url: str) -> str | None:
    """What is wrong with the user name and password of a postgresql:// URL, as libpq reads them
    (the text before the first @, when an @ comes before any /), in words that never quote them."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    authority, _, after = rest.partition("/")
    if "@" not in authority:
        if "@" in after.split("?", 1)[0]:
            return (
                "an @ after its host: a / in its user name or password must be percent-encoded (%2F), "
                "and an @ in its database name (%40)"
            )
        return None
    user_part, _, host = authority.partition("@")
    if "@" in host:
        return "more than one @ before its host: an @ in its user name or password must be percent-encoded (%40)"
    i = 0
    while i < len(user_part):
        c = user_part[i]
        if c == "%":
            code = user_part[i + 1 : i + 3]
            if len(code) < 2 or not set(code) <= _HEX:
                return "a % not followed by two hex digits in its user name or password: percent-encode a % as %25"
            if code == "00":
                return "%00 in its user name or password: libpq refuses a NUL byte"
            i += 3
            continue
        if c not in _USER_PART and (c.isascii() or not c.isprintable()):
            return (
                "a character its user name or password must percent-encode (a space, a control character, or "
                "one of / ? # [ ] @): write it as %XX, e.g. a space as %20, ? as %3F, # as %23"
            )
        i += 1
    return None


def _query_secrets(query: str) -> set[str]:
    """The values of a URL's query parameters whose name (percent-decoded) says password."""
    found: set[str] = set()
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        if value and "password" in unquote_plus(name).lower():
            found |= {value, unquote_plus(value), unquote(value)}
    return found


def _without_secret_parameters(query: str) -> str:
    return "&".join(p for p in query.split("&") if p and "password" not in unquote_plus(p.partition("=")[0]).lower())


def postgres_url_secrets(url: str) -> set[str]:
    """Every password a postgresql:// URL holds, as written and percent-decoded: its user part's
    (as libpq and as urlsplit read it) and its query's (libpq's ?password=, ?sslpassword=)."""
    found: set[str] = set()
    rest = url.split("://", 1)[1] if "://" in url else ""
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        user_part = authority.split("@", 1)[0]  # libpq's: up to the first @
        if ":" in user_part:
            found.add(user_part.split(":", 1)[1])
    parts = urlsplit(url)
    if parts.password:
        found.add(parts.password)
    found |= _query_secrets(parts.query)
    return {form for secret in found for form in (secret, unquote(secret)) if form}


def redis_url_secrets(url: str, password_elsewhere: bool = False) -> set[str]:
    """Every password a Redis URL holds, as redis-py's own parse of it finds them (its query's
    ``password=`` however encoded, ``ssl_password=``), and as written. A lone user part
    (``redis://SECRET@host``) is taken for one too, unless a password is given elsewhere
    (REDIS_PASSWORD), which makes it an ACL user's name."""
    from redis.connection import parse_url

    parts = urlsplit(url)
    found = _query_secrets(parts.query)
    try:
        parsed: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:  # a value redis-py cannot convert: the raw forms are still found
        parsed = {}
    found |= {str(v) for k, v in parsed.items() if "password" in k.lower() and v}
    if parts.password:
        found.add(parts.password)
    has_password = bool(parts.password) or any("password" in k.lower() and v for k, v in parsed.items())
    if parts.username and not has_password and not password_elsewhere:
        found.add(parts.username)
    return {form for secret in found for form in (secret, unquote(secret)) if form}


def _env(name: str, env: str) -> Any:
    return AliasChoices(name, env)


class Settings(BaseModel):
    """Every setting, by its name; built by :func:`load_settings` from the environment and the flags."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, validate_default=True)

    redis_url: str | None = Field(
        None,
        repr=False,  # it may hold a password
        validation_alias=_env("redis_url", "REDIS_URL"),
        description=(
            "`redis://`, `rediss://` (TLS; e.g. `rediss://host:6380/0?ssl_ca_certs=/etc/redis/ca.pem`) or `unix://` "
            "(e.g. `unix:///run/redis/redis.sock?db=0`) URL of desto's Redis; overrides the host, port and database"
        ),
    )
    redis_host: str = Field(
        "localhost", min_length=1, validation_alias=_env("redis_host", "REDIS_HOST"), description="desto's Redis host"
    )
    redis_port: int = Field(
        6379, ge=1, le=65535, validation_alias=_env("redis_port", "REDIS_PORT"), description="its port"
    )
    redis_db: int = Field(0, ge=0, validation_alias=_env("redis_db", "REDIS_DB"), description="its database")
    redis_username: str | None = Field(
        None, validation_alias=_env("redis_username", "REDIS_USERNAME"), description="ACL user name"
    )
    redis_password: SecretStr | None = Field(
        None, validation_alias=_env("redis_password", "REDIS_PASSWORD"), description="its password (never logged)"
    )
    redis_url_file: Path | None = Field(
        None,
        validation_alias=_env("redis_url_file", "REDIS_URL_FILE"),
        description=(
            "a file holding `REDIS_URL` (a container's secret, a systemd credential), read at start without its "
            "trailing newline: the password stays out of the environment and the process list"
        ),
    )
    redis_password_file: Path | None = Field(
        None,
        validation_alias=_env("redis_password_file", "REDIS_PASSWORD_FILE"),
        description="a file holding `REDIS_PASSWORD`, read the same way",
    )

    desto_data_dir: Path | None = Field(
        None,
        validation_alias=_env("desto_data_dir", "DESTO_DATA_DIR"),
        description=(
            "desto's data folder, used when `SQLITE_DB_PATH` is unset: the archive is then `$DESTO_DATA_DIR/desto.db` "
            "(`desto_data/desto.db` when both are unset)"
        ),
    )
    sqlite_db_path: Path | None = Field(
        None,
        validation_alias=_env("sqlite_db_path", "SQLITE_DB_PATH"),
        description="the archive, the SQLite file desto's History tab reads",
    )

    batch_size: int = Field(
        500,
        ge=1,
        le=100_000,
        validation_alias=_env("batch_size", "ARCHIVER_BATCH_SIZE"),
        description="keys per read and per transaction",
    )
    flush_interval: float = Field(
        0.005,
        ge=0,
        le=3600,
        validation_alias=_env("flush_interval", "ARCHIVER_FLUSH_INTERVAL"),
        description=(
            "how long a change waits to be batched with others (s); up to 10 times that under a stream of changes"
        ),
    )
    reconcile_interval: float = Field(
        300,
        gt=0,
        validation_alias=_env("reconcile_interval", "ARCHIVER_RECONCILE_INTERVAL"),
        description="seconds between full reconciles, the safety net",
    )
    fallback_reconcile_interval: float = Field(
        10,
        gt=0,
        validation_alias=_env("fallback_reconcile_interval", "ARCHIVER_FALLBACK_RECONCILE_INTERVAL"),
        description="seconds between full reconciles when keyspace notifications cannot be turned on",
    )
    configure_notifications: bool = Field(
        True,
        validation_alias=_env("configure_notifications", "ARCHIVER_CONFIGURE_NOTIFICATIONS"),
        description="allow `CONFIG SET notify-keyspace-events` (the flags are only ever added to)",
    )
    max_dirty: int = Field(
        100_000,
        ge=1,
        validation_alias=_env("max_dirty", "ARCHIVER_MAX_DIRTY"),
        description="most keys waiting to be read; beyond, they are dropped and a full reconcile runs",
    )
    health_check_interval: float = Field(
        10,
        gt=0,
        validation_alias=_env("health_check_interval", "ARCHIVER_HEALTH_CHECK_INTERVAL"),
        description="pub/sub silence (s) before a PING; no answer within as long again means a reconnect",
    )
    socket_timeout: float = Field(
        10,
        gt=0,
        validation_alias=_env("socket_timeout", "ARCHIVER_SOCKET_TIMEOUT"),
        description="Redis connect and read timeout (s)",
    )
    reconnect_max_backoff: float = Field(
        30,
        gt=0,
        validation_alias=_env("reconnect_max_backoff", "ARCHIVER_RECONNECT_MAX_BACKOFF"),
        description="cap of the reconnect backoff (s)",
    )
    heartbeat_interval: float = Field(
        5,
        gt=0,
        validation_alias=_env("heartbeat_interval", "ARCHIVER_HEARTBEAT_INTERVAL"),
        description="how often the daemon records its heartbeat in the file (s)",
    )
    shutdown_timeout: float = Field(
        10,
        gt=0,
        validation_alias=_env("shutdown_timeout", "ARCHIVER_SHUTDOWN_TIMEOUT"),
        description="longest the final flush may take on SIGTERM (s)",
    )
    sqlite_busy_timeout: float = Field(
        5,
        ge=0,
        validation_alias=_env("sqlite_busy_timeout", "ARCHIVER_SQLITE_BUSY_TIMEOUT"),
        description=(
            "wait for another writer's lock before retrying later (s); meanwhile a write tries for the lock every "
            "millisecond, so it gets in between another writer's short transactions"
        ),
    )
    # SQLite's page cache; None: each command's own default (DAEMON_CACHE_MB, BACKFILL_CACHE_MB).
    sqlite_cache_mb: int | None = Field(
        None,
        ge=1,
        le=65_536,
        validation_alias=_env("sqlite_cache_mb", "ARCHIVER_SQLITE_CACHE_MB"),
        description=(
            "SQLite's page cache (MB); unset: 64 for `run`, 8 for `backfill`. The daemon's holds the indexes of a few "
            "hundred thousand records (desto's random ids spread every insert over them); it fills only as the "
            "archive grows, and a lower value suits a small machine"
        ),
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        validation_alias=_env("retention_days", "ARCHIVER_RETENTION_DAYS"),
        description=(
            "erase records that left Redis more than this many days ago (their rows, history and quarantine "
            "entries), hourly and in small steps; never a record Redis still holds. Unset: keep everything"
        ),
    )
    quarantine_max_record_bytes: int = Field(
        DEFAULT_QUARANTINE_RECORD_BYTES,
        ge=1024,
        le=2**30,
        validation_alias=_env("quarantine_max_record_bytes", "ARCHIVER_QUARANTINE_MAX_RECORD_BYTES"),
        description=(
            "a quarantined value (as Redis returned it, RESP-encoded) longer than this many bytes is kept as its "
            "SHA-256, its length and its first 4 KiB (or this many bytes, if fewer), and marked `truncated`"
        ),
    )
    quarantine_max_bytes: int = Field(
        DEFAULT_QUARANTINE_BYTES,
        ge=0,
        validation_alias=_env("quarantine_max_bytes", "ARCHIVER_QUARANTINE_MAX_BYTES"),
        description=(
            "the quarantine's total size (its keys and kept values, bytes): once reached, a rejected key not in the "
            "quarantine yet is counted (`stats`, `check`, a metric), not stored; the keys already there are still "
            "updated"
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        validation_alias=_env("metrics_port", "ARCHIVER_METRICS_PORT"),
        description="serve Prometheus metrics on this port (off when unset)",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        validation_alias=_env("metrics_host", "ARCHIVER_METRICS_HOST"),
        description="the address the metrics listen on",
    )
    # The archive holds command lines: the permission bits its files are created without.
    umask: int = Field(
        DEFAULT_UMASK,
        ge=0,
        le=0o777,
        validation_alias=_env("umask", "ARCHIVER_UMASK"),
        description=(
            "permission bits the files the archiver creates (the archive, its WAL, backups, exports) are created "
            "without, in octal like umask(1); it replaces the process' own umask. The default `0007` gives 0660 "
            "files: the owner and its group (desto's user shares them through it), never the world; `0077` keeps "
            "them the owner's alone"
        ),
    )
    # PostgreSQL: every record written to the file is also shipped there (archiver/central/ship.py)
    postgres_url: SecretStr | None = Field(
        None,
        validation_alias=_env("postgres_url", "ARCHIVER_POSTGRES_URL"),
        description=(
            "a PostgreSQL database (postgresql://user:password@host/db) that every record of the file is also "
            "shipped to, from a change log in the file; unset: no shipping. Needs the `postgres` extra"
        ),
    )
    postgres_url_file: Path | None = Field(
        None,
        validation_alias=_env("postgres_url_file", "ARCHIVER_POSTGRES_URL_FILE"),
        description="a file holding `ARCHIVER_POSTGRES_URL`, read the same way",
    )
    postgres_schema: str = Field(
        "desto_archiver",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        validation_alias=_env("postgres_schema", "ARCHIVER_POSTGRES_SCHEMA"),
        description="the PostgreSQL schema the central tables live in",
    )
    source_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=200,
        validation_alias=_env("source_name", "ARCHIVER_SOURCE_NAME"),
        description="this archive's name in the central database, part of every key there (default: the host name)",
    )
    ship_batch_size: int = Field(
        2000,
        ge=1,
        le=100_000,
        validation_alias=_env("ship_batch_size", "ARCHIVER_SHIP_BATCH_SIZE"),
        description="changes shipped to PostgreSQL per transaction",
    )
    ship_interval: float = Field(
        10.0,
        gt=0,
        le=3600,
        validation_alias=_env("ship_interval", "ARCHIVER_SHIP_INTERVAL"),
        description=(
            "longest wait in seconds between looks at the change log; the daemon's commits, and other programs' "
            "it notices within a second, start shipping at once"
        ),
    )
    allow_root: bool = Field(
        False,
        validation_alias=_env("allow_root", "ARCHIVER_ALLOW_ROOT"),
        description=(
            "let `run` run as root (`--allow-root`); refused otherwise: root's daemon would create and write files "
            "in the archive's folder, which desto's group may write too. The image and the unit run as `desto`"
        ),
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        validation_alias=_env("log_format", "ARCHIVER_LOG_FORMAT"),
        description="`json`, `console`, or `auto` (JSON unless stderr is a terminal)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info",
        validation_alias=_env("log_level", "ARCHIVER_LOG_LEVEL"),
        description="`debug`, `info`, `warning` or `error`",
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("umask", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("0o")
            if not text:
                return DEFAULT_UMASK
            if not all(c in "01234567" for c in text):
                raise ValueError("must be octal permission bits, like 0027 or 0007")
            return int(text, 8)
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("postgres_url", mode="before")
    @classmethod
    def _check_postgres_url(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text in (None, ""):
            return None
        if not isinstance(text, str):
            return value
        parts = urlsplit(text)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("must start with postgresql:// (or postgres://)")
        problem = _postgres_user_part_problem(text)
        if problem is not None:
            raise ValueError(problem)
        return text

    @model_validator(mode="after")
    def _resolve_db_path(self) -> Settings:
        if self.sqlite_db_path is None:
            data_dir = self.desto_data_dir or Path("desto_data")
            object.__setattr__(self, "sqlite_db_path", data_dir / "desto.db")
        return self

    # ─── derived ─────────────────────────────────────────────────────────────────────────────

    @property
    def db_path(self) -> Path:
        assert self.sqlite_db_path is not None
        return self.sqlite_db_path

    @property
    def db_number(self) -> int:
        """The Redis database desto's keys live in (REDIS_URL's, when given)."""
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            query_db = parse_qs(parts.query).get("db")
            if query_db:
                return int(query_db[0])
            path = parts.path.strip("/")
            if parts.scheme != "unix" and path.isdigit():
                return int(path)
            return 0
        return self.redis_db

    def redis_address(self) -> str:
        """Where Redis is, for people and logs: never includes a password, nor what redis-py would
        take for one (a lone user part shows as ***)."""
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            if _port(parts):
                netloc += f":{_port(parts)}"
            if parts.username:
                lone = not redis_url_secrets(self.redis_url, self.redis_password is not None).isdisjoint(
                    {parts.username, unquote(parts.username)}
                )
                netloc = f"{HIDDEN if lone else parts.username}@{netloc}"
            query = _without_secret_parameters(parts.query)
            if parts.scheme == "unix":  # urlunsplit would drop the empty authority: unix:/path
                return f"unix://{netloc}{parts.path}" + (f"?{query}" if query else "")
            return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def postgres_address(self) -> str | None:
        """Where PostgreSQL is, for people and logs: never includes a password."""
        if self.postgres_url is None:
            return None
        parts = urlsplit(self.postgres_url.get_secret_value())
        netloc = parts.hostname or ""
        if _port(parts):
            netloc += f":{_port(parts)}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, _without_secret_parameters(parts.query), ""))

    def secrets(self) -> set[str]:
        """Every password the settings hold, in each form it may be quoted in."""
        found: set[str] = set()
        if self.redis_password is not None and self.redis_password.get_secret_value():
            found.add(self.redis_password.get_secret_value())
        if self.redis_url:
            found |= redis_url_secrets(self.redis_url, self.redis_password is not None)
        if self.postgres_url is not None:
            found |= postgres_url_secrets(self.postgres_url.get_secret_value())
        return found

    def redact(self, text: str) -> str:
        """``text`` with every password of the settings replaced by ***: for what a library says
        about a connection it was given (libpq quotes what it cannot parse)."""
        for secret in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(secret, HIDDEN)
        return text

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` (or ``from_url`` with ``url``)."""
        kwargs: dict[str, Any] = {}
        if self.redis_url:
            kwargs["url"] = self.redis_url
        else:
            kwargs.update(host=self.redis_host, port=self.redis_port, db=self.redis_db)
        if self.redis_username:
            kwargs["username"] = self.redis_username
        if self.redis_password is not None:
            kwargs["password"] = self.redis_password.get_secret_value()
        return kwargs


def _port(parts: Any) -> int | None:
    try:
        return int(parts.port) if parts.port else None
    except ValueError:  # libpq's host lists (host1:5432,host2:5433): libpq says what is wrong
        return None


ENV_NAMES: dict[str, str] = {
    name: next(a for a in field.validation_alias.choices if isinstance(a, str) and a.isupper())  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


# The secrets that may be given in a file instead (a container's secrets, systemd's credentials),
# so they are in neither the environment nor the process list: the setting, and its file's.
SECRET_FILES = {
    "redis_url": "redis_url_file",
    "redis_password": "redis_password_file",
    "postgres_url": "postgres_url_file",
}
_SECRET_SETTINGS = ("redis_password", "redis_url", "postgres_url")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment, the files its ``*_FILE`` variables name and
    ``overrides`` (the flags, which win over both); raise ConfigError with a clear text."""
    given = {k: v for k, v in overrides.items() if v is not None}
    settings = _validated(given, given, {})
    from_files = _read_secret_files(settings, given)
    return _validated({**given, **from_files}, given, from_files) if from_files else settings


def environment() -> dict[str, str]:
    """The settings' variables set in the environment, by setting name (an empty value is a value:
    the setting's check says whether it may be empty). A name is matched whatever its case; set
    twice in two cases, the later in the environment wins."""
    found = {name.lower(): value for name, value in os.environ.items()}
    return {field: found[env.lower()] for field, env in ENV_NAMES.items() if env.lower() in found}


def _validated(values: dict[str, Any], flags: dict[str, Any], from_files: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate({**environment(), **values})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            if field in from_files:
                where = ENV_NAMES[SECRET_FILES[field]]
            elif field in flags:
                where = f"--{field.replace('_', '-')}"
            else:
                where = ENV_NAMES.get(field, field)
            shown = "" if field in _SECRET_SETTINGS else f" (got {err.get('input')!r})"
            lines.append(f"{where}: {err['msg']}{shown}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _read_secret_files(settings: Settings, flags: dict[str, Any]) -> dict[str, str]:
    """The secrets the ``*_FILE`` settings name, read (a flag given for one wins over its file)."""
    found: dict[str, str] = {}
    for field, file_field in SECRET_FILES.items():
        path: Path | None = getattr(settings, file_field)
        if path is None or field in flags:
            continue
        name, file_name = ENV_NAMES[field], ENV_NAMES[file_field]
        if getattr(settings, field) is not None:
            raise ConfigError(f"invalid configuration:\n  {name} and {file_name} are both set: keep one")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"invalid configuration:\n  {file_name}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"invalid configuration:\n  {file_name}: {path} is not UTF-8 text") from None
        value = text.rstrip("\r\n")
        if not value:
            raise ConfigError(f"invalid configuration:\n  {file_name}: {path} is empty")
        found[field] = value
    return found
