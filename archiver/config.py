"""Configuration: the only place that reads the environment.

desto's own variables (REDIS_HOST, REDIS_PORT, REDIS_DB, SQLITE_DB_PATH, DESTO_DATA_DIR) are read
as desto reads them, so one environment block serves both; the archiver's own knobs are
ARCHIVER_*. Names are matched whatever their case. Command-line flags override both.

The settings are read and checked by the archiver itself: :class:`Settings` declares each one
(its type, default, variable, bounds and meaning) with :func:`setting`, and a value is converted
and checked as pydantic's lax mode did, with its messages. pydantic took about 9 MB of an idle
daemon's 48 MB (its import, and the schema it builds for a model), for this one model of scalar
fields; pydantic-settings another 6 MB, for reading some forty variables.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit, urlunsplit

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


# ─── the settings' declarations, conversions and checks ──────────────────────────────────────────


class SecretStr:
    """A password or a URL holding one: shown as ********** (empty, as nothing), read with
    :meth:`get_secret_value`; equal to another holding the same text."""

    __slots__ = ("_secret_value",)

    def __init__(self, secret_value: str) -> None:
        self._secret_value = secret_value

    def get_secret_value(self) -> str:
        return self._secret_value

    def __str__(self) -> str:
        return "**********" if self._secret_value else ""

    def __repr__(self) -> str:
        return f"SecretStr('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretStr) and self._secret_value == other._secret_value

    def __hash__(self) -> int:
        return hash(self._secret_value)

    def __len__(self) -> int:
        return len(self._secret_value)


class InvalidSettings(ValueError):
    """Values the settings cannot take: ``errors`` holds, for each, the setting's name, what is
    wrong (pydantic's words) and the value given."""

    def __init__(self, errors: list[tuple[str, str, Any]]) -> None:
        super().__init__("\n".join(f"{name}: {message}" for name, message, _ in errors))
        self.errors = errors


class _Invalid(Exception):
    def __init__(self, message: str, value: Any) -> None:
        super().__init__(message)
        self.message, self.value = message, value


# What Rust's str::trim strips (Unicode's White_Space), as pydantic does around a number.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_INT_TEXT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*")
_ZERO_FRACTION = re.compile(r"(.*)\.0+", re.DOTALL)
_FLOAT_TEXT = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE | re.ASCII
)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_I64 = 2**63
_MAX_INT_DIGITS = 4300  # past them (leading zeros aside), pydantic would not read an integer


