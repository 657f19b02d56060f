"""``desto-archiver check``: a doctor for the whole set-up, and a verify of the archive against Redis.

The verify compares, for every live desto record, what the archive holds with what the daemon
would write now (the same fetch and normalize path), like RIOT's ``compare``: records missing
from the archive, records that differ, and live rows whose keys Redis no longer has. A record
that changed a moment ago may not be archived yet: suspects are looked at again after a short
settle time, and only lasting differences are reported.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archiver.archive.quarantine import not_kept, used_bytes
from archiver.archive.reader import Reader, last_missed_changes
from archiver.archive.schema import SCHEMA_VERSION, unsupported_sqlite
from archiver.archive.sql import erased_among, erased_rows, has_erasures, read_only, select_in
from archiver.archive.store import DAMAGED_ADVICE, is_damaged
from archiver.config import Settings
from archiver.daemon.reconcile import read_batch, records_of
from archiver.keys import record_key
from archiver.kinds import TABLES, Kind
from archiver.models import COLUMNS, Rejected, Row, iso_utc
from archiver.redis_side.read_clock import now_us
from archiver.redis_side.redis_client import CONNECTION_ERRORS, retryable, unreachable_advice
from archiver.redis_side.source import Source, flags_sufficient, merge_flags

_MAX_SUSPECTS = 10_000  # differences kept in detail (and looked at again); beyond, only counted


@dataclass
class Finding:
    check: str
    status: str  # ok, warn, fail
    detail: str
    hint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "hint": self.hint}


@dataclass
class Difference:
    key: str
    problem: str  # missing, differing, extra
    columns: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # column: (archive, redis)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "problem": self.problem,
            "columns": {c: {"archive": a, "redis": r} for c, (a, r) in self.columns.items()},
        }


@dataclass
class VerifyReport:
    records: int = 0
    quarantined: int = 0
    not_kept: int = 0  # rejected, not in quarantine: its total cap bit (``check``'s quarantine finding)
    missing: int = 0
    erased: int = 0  # in Redis, erased from the archive on purpose: expected, not missing
    differing: int = 0
    extra: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.differing or self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "quarantined": self.quarantined,
            "not_kept": self.not_kept,
            "missing": self.missing,
            "erased": self.erased,
            "differing": self.differing,
            "extra": self.extra,
            "differences": [d.as_dict() for d in self.differences],
        }


# ─── verify ──────────────────────────────────────────────────────────────────────────────────────


def verify(source: Source, conn: sqlite3.Connection, page: int = 500, settle_s: float = 2.0) -> VerifyReport:
    report = VerifyReport()
    suspects: dict[bytes, Difference] = {}
    cursor = 0
    noted = not_kept(conn)
    full = noted is not None and bool(noted.get("full"))
    while True:
        cursor, keys = source.scan_page(cursor, page)
        wanted = [(k, p) for k, p in records_of(keys) if p.kind is not None]
        for difference in _compare(source, conn, wanted, report, full):
            _note(report, suspects, difference)
        if cursor == 0:
            break
    for kind in Kind:
        for difference in _extra(source, conn, kind, page):
            _note(report, suspects, difference)
    if suspects and settle_s > 0:
        time.sleep(settle_s)  # let a running daemon catch up, then look again
        report = _recheck(source, conn, report, suspects, full)
    else:
        report.differences = list(suspects.values())
    return report


def _note(report: VerifyReport, suspects: dict[bytes, Difference], difference: Difference) -> None:
    setattr(report, difference.problem, getattr(report, difference.problem) + 1)
    if len(suspects) < _MAX_SUSPECTS:
        suspects[difference.key.encode("utf-8", "surrogateescape")] = difference


def _recheck(
    source: Source, conn: sqlite3.Connection, report: VerifyReport, suspects: dict[bytes, Difference], full: bool
) -> VerifyReport:
    fresh = VerifyReport(records=report.records, quarantined=report.quarantined, not_kept=report.not_kept)
    overflow = {p: getattr(report, p) - sum(1 for d in suspects.values() if d.problem == p) for p in _PROBLEMS}
    keys = list(suspects)
    for start in range(0, len(keys), 500):
        chunk = records_of(keys[start : start + 500])
        for difference in _compare(source, conn, chunk, VerifyReport(), full):
            setattr(fresh, difference.problem, getattr(fresh, difference.problem) + 1)
            fresh.differences.append(difference)
    for problem, count in overflow.items():  # beyond the detail limit: counted, not looked at again
        setattr(fresh, problem, getattr(fresh, problem) + count)
    return fresh


_PROBLEMS = ("missing", "differing", "extra")


def _compare(
    source: Source, conn: sqlite3.Connection, keys: list[Any], report: VerifyReport, full: bool = False
) -> list[Difference]:
    """``full``: the quarantine's total cap bit, so a rejected record it lacks was counted, not
    stored (``not_kept``), rather than missing."""
    if not keys:
        return []
    differences = []
    outcomes = read_batch(source, keys)
    rows_by_kind: dict[Kind, list[Row]] = {}
    for outcome in outcomes:
        if isinstance(outcome, Row):
            rows_by_kind.setdefault(outcome.kind, []).append(outcome)
        elif isinstance(outcome, Rejected):
            report.quarantined += 1
            if (
                outcome.kind is not None
                and outcome.record_id
                and has_erasures(conn)
                and erased_among(conn, outcome.kind, [outcome.record_id])
            ):
                report.erased += 1
            elif outcome.kind is not None and not _in_quarantine(conn, outcome.key):
                if full:
                    report.not_kept += 1
                else:
                    differences.append(
                        Difference(_text(outcome.key), "missing", {"quarantine": (None, outcome.reason)})
                    )
        else:  # gone since it was scanned or listed
            live = _archived(conn, outcome.kind, [outcome.record_id]) if outcome.kind is not None else {}
            if live and live[outcome.record_id][-1] is None:
                differences.append(Difference(_text(outcome.key), "extra"))
    for kind, rows in rows_by_kind.items():
        archived = _archived(conn, kind, [r.record_id for r in rows])
        new = [(r.record_id, r.values) for r in rows if r.record_id not in archived]
        erased = erased_rows(conn, kind, new) if new and has_erasures(conn) else set()
        columns = COLUMNS[kind]
        for row in rows:
            report.records += 1
            found = archived.get(row.record_id)
            if found is None:
                if row.record_id in erased:
                    report.erased += 1
                else:
                    differences.append(Difference(_text(row.key), "missing"))
                continue
            diff = {c: (a, r) for c, a, r in zip(columns, found[:-1], row.values, strict=True) if a != r}
            if found[-1] is not None:
                diff["gone_at"] = (found[-1], None)
            if diff:
                differences.append(Difference(_text(row.key), "differing", diff))
    return differences


def _archived(conn: sqlite3.Connection, kind: Kind, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    columns = COLUMNS[kind]
    query = f"SELECT {', '.join(columns)}, gone_at FROM {TABLES[kind]} WHERE {columns[0]} IN"
    return {r[0]: tuple(r) for r in select_in(conn, query, ids)}


def _in_quarantine(conn: sqlite3.Connection, key: bytes) -> bool:
    found = conn.execute("SELECT 1 FROM quarantine WHERE key = ? AND resolved_at IS NULL LIMIT 1", (key,)).fetchone()
    return found is not None


def _extra(source: Source, conn: sqlite3.Connection, kind: Kind, page: int) -> Iterator[Difference]:
    """Live rows whose keys Redis does not have (the daemon would tombstone them), page by page:
    an archive of a million rows Redis forgot is counted in flat memory."""
    table, id_col = TABLES[kind], COLUMNS[kind][0]
    after = 0
    while True:
        rows = conn.execute(
            f"SELECT rowid, {id_col} FROM {table} WHERE gone_at IS NULL AND rowid > ? ORDER BY rowid LIMIT ?",
            (after, page),
        ).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        keys = [record_key(kind, r[1]) for r in rows]
        pipe = source.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        for key, exists in zip(keys, pipe.execute(), strict=True):
            if not exists:
                yield Difference(_text(key), "extra")


def _text(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


# ─── the doctor ──────────────────────────────────────────────────────────────────────────────────


def doctor(
    settings: Settings, source: Source, with_daemon: bool = True, integrity: bool = False
) -> tuple[list[Finding], bool]:
    """Every check of the set-up; the second value tells whether Redis could be reached.
    ``integrity``: SQLite's quick_check of the whole file too (it reads every page)."""
    unsupported = unsupported_sqlite()
    findings = [
        Finding("sqlite", "fail", unsupported, "docs/getting-started.md, 'Requirements'")
        if unsupported
        else Finding("sqlite", "ok", f"SQLite {sqlite3.sqlite_version}")
    ]
    redis_ok = True
    try:
        source.ping()
        findings.append(Finding("redis", "ok", f"{settings.redis_address()} (Redis {source.server_version()})"))
    except Exception as exc:
        if not retryable(exc):
            raise
        redis_ok = False
        findings.append(
            Finding(
                "redis",
                "fail",
                f"cannot {'reach' if isinstance(exc, CONNECTION_ERRORS) else 'use'} {settings.redis_address()}: {exc}",
                unreachable_advice(exc, retried=False),
            )
        )
    if redis_ok:
        findings.append(_notifications(source, needed=with_daemon))
    findings += _file(settings.db_path, integrity)
    findings += _quarantine(settings.db_path)
    if with_daemon:
        findings.append(_daemon(settings))
        missed = _missed_changes(settings)
        if missed is not None:
            findings.append(missed)
    if settings.postgres_url is not None:
        findings.append(_postgres(settings))
    return findings, redis_ok


