"""Configuration: the only place that reads the environment.

desto's own variables (REDIS_HOST, REDIS_PORT, REDIS_DB, SQLITE_DB_PATH, DESTO_DATA_DIR) are read
as desto reads them, so one environment block serves both; the archiver's own knobs are
ARCHIVER_*. Command-line flags override both (they are passed as init arguments).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The archive holds command lines: its files are the owner's and its group's (0660), whichever way
# the archiver runs (the image and the systemd unit say the same).
DEFAULT_UMASK = 0o007

# The quarantine's bounds: a value above the first is kept as its digest, length and first bytes;
# past the second, rejected keys not in the quarantine yet are counted, not stored.
DEFAULT_QUARANTINE_RECORD_BYTES = 64 * 1024
DEFAULT_QUARANTINE_BYTES = 64 * 1024 * 1024


class ConfigError(Exception):
    """A configuration value is unusable; the message says which and why."""


def _env(name: str, env: str) -> Any:
    return AliasChoices(name, env)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True, frozen=True
    )

    redis_url: str | None = Field(
        None,
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
    # PostgreSQL: every record written to the file is also shipped there (archiver/ship.py)
    postgres_url: SecretStr | None = Field(
        None,
        validation_alias=_env("postgres_url", "ARCHIVER_POSTGRES_URL"),
        description=(
            "a PostgreSQL database (postgresql://user:password@host/db) that every record of the file is also "
            "shipped to, from a change log in the file; unset: no shipping. Needs the `postgres` extra"
        ),
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
        1.0,
        gt=0,
        le=3600,
        validation_alias=_env("ship_interval", "ARCHIVER_SHIP_INTERVAL"),
        description="seconds between looks at the change log when nothing is waiting to be shipped",
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
        """Where Redis is, for people and logs: never includes a password."""
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            netloc = parts.hostname or ""
            if parts.port:
                netloc += f":{parts.port}"
            if parts.username:
                netloc = f"{parts.username}@{netloc}"
            query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
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
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

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


ENV_NAMES: dict[str, str] = {
    name: next(a for a in field.validation_alias.choices if isinstance(a, str) and a.isupper())  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment and ``overrides``; raise ConfigError with a clear text."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = ENV_NAMES.get(field, field) if field not in given else f"--{field.replace('_', '-')}"
            shown = "" if field in ("redis_password", "redis_url", "postgres_url") else f" (got {err.get('input')!r})"
            lines.append(f"{where}: {err['msg']}{shown}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
