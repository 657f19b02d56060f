"""Erasing records for good: a deletion in desto's History tab, ``forget``, and retention.

Losing what Redis forgets is what the archiver prevents; a person's deletion is an instruction.
An erased record's id stays in ``archiver_erased`` (when, how), nothing else of it: its rows,
status history and quarantine entries go, the archiver never writes it again, and the file is
scrubbed of its bytes. The archiver's connection deletes with ``secure_delete`` on, so SQLite
overwrites what it frees; a WAL started over (TRUNCATE) drops the older page images. A write
by a connection that does not overwrite (desto's, with a SQLite built without SECURE_DELETE:
the schema's triggers note it) leaves bytes in free space, which the scrub of every page
(scrub.py) zeroes where they lie, so that case alone costs a pass over the file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archiver.archive.pages import Unreadable
from archiver.archive.scrub import PageScrub, ScrubBusy, Unsupported, descriptor, truncate_wal
from archiver.archive.sql import select_in
from archiver.kinds import TABLES, Kind
from archiver.log import get_logger
from archiver.models import COLUMNS, iso_utc
from archiver.redis_side.read_clock import now_us

if TYPE_CHECKING:
    from archiver.archive.store import Store

log = get_logger("archiver.archive.erase")

_SCRUB_STATE = "scrub_pending"  # archiver_state: "pages" or "truncate", until the file is scrubbed
_UNZEROED = "written_unzeroed"  # set by the migrations to schema 3 and 5, and schema 5's triggers (schema.py)
_WAL_TRIES = 20  # tries, 50 ms apart, at starting the WAL over past readers on old snapshots
_PAGES_PER_STEP = 256  # incremental_vacuum pages per transaction: 1 MB of 4 KB pages


@dataclass(frozen=True)
class Erasure:
    """One way a record is erased, and the rules the erasure follows (the table below, the same
    as docs/deleting-history.md's "The ways to delete": a test keeps the two equal)."""

    way: str  # how a person asks for it
    goes: str  # what goes
    how: str  # what ``archiver_erased`` remembers: it chooses the rules below when the erasure is finished
    described: str  # how ``show``, ``stats`` and ``check`` name it
    jobs_follow: bool  # an erased session takes its jobs (in the file, only in quarantine, named by its job list)
    overwritten: bool | None  # the delete overwrites the bytes (None: as desto's SQLite is built; the trigger notes it)


def _by_desto(way: str, goes: str) -> Erasure:
    """A deletion in desto, noted by the schema's triggers in desto's own transaction."""
    return Erasure(way, goes, how="desto", described="desto's History tab", jobs_follow=True, overwritten=None)


ERASURE_RULES: tuple[Erasure, ...] = (
    _by_desto(
        "desto's History tab: a session's trash button (`SQLiteStore.delete_session`)",
        "the session and its jobs: those in the file, those only in quarantine, those its job list names, "
        "and jobs chained to it later, which the archive never met",
    ),
    _by_desto(
        "desto's History tab: Clear History (`clear_sessions_and_jobs`)",
        "every session and job in the file at that moment; favorites stay; sessions created afterwards are "
        "archived as usual",
    ),
    _by_desto(
        "desto's `SQLiteStore.clear_all`",
        "every session, job and favorite in the file at that moment",
    ),
    _by_desto("desto's `SQLiteStore.delete_favorite`", "that favorite"),
    Erasure(
        way="`desto-archiver forget ID...` / `--name NAME`",
        goes="the named sessions (with their jobs), jobs, favorites, at-jobs",
        how="forget",
        described="desto-archiver forget",
        jobs_follow=True,
        overwritten=True,
    ),
    Erasure(
        way="`ARCHIVER_RETENTION_DAYS` / `desto-archiver prune --older-than`",
        goes="records that left Redis longer ago than the period",
        how="retention",
        described="the retention period",
        jobs_follow=False,
        overwritten=True,
    ),
)
# The rules by what archiver_erased remembers (every way of one ``how`` follows the same rules).
RULES: dict[str, Erasure] = {e.how: e for e in ERASURE_RULES}
HOW = {how: rule.described for how, rule in RULES.items()}


def jobs_follow(how: str | None) -> bool:
    """Whether an erased session takes its jobs with it (a ``how`` the table does not know, another
    program's: as desto's own)."""
    rule = None if how is None else RULES.get(how)
    return True if rule is None else rule.jobs_follow


def _zeroed(how: str) -> int:
    """``archiver_erased.zeroed`` for an erasure the archiver makes itself (its connection deletes
    with secure_delete on)."""
    assert RULES[how].overwritten, how
    return 1


def describe(kind: str, how: str) -> str:
    if how == "desto" and kind == "favorite":
        return "desto (favorite deleted)"
    return HOW.get(how, how)


# ─── erasing: the rows, their history and quarantine, then the bytes ─────────────────────────


@dataclass
class Erased:
    """What one erasure removed."""

    records: dict[str, int] = field(default_factory=dict)  # rows deleted here, by kind
    erasures: int = 0  # erasures finished (desto's delete had removed the rows already)
    history: int = 0
    quarantine: int = 0
    scrub: str | None = None  # pages, vacuum, truncate (the WAL started over), or None (nothing to do)
    scrub_s: float = 0.0
    scrub_done: bool = True  # False: under way, or readers kept the WAL; the daemon goes on
    scrub_pages: dict[str, Any] | None = None  # the scrub of every page, once it finished

    def merge(self, other: Erased) -> None:
        for kind, n in other.records.items():
            self.records[kind] = self.records.get(kind, 0) + n
        self.erasures += other.erasures
        self.history += other.history
        self.quarantine += other.quarantine

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "erasures": self.erasures,
            "history": self.history,
            "quarantine": self.quarantine,
            "scrub": self.scrub,
            "scrub_s": round(self.scrub_s, 3),
            "scrub_done": self.scrub_done,
            **({"scrub_pages": self.scrub_pages} if self.scrub_pages is not None else {}),
        }