def _notifications(source: Source, needed: bool) -> Finding:
    try:
        reply: dict[Any, Any] = dict(source.client.config_get("notify-keyspace-events"))
    except Exception as exc:  # refused: ACLs, managed Redis, renamed command
        return Finding(
            "notifications",
            "warn",
            f"CONFIG GET refused ({exc}): cannot tell whether keyspace notifications are on",
            "the daemon then relies on its fallback reconcile; set notify-keyspace-events KEA in Redis",
        )
    raw = reply.get("notify-keyspace-events", reply.get(b"notify-keyspace-events", b""))
    flags = raw.decode() if isinstance(raw, bytes) else str(raw)
    config = _config_set_permission(source)
    if flags_sufficient(flags):
        return Finding("notifications", "ok", f"notify-keyspace-events={flags!r}; {config}")
    return Finding(
        "notifications",
        "fail" if needed else "warn",
        f"notify-keyspace-events={flags!r} lacks {merge_flags(flags)[len(flags) :]!r}; {config}",
        "a running daemon sets them at start, after reconnects and on each reconcile; else set "
        "notify-keyspace-events KEA in Redis",
    )


def _config_set_permission(source: Source) -> str:
    """Whether this user may CONFIG SET the flags, asked without setting anything: a doctor must
    not change what it examines (writing back the value just read could undo flags set in
    between). ACL DRYRUN (Redis 7) answers; where it cannot, the answer is that it is unknown."""
    try:
        user = source.client.acl_whoami()
        user = user.decode() if isinstance(user, bytes) else user
        reply = source.client.acl_dryrun(user, "CONFIG", "SET", "notify-keyspace-events", "KEA")
    except Exception as exc:  # Redis < 7, no permission for ACL DRYRUN, CONFIG renamed away
        text = str(exc)
        if "not found" in text:  # the command table has no CONFIG: renamed or disabled
            return "CONFIG SET refused (the command is disabled)"
        return f"CONFIG SET unknown (ACL DRYRUN could not tell: {text[:80]})"
    answer = reply.decode() if isinstance(reply, bytes) else str(reply)
    return "CONFIG allowed" if answer == "OK" else f"CONFIG SET refused ({answer[:80]})"