def _text(value: str) -> str:
    """``value``, which must be Unicode text (the environment may hold bytes that are not UTF-8)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(
                "Input should be a valid string, unable to parse raw data as a unicode string", value
            ) from None
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, int):  # a bool too: 1 or 0
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("Input should be a finite number", value)
        if not value.is_integer():
            raise _Invalid("Input should be a valid integer, got a number with a fractional part", value)
        if not -_I64 < value < _I64:
            raise _Invalid("Unable to parse input string as an integer, exceeded maximum size", value)
        return int(value)
    if not isinstance(value, str):
        raise _Invalid("Input should be a valid integer", value)
    text = _text(value).strip(_WHITE_SPACE)
    whole = _ZERO_FRACTION.fullmatch(text)  # 5.0, 5.00: the integer before the point
    if whole is not None and not _INT_TEXT.fullmatch(text):
        text = whole[1]
    if not _INT_TEXT.fullmatch(text):
        raise _Invalid("Input should be a valid integer, unable to parse string as an integer", value)
    digits = text.lstrip("+-").replace("_", "").lstrip("0") or "0"
    if len(digits) > _MAX_INT_DIGITS:
        raise _Invalid("Unable to parse input string as an integer, exceeded maximum size", value)
    return int(digits) * (-1 if text.startswith("-") else 1)


def _to_float(value: Any) -> float:
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise _Invalid("Input should be a valid number", value) from None
    if not isinstance(value, str):
        raise _Invalid("Input should be a valid number", value)
    text = _text(value).strip(_WHITE_SPACE)
    if not _FLOAT_TEXT.fullmatch(text):  # 1_000.5: single underscores inside are dropped (if nothing surrounds it)
        text = "" if value.startswith("_") or value.endswith("_") or "__" in value else value.replace("_", "")
        if not _FLOAT_TEXT.fullmatch(text):
            raise _Invalid("Input should be a valid number, unable to parse string as a number", value)
    return float(text)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = _text(value).lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise _Invalid("Input should be a valid boolean, unable to interpret input", value)
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, int) and -_I64 <= value < _I64:
        raise _Invalid("Input should be a valid boolean, unable to interpret input", value)
    if isinstance(value, float) and value.is_integer() and -_I64 < value < _I64:
        raise _Invalid("Input should be a valid boolean, unable to interpret input", value)
    raise _Invalid("Input should be a valid boolean", value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("Input should be a valid string", value)
    return value


def _to_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise _Invalid("Input is not a valid path for <class 'pathlib.Path'>", value)
    return Path(value)


def _to_secret(value: Any) -> SecretStr:
    if isinstance(value, SecretStr):
        return value
    return SecretStr(_to_str(value))


_CONVERSIONS: dict[Any, Callable[[Any], Any]] = {
    int: _to_int,
    float: _to_float,
    bool: _to_bool,
    str: _to_str,
    Path: _to_path,
    SecretStr: _to_secret,
}


class Setting:
    """One setting as :class:`Settings` declares it: its default (or ``default_factory``), its
    environment variable, its meaning, its bounds, and the functions that adjust a value before
    its type's conversion (``before``) or check it after (``after``: a ValueError's text is the
    message). Its type, and whether it may be None, come from the annotation."""

    __slots__ = (
        "_pattern",
        "after",
        "before",
        "choices",
        "convert",
        "default",
        "default_factory",
        "description",
        "env",
        "ge",
        "gt",
        "le",
        "max_length",
        "min_length",
        "name",
        "optional",
        "pattern",
        "repr",
    )

    def __init__(
        self,
        default: Any,
        *,
        env: str,
        description: str,
        default_factory: Callable[[], Any] | None = None,
        ge: float | None = None,
        gt: float | None = None,
        le: float | None = None,
        min_length: int | None = None,
        max_length: int | None = None,
        pattern: str | None = None,
        before: Callable[[Any], Any] | None = None,
        after: Callable[[Any], Any] | None = None,
        repr: bool = True,
    ) -> None:
        self.default, self.default_factory = default, default_factory
        self.env, self.description, self.repr = env, description, repr
        self.ge, self.gt, self.le = ge, gt, le
        self.min_length, self.max_length, self.pattern = min_length, max_length, pattern
        # as pydantic's (Rust's) regular expressions read it: $ is the end of the text, not before a last \n
        self._pattern = None if pattern is None else re.compile(re.sub(r"\$$", r"\\Z", pattern))
        self.before, self.after = before, after
        self.name = ""
        self.optional = False
        self.choices: tuple[str, ...] = ()
        self.convert: Callable[[Any], Any] = _to_str

    def typed(self, name: str, annotation: Any) -> None:
        """Take the type of the annotation ``name: annotation`` (``X``, ``X | None``, ``Literal[...]``)."""
        self.name = name
        args = get_args(annotation)
        if type(None) in args:
            self.optional = True
            [annotation] = [a for a in args if a is not type(None)]
        if get_origin(annotation) is Literal:
            self.choices = get_args(annotation)
            self.convert = self._choice
        else:
            self.convert = _CONVERSIONS[annotation]

    def initial(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default

    def check(self, value: Any) -> Any:
        """``value`` as the setting holds it, or _Invalid saying what is wrong."""
        if self.before is not None:
            value = _applied(self.before, value)
        if value is None and self.optional:
            converted = None
        else:
            converted = self.convert(value)
            self._within_bounds(converted, value)
        return converted if self.after is None else _applied(self.after, converted)

    def _choice(self, value: Any) -> str:
        if isinstance(value, str) and _text(value) in self.choices:
            return value
        shown = [repr(choice) for choice in self.choices]
        raise _Invalid(f"Input should be {', '.join(shown[:-1])} or {shown[-1]}", value)

    def _within_bounds(self, converted: Any, value: Any) -> None:
        # in pydantic's order, so that nan fails the first bound it meets
        if self.le is not None and not converted <= self.le:
            raise _Invalid(f"Input should be less than or equal to {self.le}", value)
        if self.ge is not None and not converted >= self.ge:
            raise _Invalid(f"Input should be greater than or equal to {self.ge}", value)
        if self.gt is not None and not converted > self.gt:
            raise _Invalid(f"Input should be greater than {self.gt}", value)
        if self.min_length is None and self.max_length is None and self._pattern is None:
            return
        text = _text(converted)
        if self.min_length is not None and len(text) < self.min_length:
            plural = "" if self.min_length == 1 else "s"
            raise _Invalid(f"String should have at least {self.min_length} character{plural}", value)
        if self.max_length is not None and len(text) > self.max_length:
            plural = "" if self.max_length == 1 else "s"
            raise _Invalid(f"String should have at most {self.max_length} character{plural}", value)
        if self._pattern is not None and not self._pattern.search(text):
            raise _Invalid(f"String should match pattern '{self.pattern}'", value)


def _applied(check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise _Invalid(f"Value error, {exc}", value) from None


def setting(default: Any = None, **declared: Any) -> Any:
    """A field of :class:`Settings`: ``name: type = setting(default, env=..., description=..., ...)``
    (typed Any, so the annotation stays the type of the value)."""
    return Setting(default, **declared)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _octal(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text:
            return DEFAULT_UMASK
        if not all(c in "01234567" for c in text):
            raise ValueError("must be octal permission bits, like 0027 or 0007")
        return int(text, 8)
    return value


def _check_url(value: str | None) -> str | None:
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


def _check_postgres_url(value: Any) -> Any:
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


class Settings:
    """Every setting, by its name; built by :func:`load_settings` from the environment and the flags.

    ``Settings(**values)`` converts and checks each value (by the setting's name or its variable's;
    a missing one takes its default, checked as well), raising :class:`InvalidSettings` with every
    problem; ``Settings.FIELDS`` describes each setting. The settings are frozen once made."""

    FIELDS: ClassVar[dict[str, Setting]]

    redis_url: str | None = setting(
        None,
        repr=False,  # it may hold a password
        env="REDIS_URL",
        after=_check_url,
        description=(
            "`redis://`, `rediss://` (TLS; e.g. `rediss://host:6380/0?ssl_ca_certs=/etc/redis/ca.pem`) or `unix://` "
            "(e.g. `unix:///run/redis/redis.sock?db=0`) URL of desto's Redis; overrides the host, port and database"
        ),
    )
    redis_host: str = setting("localhost", min_length=1, env="REDIS_HOST", description="desto's Redis host")
    redis_port: int = setting(6379, ge=1, le=65535, env="REDIS_PORT", description="its port")
    redis_db: int = setting(0, ge=0, env="REDIS_DB", description="its database")
    redis_username: str | None = setting(None, env="REDIS_USERNAME", description="ACL user name")
    redis_password: SecretStr | None = setting(None, env="REDIS_PASSWORD", description="its password (never logged)")
    redis_url_file: Path | None = setting(
        None,
        env="REDIS_URL_FILE",
        description=(
            "a file holding `REDIS_URL` (a container's secret, a systemd credential), read at start without its "
            "trailing newline: the password stays out of the environment and the process list"
        ),
    )
    redis_password_file: Path | None = setting(
        None,
        env="REDIS_PASSWORD_FILE",
        description="a file holding `REDIS_PASSWORD`, read the same way",
    )

    desto_data_dir: Path | None = setting(
        None,
        env="DESTO_DATA_DIR",
        description=(
            "desto's data folder, used when `SQLITE_DB_PATH` is unset: the archive is then `$DESTO_DATA_DIR/desto.db` "
            "(`desto_data/desto.db` when both are unset)"
        ),
    )
    sqlite_db_path: Path | None = setting(
        None,
        env="SQLITE_DB_PATH",
        description="the archive, the SQLite file desto's History tab reads",
    )

    batch_size: int = setting(
        500,
        ge=1,
        le=100_000,
        env="ARCHIVER_BATCH_SIZE",
        description="keys per read and per transaction",
    )
    flush_interval: float = setting(
        0.005,
        ge=0,
        le=3600,
        env="ARCHIVER_FLUSH_INTERVAL",
        description=(
            "how long a change waits to be batched with others (s); up to 10 times that under a stream of changes"
        ),
    )
    reconcile_interval: float = setting(
        300,
        gt=0,
        env="ARCHIVER_RECONCILE_INTERVAL",
        description="seconds between full reconciles, the safety net",
    )
    fallback_reconcile_interval: float = setting(
        10,
        gt=0,
        env="ARCHIVER_FALLBACK_RECONCILE_INTERVAL",
        description="seconds between full reconciles when keyspace notifications cannot be turned on",
    )
    configure_notifications: bool = setting(
        True,
        env="ARCHIVER_CONFIGURE_NOTIFICATIONS",
        description="allow `CONFIG SET notify-keyspace-events` (the flags are only ever added to)",
    )
    max_dirty: int = setting(
        100_000,
        ge=1,
        env="ARCHIVER_MAX_DIRTY",
        description="most keys waiting to be read; beyond, they are dropped and a full reconcile runs",
    )
    health_check_interval: float = setting(
        10,
        gt=0,
        env="ARCHIVER_HEALTH_CHECK_INTERVAL",
        description="pub/sub silence (s) before a PING; no answer within as long again means a reconnect",
    )
    socket_timeout: float = setting(
        10,
        gt=0,
        env="ARCHIVER_SOCKET_TIMEOUT",
        description="Redis connect and read timeout (s)",
    )
    reconnect_max_backoff: float = setting(
        30,
        gt=0,
        env="ARCHIVER_RECONNECT_MAX_BACKOFF",
        description="cap of the reconnect backoff (s)",
    )
    heartbeat_interval: float = setting(
        5,
        gt=0,
        env="ARCHIVER_HEARTBEAT_INTERVAL",
        description="how often the daemon records its heartbeat in the file (s)",
    )
    shutdown_timeout: float = setting(
        10,
        gt=0,
        env="ARCHIVER_SHUTDOWN_TIMEOUT",
        description="longest the final flush may take on SIGTERM (s)",
    )
    sqlite_busy_timeout: float = setting(
        5,
        ge=0,
        env="ARCHIVER_SQLITE_BUSY_TIMEOUT",
        description=(
            "wait for another writer's lock before retrying later (s); meanwhile a write tries for the lock every "
            "millisecond, so it gets in between another writer's short transactions"
        ),
    )
    # SQLite's page cache; None: each command's own default (DAEMON_CACHE_MB, BACKFILL_CACHE_MB).
    sqlite_cache_mb: int | None = setting(
        None,
        ge=1,
        le=65_536,
        env="ARCHIVER_SQLITE_CACHE_MB",
        description=(
            "SQLite's page cache (MB); unset: 64 for `run`, 8 for `backfill`. The daemon's holds the indexes of a few "
            "hundred thousand records (desto's random ids spread every insert over them); it fills only as the "
            "archive grows, and a lower value suits a small machine"
        ),
    )
    retention_days: float | None = setting(
        None,
        gt=0,
        env="ARCHIVER_RETENTION_DAYS",
        description=(
            "erase records that left Redis more than this many days ago (their rows, history and quarantine "
            "entries), hourly and in small steps; never a record Redis still holds. Unset: keep everything"
        ),
    )
    quarantine_max_record_bytes: int = setting(
        DEFAULT_QUARANTINE_RECORD_BYTES,
        ge=1024,
        le=2**30,
        env="ARCHIVER_QUARANTINE_MAX_RECORD_BYTES",
        description=(
            "a quarantined value (as Redis returned it, RESP-encoded) longer than this many bytes is kept as its "
            "SHA-256, its length and its first 4 KiB (or this many bytes, if fewer), and marked `truncated`"
        ),
    )
    quarantine_max_bytes: int = setting(
        DEFAULT_QUARANTINE_BYTES,
        ge=0,
        env="ARCHIVER_QUARANTINE_MAX_BYTES",
        description=(
            "the quarantine's total size (its keys and kept values, bytes): once reached, a rejected key not in the "
            "quarantine yet is counted (`stats`, `check`, a metric), not stored; the keys already there are still "
            "updated"
        ),
    )
    metrics_port: int | None = setting(
        None,
        ge=1,
        le=65535,
        env="ARCHIVER_METRICS_PORT",
        description="serve Prometheus metrics on this port (off when unset)",
    )
    metrics_host: str = setting(
        "127.0.0.1",
        env="ARCHIVER_METRICS_HOST",
        description="the address the metrics listen on",
    )
    # The archive holds command lines: the permission bits its files are created without.
    umask: int = setting(
        DEFAULT_UMASK,
        ge=0,
        le=0o777,
        env="ARCHIVER_UMASK",
        before=_octal,
        description=(
            "permission bits the files the archiver creates (the archive, its WAL, backups, exports) are created "
            "without, in octal like umask(1); it replaces the process' own umask. The default `0007` gives 0660 "
            "files: the owner and its group (desto's user shares them through it), never the world; `0077` keeps "
            "them the owner's alone"
        ),
    )
    # PostgreSQL: every record written to the file is also shipped there (archiver/central/ship.py)
    postgres_url: SecretStr | None = setting(
        None,
        env="ARCHIVER_POSTGRES_URL",
        before=_check_postgres_url,
        description=(
            "a PostgreSQL database (postgresql://user:password@host/db) that every record of the file is also "
            "shipped to, from a change log in the file; unset: no shipping. Needs the `postgres` extra"
        ),
    )
    postgres_url_file: Path | None = setting(
        None,
        env="ARCHIVER_POSTGRES_URL_FILE",
        description="a file holding `ARCHIVER_POSTGRES_URL`, read the same way",
    )
    postgres_schema: str = setting(
        "desto_archiver",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        env="ARCHIVER_POSTGRES_SCHEMA",
        description="the PostgreSQL schema the central tables live in",
    )
    source_name: str = setting(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=200,
        env="ARCHIVER_SOURCE_NAME",
        description="this archive's name in the central database, part of every key there (default: the host name)",
    )
    ship_batch_size: int = setting(
        2000,
        ge=1,
        le=100_000,
        env="ARCHIVER_SHIP_BATCH_SIZE",
        description="changes shipped to PostgreSQL per transaction",
    )
    ship_interval: float = setting(
        10.0,
        gt=0,
        le=3600,
        env="ARCHIVER_SHIP_INTERVAL",
        description=(
            "longest wait in seconds between looks at the change log; the daemon's commits, and other programs' "
            "it notices within two seconds, start shipping at once"
        ),
    )
    allow_root: bool = setting(
        False,
        env="ARCHIVER_ALLOW_ROOT",
        description=(
            "let `run` run as root (`--allow-root`); refused otherwise: root's daemon would create and write files "
            "in the archive's folder, which desto's group may write too. The image and the unit run as `desto`"
        ),
    )
    log_format: Literal["auto", "json", "console"] = setting(
        "auto",
        env="ARCHIVER_LOG_FORMAT",
        before=_lower,
        description="`json`, `console`, or `auto` (JSON unless stderr is a terminal)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting(
        "info",
        env="ARCHIVER_LOG_LEVEL",
        before=_lower,
        description="`debug`, `info`, `warning` or `error`",
    )

    def __init__(self, **values: Any) -> None:
        errors: list[tuple[str, str, Any]] = []
        for name, field in self.FIELDS.items():
            if name in values:
                value = values[name]
            elif field.env in values:
                value = values[field.env]
            else:
                value = field.initial()
            try:
                object.__setattr__(self, name, field.check(value))
            except _Invalid as exc:
                errors.append((name, exc.message, exc.value))
        if errors:
            raise InvalidSettings(errors)
        if self.sqlite_db_path is None:
            data_dir = self.desto_data_dir or Path("desto_data")
            object.__setattr__(self, "sqlite_db_path", data_dir / "desto.db")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the settings are frozen: {name} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the settings are frozen: {name} cannot be deleted")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def _shown(self) -> list[str]:
        return [f"{name}={getattr(self, name)!r}" for name, field in self.FIELDS.items() if field.repr]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._shown())})"

    def __str__(self) -> str:
        return " ".join(self._shown())

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


def _declared(cls: type[Settings]) -> dict[str, Setting]:
    """The settings ``cls`` declares, in their order, each typed by its annotation; the class keeps
    none of them as an attribute (an instance holds the values)."""
    hints = get_type_hints(cls)
    fields: dict[str, Setting] = {}
    for name, value in list(vars(cls).items()):
        if isinstance(value, Setting):
            value.typed(name, hints[name])
            fields[name] = value
            delattr(cls, name)
    return fields


Settings.FIELDS = _declared(Settings)

ENV_NAMES: dict[str, str] = {name: field.env for name, field in Settings.FIELDS.items()}


# The secrets that may be given in a file instead (a container's secrets, systemd's credentials),
# so they are in neither the environment nor the process list: the setting, and its file's.
SECRET_FILES = {
    "redis_url": "redis_url_file",
    "redis_password": "redis_password_file",
    "postgres_url": "postgres_url_file",
}
_SECRET_SETTINGS = tuple(SECRET_FILES)  # never shown in an error, whichever way they were given


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
        return Settings(**{**environment(), **values})
    except InvalidSettings as exc:
        lines = []
        for field, message, value in exc.errors:
            if field in from_files:
                where = ENV_NAMES[SECRET_FILES[field]]
            elif field in flags:
                where = f"--{field.replace('_', '-')}"
            else:
                where = ENV_NAMES.get(field, field)
            shown = "" if field in _SECRET_SETTINGS else f" (got {value!r})"
            lines.append(f"{where}: {message}{shown}")
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