def note(conn: sqlite3.Connection, records: Iterable[tuple[Kind, str]], how: str, at_us: int) -> None:
    """Note records the archiver erases itself (before deleting: the trigger then keeps quiet)."""
    conn.executemany(
        "INSERT INTO archiver_erased (kind, record_id, erased_at, how, zeroed) VALUES (?, ?, ?, ?, 1) "
        "ON CONFLICT(kind, record_id) DO NOTHING",
        [(kind.value, record_id, iso_utc(at_us), how) for kind, record_id in records],
    )


def remove(conn: sqlite3.Connection, records: Sequence[tuple[Kind, str]]) -> Erased:
    """Delete the records' rows, history, quarantine entries and pending rechecks (inside the
    caller's transaction, on a connection with secure_delete on)."""
    out = Erased()
    by_kind: dict[Kind, list[str]] = {}
    for kind, record_id in records:
        by_kind.setdefault(kind, []).append(record_id)
    for kind, ids in by_kind.items():
        table, id_col = TABLES[kind], COLUMNS[kind][0]
        gone = sum(c.rowcount for c in _each(conn, f"DELETE FROM {table} WHERE {id_col} IN", ids))
        if gone:
            out.records[kind.value] = gone
        where = f"WHERE kind = '{kind.value}' AND record_id IN"
        out.history += sum(c.rowcount for c in _each(conn, f"DELETE FROM status_history {where}", ids))
        out.quarantine += sum(c.rowcount for c in _each(conn, f"DELETE FROM quarantine {where}", ids))
        _each(conn, f"DELETE FROM archiver_recheck {where}", ids)
    return out