def _permissions(path: Path) -> Finding:
    """The archive holds desto's command lines: files other users may read are worth a warning."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()}
    shown = ", ".join(f"{name} {mode:04o}" for name, mode in modes.items())
    if not any(mode & 0o007 for mode in modes.values()):
        return Finding("permissions", "ok", shown)
    return Finding(
        "permissions",
        "warn",
        f"{shown}: other users may read the archive (it holds command lines)",
        f"chmod o-rwx {path} {path}-wal {path}-shm; start the archiver with ARCHIVER_UMASK=0007 "
        "(the systemd unit's UMask=0007 and the image do)",
    )


def _file(path: Path, integrity: bool = False) -> list[Finding]:
    try:
        found = path.exists()
    except OSError as exc:  # a folder this user may not look into
        return [
            Finding("file", "fail", f"cannot look at {path}: {exc.strerror}", "give this user access to its folder")
        ]
    if not found:
        return [
            Finding(
                "file",
                "fail",
                f"{path} does not exist",
                "start 'desto-archiver run' (or 'backfill'), or point SQLITE_DB_PATH at the archive",
            )
        ]
    findings = []
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    findings.append(
        Finding(
            "file",
            "ok" if writable else "fail",
            f"{path} ({size:,} bytes with its WAL){'' if writable else ': not writable'}",
            None if writable else f"give the archiver's user write access to {path} and its folder",
        )
    )
    findings.append(_permissions(path))
    conn = read_only(path, timeout=10)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        damage = _quick_check(conn) if integrity else None
    except sqlite3.DatabaseError as exc:
        if not is_damaged(exc):
            raise
        return [*findings, Finding("integrity", "fail", f"SQLite cannot read it: {exc}", DAMAGED_ADVICE)]
    finally:
        conn.close()
    findings.append(
        Finding("wal", "ok" if mode == "wal" else "fail", f"journal_mode={mode}", "run the archiver once: it sets WAL")
    )
    if version == SCHEMA_VERSION:
        findings.append(Finding("schema", "ok", f"version {version}"))
    elif version > SCHEMA_VERSION:
        findings.append(Finding("schema", "fail", f"version {version} > {SCHEMA_VERSION}", "upgrade desto-archiver"))
    else:
        findings.append(
            Finding("schema", "warn", f"version {version} < {SCHEMA_VERSION}", "the next 'run' or 'backfill' migrates")
        )
    if integrity:
        findings.append(
            Finding("integrity", "ok", "quick_check: ok")
            if damage is None
            else Finding("integrity", "fail", damage, DAMAGED_ADVICE)
        )
    return findings


def _quarantine(path: Path) -> list[Finding]:
    """Said only once the quarantine's total cap has bitten: how many rejected records it kept out,
    and whether it still does."""
    try:
        conn = read_only(path, timeout=10)
    except sqlite3.Error:
        return []
    try:
        noted = not_kept(conn)
        used = used_bytes(conn) if noted is not None else 0
    except sqlite3.DatabaseError:  # a damaged file: the file's own findings say so
        return []
    finally:
        conn.close()
    if noted is None:
        return []
    count, cap, last = int(noted.get("count", 0)), int(noted.get("max_bytes", 0)), noted.get("last_at", "-")
    detail = f"{count:,} rejected records not stored since {noted.get('first_at', '-')} (last at {last})"
    if not noted.get("full"):
        return [Finding("quarantine", "ok", detail + f": the cap of {cap:,} bytes bit; there is room again")]
    return [
        Finding(
            "quarantine",
            "warn",
            detail + f": full, {used:,} bytes held against a cap of {cap:,}",
            "erase what is not needed (forget, prune), or raise ARCHIVER_QUARANTINE_MAX_BYTES; "
            "'desto-archiver export quarantine' lists what it holds",
        )
    ]


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """What SQLite's quick_check finds wrong with the file (None: nothing), a few problems at most."""
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.DatabaseError as exc:  # a page too damaged to walk stops the check itself
        if not is_damaged(exc):
            raise
        return str(exc)
    return None if problems == ["ok"] else "; ".join(problems)[:300]