def _each(conn: sqlite3.Connection, statement: str, ids: list[str], size: int = 500) -> list[sqlite3.Cursor]:
    return [
        conn.execute(f"{statement} ({', '.join('?' * len(chunk))})", chunk)
        for chunk in (ids[i : i + size] for i in range(0, len(ids), size))
    ]


def purge_pending(conn: sqlite3.Connection, at_us: int, limit: int = 2000) -> tuple[Erased, str | None]:
    """Inside the caller's transaction: finish up to ``limit`` erasures others made (desto's
    deletes, a record erased while the daemon was stopped), so a Clear History of a big archive
    is finished in transactions desto's writes wait for a moment at most. Returns what went and
    the scrub the file needs (None: no erasure was pending)."""
    pending = conn.execute(
        "SELECT kind, record_id, how, zeroed FROM archiver_erased WHERE purged_at IS NULL LIMIT ?", (limit,)
    ).fetchall()
    if not pending:
        return Erased(), None
    return purge(conn, pending, at_us)


def purge(conn: sqlite3.Connection, pending: Sequence[Sequence[Any]], at_us: int) -> tuple[Erased, str]:
    """Finish these erasures (kind, id, how, zeroed): rows, jobs of a session, history,
    quarantine; note them finished, and the scrub the file needs."""
    records = [(Kind(kind), record_id) for kind, record_id, _, _ in pending]
    # A session's jobs go with it, also one written after desto deleted the others, one only in
    # quarantine, one only its job list names. (Retention erases only what left Redis: there a
    # session's jobs go by their own tombstones: ERASURE_RULES.)
    sessions = {r: how for kind, r, how, _ in pending if kind == Kind.SESSION.value and jobs_follow(how)}
    quarantined = 0
    if sessions:
        jobs = jobs_of(conn, list(sessions))
        for how in set(sessions.values()):
            extra = [(Kind.JOB, job_id) for job_id, session_id in jobs.items() if sessions[session_id] == how]
            note(conn, extra, how, at_us)
            records.extend(extra)
        # also the entries of jobs whose key had no readable id
        query = "DELETE FROM quarantine WHERE kind = 'job' AND session_id IN"
        quarantined = sum(c.rowcount for c in _each(conn, query, list(sessions)))
    out = remove(conn, records)
    out.quarantine += quarantined
    out.erasures = len(pending)
    conn.executemany(
        "UPDATE archiver_erased SET purged_at = ?, job_ids = NULL WHERE kind = ? AND record_id = ?",
        [(iso_utc(at_us), kind.value, record_id) for kind, record_id in records],
    )
    overwritten = all(zeroed for *_, zeroed in pending)
    return out, want_scrub(conn, "truncate" if overwritten else "pages", at_us)


def clean_copy(conn: sqlite3.Connection) -> bool:
    """Make a copy of the archive (a backup, before it is put in place) hold nothing of a record
    erased before it was taken: the erasures the live file has not finished yet (desto deleted
    while the daemon was stopped, or a moment ago) are finished in the copy, and the copy is
    rebuilt (VACUUM) when erased bytes may lie in its free pages (a scrub the live file still
    owes). True when it was rebuilt. The live file is not touched."""
    conn.isolation_level = None
    finished = False
    conn.execute("BEGIN IMMEDIATE")
    try:
        while purge_pending(conn, now_us())[1] is not None:
            finished = True
        pending = finished or scrub_pending(conn) is not None
        if pending:  # the rebuilt copy owes no scrub
            conn.execute("DELETE FROM archiver_state WHERE name IN (?, ?)", (_SCRUB_STATE, _UNZEROED))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if pending:
        conn.execute("VACUUM")
    return pending


def jobs_of(conn: sqlite3.Connection, session_ids: Sequence[str]) -> dict[str, str]:
    """job id -> session id of every job the file knows these sessions to have: archived, in
    quarantine, or named by the session's job list (its row's, or the one noted when desto
    deleted it)."""
    found: dict[str, str] = {}
    for query in (
        "SELECT job_id, session_id FROM jobs WHERE session_id IN",
        "SELECT record_id, session_id FROM quarantine WHERE kind = 'job' AND record_id IS NOT NULL AND session_id IN",
    ):
        for job_id, session_id in select_in(conn, query, session_ids):
            found.setdefault(job_id, session_id)
    for query in (
        "SELECT session_id, job_ids FROM sessions WHERE session_id IN",
        "SELECT record_id, job_ids FROM archiver_erased WHERE kind = 'session' AND record_id IN",
    ):
        for session_id, listed in select_in(conn, query, session_ids):
            for job_id in (listed or "").split(","):
                if job_id:
                    found.setdefault(job_id, session_id)
    return found


def want_scrub(conn: sqlite3.Connection, level: str, at_us: int) -> str:
    """Note (in the transaction that deleted) that the file needs scrubbing: a daemon stopped
    before it scrubbed does it at its next start. ``pages`` (every page's free space) covers
    ``truncate`` (the WAL only)."""
    found = dict(conn.execute("SELECT name, value FROM archiver_state WHERE name IN (?, ?)", (_SCRUB_STATE, _UNZEROED)))
    if found.get(_SCRUB_STATE) in ("pages", "vacuum") or _UNZEROED in found:
        level = "pages"
    conn.execute(
        "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (_SCRUB_STATE, level, iso_utc(at_us)),
    )
    return level