def _postgres(settings: Settings) -> Finding:
    """The central database: reachable, its schema, and how far this file's shipping is behind."""
    from archiver.central.postgres import ShipError, require_psycopg

    try:
        require_psycopg()
    except ShipError as exc:
        return Finding("postgres", "fail", "psycopg is not installed", str(exc).split(": ", 1)[1])
    import psycopg

    from archiver.archive import changelog
    from archiver.central.postgres import (
        PG_SCHEMA_VERSION,
        connect,
        may_write,
        pg_schema_version,
        refusal,
        shipped_sources,
        sources_hint,
    )
    from archiver.central.ship import STATE_FILE_ID, log_is_shipped

    where = settings.postgres_address()
    try:
        with connect(settings) as pg:
            version = pg_schema_version(pg, settings.postgres_schema)
            if version > PG_SCHEMA_VERSION:
                return Finding(
                    "postgres",
                    "fail",
                    f"{where}: schema version {version} > {PG_SCHEMA_VERSION}",
                    "upgrade desto-archiver",
                )
            if version == 0:
                return Finding(
                    "postgres",
                    "warn",
                    f"{where}: no schema {settings.postgres_schema} yet",
                    "the daemon creates it (its role needs CREATE), or run 'desto-archiver ship' as its owner",
                )
            allowed, role = may_write(pg, settings.postgres_schema, settings.source_name)
            if not allowed:
                what, action = refusal(role, settings.postgres_schema, settings.source_name)
                return Finding("postgres", "fail", f"{where}: {what}", action)
            mark = "head, head_token" if version >= 3 else "NULL, NULL"  # kept from central schema 3 on
            row = pg.execute(
                f"SELECT position, shipped_at, file_id, {mark} FROM {settings.postgres_schema}.ship_positions "
                "WHERE source_name = %s",
                (settings.source_name,),
            ).fetchone()
            others = shipped_sources(pg, settings.postgres_schema) if row is None else []
    except psycopg.Error as exc:
        return Finding("postgres", "fail", f"cannot use {where}: {str(exc).strip()}", "see docs/postgresql.md")
    detail = f"{where}, schema version {version}, source {settings.source_name!r}"
    if row is None:
        return Finding(
            "postgres",
            "warn",
            f"{detail}: nothing shipped yet; {sources_hint(others)}",
            "start 'desto-archiver run' or 'ship'",
        )
    position, shipped_at, shipped_file, head, head_token = row
    try:
        conn = read_only(settings.db_path, timeout=10)
        try:
            last, logging = changelog.last_seq(conn), changelog.complete_from(conn) is not None
            found = conn.execute("SELECT value FROM archiver_state WHERE name = ?", (STATE_FILE_ID,)).fetchone()
            same_log = log_is_shipped(conn, head, None if head_token is None else bytes(head_token))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Finding("postgres", "fail", detail + f": cannot read the change log: {exc}")
    shipped = f", last batch {shipped_at:%Y-%m-%d %H:%M:%S %Z}"
    copies = "the next ship (the daemon's, or 'desto-archiver ship') copies it whole"
    problem: tuple[str, str] | None = None
    if found is None or str(found[0]) != shipped_file:
        problem = f"PostgreSQL holds another file of this source (file_id {shipped_file[:12]})", ""
    elif head is None:
        problem = "PostgreSQL holds no mark of the change log shipped (an older desto-archiver's)", ", once"
    elif not same_log:
        problem = (
            "the file is behind what was shipped (a restored or copied file: its change log is not the one "
            f"PostgreSQL holds, shipped up to {position or 0:,}, the file's at {last:,})",
            " under a new file_id",
        )
    if problem is not None:
        return Finding("postgres", "warn", f"{detail}{shipped}: {problem[0]}", copies + problem[1])
    if not logging:
        return Finding(
            "postgres", "warn", detail + shipped + ": the change log is off", "start 'desto-archiver run' with it set"
        )
    behind = max(0, last - (position or 0))
    status = "ok" if behind < 100_000 else "warn"
    return Finding(
        "postgres",
        status,
        detail + shipped + f", {behind:,} changes waiting",
        None if status == "ok" else ("shipping is far behind: see the daemon's log (ship.*)"),
    )