def scrub_pending(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM archiver_state WHERE name = ?", (_SCRUB_STATE,)).fetchone()
    if row is None:
        return None
    return "pages" if row[0] == "vacuum" else str(row[0])  # an older archiver's note: the whole file


def scrub(store: Store, level: str, budget_s: float | None = None) -> tuple[bool, float, dict[str, Any] | None]:
    """Leave no byte of an erased record in the file or its WAL. ``pages``: zero the free space
    of every page where it lies (scrub.PageScrub), in write transactions of a few milliseconds
    that desto's writes go on between, ``budget_s`` seconds of it per call (None: to the end).
    ``vacuum`` (``prune --vacuum``, or a file the page scrub cannot read): rewrite the file
    through SQLite, holding the write lock for the whole of it; it also turns on incremental
    auto-vacuum. Then a TRUNCATE checkpoint empties the WAL. Returns (done, seconds, the page
    scrub's figures once it finished); not done while the page scrub goes on, while another
    process scrubs the file, or when readers kept the WAL (the daemon tries again)."""
    started = time.perf_counter()
    conn, figures = store.conn, None
    if level == "truncate" and scrub_pending(conn) == "pages":
        level = "pages"  # a scrub of every page under way covers the WAL too
    if level == "vacuum":
        _end_page_scrub(store)
    # What this scrub answers: notes made before it began (a scrub of every page also covers
    # those made while it ran). A later one, by another process, asks for another.
    covered = _asked_at(conn)
    if level == "pages":
        level, figures, covered = _page_scrub(store, budget_s)
        if level == "pending":
            return False, time.perf_counter() - started, None
    if level == "vacuum":
        # Before, not after: a write desto makes meanwhile notes it again, for the next scrub.
        conn.execute("DELETE FROM archiver_state WHERE name = ?", (_UNZEROED,))
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
    # the file is scrubbed: only the WAL is left to do, should it be kept this time
    answered = "WHERE name = ? AND updated_at <= ?"
    conn.execute(f"UPDATE archiver_state SET value = 'truncate' {answered}", (_SCRUB_STATE, covered))
    done = truncate_wal(conn)
    if done:
        conn.execute(f"DELETE FROM archiver_state {answered}", (_SCRUB_STATE, covered))
        # that delete went to the WAL: start it over once more, it holds nothing erased
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return done, time.perf_counter() - started, figures


def _asked_at(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT updated_at FROM archiver_state WHERE name = ?", (_SCRUB_STATE,)).fetchone()
    return None if row is None else str(row[0])


def _page_scrub(store: Store, budget_s: float | None) -> tuple[str, dict[str, Any] | None, str | None]:
    """A step of the scrub of every page, begun at the first: (done, its figures, the time up to
    which the notes asking for it are answered), (pending, ...), or (vacuum, ...) when this file
    is not one the page scrub can read."""
    scrubbing = store.page_scrub
    asked = _asked_at(store.conn)
    if store.file_lost() is not None:
        # The path names another file, or none: the lost file's scrub ends with it (the daemon
        # opens the path again at its next file check), and nothing here touches the path's file.
        _end_page_scrub(store)
        return "pending", None, asked
    try:
        if scrubbing is None:
            keep = store.conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'archiver_scrub'").fetchone()
            scrubbing = PageScrub(store.path, descriptor(store.path), store.busy_timeout, int(keep[0]))
            store.page_scrub = scrubbing
            if store.checkpointer is not None:
                store.checkpointer.paused = True
            # Before the pass: a write desto makes during it notes the file again, for the next.
            with store.transaction() as conn:
                conn.execute("DELETE FROM archiver_state WHERE name = ?", (_UNZEROED,))
        tries = 0
        while not scrubbing.step(float("inf") if budget_s is None else budget_s):
            tries += 1
            if budget_s is not None or tries >= _WAL_TRIES:
                return "pending", None, asked
            time.sleep(0.05)  # a reader on an old snapshot kept the WAL
    except ScrubBusy:
        return "pending", None, asked
    except (FileNotFoundError, sqlite3.OperationalError) as exc:
        if store.file_lost() is None:  # not a file gone a moment ago: the error is the caller's to see
            raise
        log.info("scrub.file_lost", detail=str(exc))
        _end_page_scrub(store)
        return "pending", None, asked
    except (Unreadable, Unsupported) as exc:
        log.warning("scrub.vacuum_instead", reason=str(exc))
        _end_page_scrub(store)
        return "vacuum", None, asked
    _end_page_scrub(store)
    # every erasure committed before its last step took the write lock is covered
    return "done", scrubbing.progress.as_dict(), iso_utc(int(scrubbing.covered_until * 1_000_000))


def _end_page_scrub(store: Store) -> None:
    if store.page_scrub is not None:
        store.page_scrub.close()
        store.page_scrub = None
    if store.checkpointer is not None:
        store.checkpointer.paused = False


def give_back_space(conn: sqlite3.Connection, begin: Any, max_steps: int = 10_000) -> int:
    """Shrink the file by its free pages, ``_PAGES_PER_STEP`` per transaction, so desto's writes
    wait a moment at most; only on a file in incremental auto-vacuum mode (a VACUUM sets it).
    ``begin``: the store's transaction. Returns the pages given back."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        return 0
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    for _ in range(max_steps):
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if not free:
            break
        with begin() as tx:
            # Each step of the statement gives back one page, and Python's sqlite3 steps a statement
            # that returns no rows once: PRAGMA incremental_vacuum(256) would give back one page.
            for _ in range(min(free, _PAGES_PER_STEP)):
                tx.execute("PRAGMA incremental_vacuum")
    return int(pages - conn.execute("PRAGMA page_count").fetchone()[0])


# ─── what the daemon, forget and prune call ──────────────────────────────────────────────────


def finish(store: Store, budget_s: float | None = None) -> Erased | None:
    """Finish the erasures made since the last call (desto's deletes, noted by the schema's
    triggers, also while no daemon ran), then scrub, for ``budget_s`` seconds of a scrub of
    every page (None: to the end). None when there was nothing to do."""
    conn = store.conn
    pending = conn.execute("SELECT EXISTS (SELECT 1 FROM archiver_erased WHERE purged_at IS NULL)").fetchone()[0]
    level = scrub_pending(conn)
    if not pending and level is None:
        return None
    out = Erased()
    while pending:
        with store.transaction() as tx:
            step, found = purge_pending(tx, now_us())
        out.merge(step)
        level = found or level
        pending = found is not None
    if level is None:
        return None
    out.scrub = level
    out.scrub_done, out.scrub_s, out.scrub_pages = scrub(store, level, budget_s)
    return out


@dataclass
class Target:
    """A record ``forget`` or ``prune`` erases, with what a person recognizes it by: a name (a
    session's, a favorite's, an at-job's session's) or a job's status, never a command line,
    which may hold the very secret being erased, for a terminal, its scrollback or a journal."""

    kind: Kind
    record_id: str
    label: str
    via: str | None = None  # e.g. "job of session <id>"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "id": self.record_id, "label": self.label, "via": self.via}


_LABELS = {
    Kind.SESSION: "session_name",
    Kind.JOB: "status",
    Kind.FAVORITE: "coalesce(real_name, name)",
    Kind.ATJOB: "session_name",
}


class UnknownRecord(Exception):
    """An id or name the archive does not know (the message says which)."""


def resolve(conn: sqlite3.Connection, ids: Sequence[str], names: Sequence[str]) -> tuple[list[Target], list[str]]:
    """The records ``forget`` erases for these ids and names (a session brings its jobs), and the
    ones already erased (as text). Raises UnknownRecord for an id or name found nowhere."""
    found: dict[tuple[Kind, str], Target] = {}
    already: list[str] = []
    unknown: list[str] = []
    for ident in ids:
        hits = [
            Target(kind, ident, str(row[0]))
            for kind in Kind
            if (row := conn.execute(
                f"SELECT {_LABELS[kind]} FROM {TABLES[kind]} WHERE {COLUMNS[kind][0]} = ?", (ident,)
            ).fetchone()) is not None
        ]  # fmt: skip
        if not hits:
            quarantined = conn.execute(
                "SELECT kind FROM quarantine WHERE record_id = ? AND kind IS NOT NULL LIMIT 1", (ident,)
            ).fetchone()
            if quarantined is not None:
                hits = [Target(Kind(quarantined[0]), ident, "(quarantined)")]
        if not hits:
            erased = conn.execute("SELECT kind, erased_at, how FROM archiver_erased WHERE record_id = ?", (ident,))
            gone = [f"{k} {ident}: erased at {at} by {describe(k, how)}" for k, at, how in erased]
            if gone:
                already.extend(gone)
            else:
                unknown.append(f"no archived record has the id {ident!r}")
        for target in hits:
            found.setdefault((target.kind, target.record_id), target)
    for name in names:
        sessions = conn.execute("SELECT session_id FROM sessions WHERE session_name = ?", (name,)).fetchall()
        favorites = conn.execute(
            "SELECT favorite_id FROM favorites WHERE coalesce(real_name, name) = ?", (name,)
        ).fetchall()
        if not sessions and not favorites:
            unknown.append(f"no archived session or favorite is named {name!r}")
        for (sid,) in sessions:
            found.setdefault((Kind.SESSION, sid), Target(Kind.SESSION, sid, name))
        for (fid,) in favorites:
            found.setdefault((Kind.FAVORITE, fid), Target(Kind.FAVORITE, fid, name))
    if unknown:
        raise UnknownRecord("; ".join(unknown))
    for target in [t for t in found.values() if t.kind is Kind.SESSION]:
        in_file = dict(conn.execute("SELECT job_id, status FROM jobs WHERE session_id = ?", (target.record_id,)))
        quarantined = {
            r[0] for r in conn.execute("SELECT record_id FROM quarantine WHERE session_id = ?", (target.record_id,))
        }
        for job_id in jobs_of(conn, [target.record_id]):
            label = in_file.get(job_id, "(quarantined)" if job_id in quarantined else "(not archived)")
            via = f"job of session {target.record_id}"
            found.setdefault((Kind.JOB, job_id), Target(Kind.JOB, job_id, label, via))
    return list(found.values()), already


def forget(store: Store, targets: Sequence[Target]) -> Erased:
    """Erase ``targets`` now, in one transaction, then scrub the file."""
    at_us = now_us()
    with store.transaction() as conn:
        note(conn, [(t.kind, t.record_id) for t in targets], "forget", at_us)
        out, level = purge(conn, [(t.kind.value, t.record_id, "forget", _zeroed("forget")) for t in targets], at_us)
    others = finish(store)  # erasures desto made meanwhile, when no daemon runs to finish them
    if others is not None:
        out.merge(others)
        out.scrub, out.scrub_done, out.scrub_s = others.scrub, others.scrub_done, others.scrub_s
        out.scrub_pages = others.scrub_pages
    else:
        out.scrub = level
        out.scrub_done, out.scrub_s, out.scrub_pages = scrub(store, level)
    return out


def expired(conn: sqlite3.Connection, cutoff_us: int, limit: int | None = None) -> list[Target]:
    """Records that left Redis before ``cutoff_us`` (tombstoned; never a live one), oldest first."""
    cutoff = iso_utc(cutoff_us)
    out: list[Target] = []
    for kind in Kind:
        rows = conn.execute(
            f"SELECT {COLUMNS[kind][0]}, {_LABELS[kind]} FROM {TABLES[kind]} WHERE gone_at IS NOT NULL "
            f"AND gone_at < ? ORDER BY gone_at" + ("" if limit is None else f" LIMIT {int(limit)}"),
            (cutoff,),
        )
        out.extend(Target(kind, str(r[0]), str(r[1])) for r in rows)
    return out


@dataclass
class Pruned:
    records: dict[str, int] = field(default_factory=dict)
    history: int = 0
    quarantine: int = 0
    pages_freed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    done: bool = True  # False: more remain (the daemon goes on at its next step)
    scrub_done: bool = True  # False: the scrub goes on (the daemon's next steps, or another process's)

    def add(self, erased: Erased) -> None:
        for kind, n in erased.records.items():
            self.records[kind] = self.records.get(kind, 0) + n
        self.history += erased.history
        self.quarantine += erased.quarantine

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "history": self.history,
            "quarantine": self.quarantine,
            "pages_freed": self.pages_freed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": round(self.seconds, 3),
            "scrub_done": self.scrub_done,
        }


def file_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(conn.execute("PRAGMA page_size").fetchone()[0])


def prune(
    store: Store, cutoff_us: int, batch: int = 500, max_batches: int | None = None, scrub_budget_s: float | None = None
) -> Pruned:
    """Erase what left Redis before ``cutoff_us``, ``batch`` records per transaction (desto's
    writes wait for one of them at most), scrub (``scrub_budget_s`` of a scrub of every page;
    None: to the end), then give the space back in small steps."""
    started = time.perf_counter()
    out = Pruned(bytes_before=file_bytes(store.conn))
    batches = 0
    while True:
        if max_batches is not None and batches >= max_batches:
            out.done = False
            break
        at_us = now_us()
        with store.transaction() as conn:
            targets = expired(conn, cutoff_us, batch)[:batch]
            if not targets:
                break
            note(conn, [(t.kind, t.record_id) for t in targets], "retention", at_us)
            pending = [(t.kind.value, t.record_id, "retention", _zeroed("retention")) for t in targets]
            erased, _ = purge(conn, pending, at_us)
        out.add(erased)
        batches += 1
    if out.records:
        out.scrub_done = scrub(store, scrub_pending(store.conn) or "truncate", scrub_budget_s)[0]
        if out.scrub_done:
            out.pages_freed = give_back_space(store.conn, store.transaction)
            if out.pages_freed:
                scrub(store, "truncate")  # the WAL held the pages given back
    out.bytes_after = file_bytes(store.conn)
    out.seconds = time.perf_counter() - started
    return out