def _missed_changes(settings: Settings) -> Finding | None:
    """What the last reconcile found that no notification had named: a warning, never a failure
    (the reconcile archived it); None when there is no file or state to read."""
    try:
        with Reader.open(settings.db_path) as reader:
            state = reader.state()
    except Exception:
        return None  # the daemon's finding says why the file cannot be read
    missed = last_missed_changes(state)
    if missed is None:
        return Finding("missed changes", "ok", "not measured by the last reconcile (only timer and reconnect ones)")
    total = sum(missed.values())
    if not total:
        return Finding("missed changes", "ok", "none in the last reconcile")
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in missed.items() if n)
    return Finding(
        "missed changes",
        "warn",
        f"the last reconcile found {total:,} change(s) no notification had named ({kinds}); it archived them",
        "notifications are losing changes if this repeats: see docs/metrics.md, 'Missed changes'",
    )


def _daemon(settings: Settings) -> Finding:
    try:
        reader = Reader.open(settings.db_path)
    except Exception as exc:
        return Finding("daemon", "fail", f"cannot read its heartbeat: {exc}", "start 'desto-archiver run'")
    with reader:
        state = reader.state()
    beat = json.loads(state.get("heartbeat", "null") or "null")
    if not beat:
        return Finding("daemon", "fail", "no daemon has run on this file", "start 'desto-archiver run'")
    age = (now_us() - int(beat["at_us"])) / 1e6
    stopped = int(state.get("stopped_at", 0) or 0)
    limit = max(3 * settings.heartbeat_interval, 15.0)
    last_event = int(state.get("last_event_at", 0) or 0)
    lag = f"; last event {(now_us() - last_event) / 1e6:.1f} s ago" if last_event else ""
    detail = f"pid {beat.get('pid')} on {beat.get('host')}, heartbeat {age:.1f} s ago, {beat.get('pending', 0)} pending"
    if stopped > int(beat["at_us"]):
        return Finding("daemon", "fail", f"stopped at {iso_utc(stopped)}", "start 'desto-archiver run'")
    if age > limit:
        return Finding("daemon", "fail", detail + lag, f"no heartbeat for {age:.0f} s: is 'desto-archiver run' alive?")
    if not beat.get("subscribed"):
        return Finding("daemon", "fail", detail + ": not connected to Redis", "see the daemon's log (redis.*)")
    if beat.get("failing"):
        return Finding("daemon", "fail", detail + f": {beat['failing']} failing", "see the daemon's log")
    return Finding("daemon", "ok", detail + lag)
