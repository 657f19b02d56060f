"""Everything that talks to SQLite: open and migrate the file, apply a batch in one transaction.

One writer connection in autocommit mode; every write is an explicit ``BEGIN IMMEDIATE``
transaction (a deferred one that upgrades to a write gets SQLITE_BUSY at once, whatever the
busy timeout says). Foreign keys stay off on this connection: a job is often read before its
session, and desto's readers do not need them enforced.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from archiver.archive.quarantine import Limits, Pending, Put, Quarantine
from archiver.archive.schema import NewerSchemaError, migrate, unsupported_sqlite
from archiver.archive.scrub import PageScrub
from archiver.archive.sql import begin_immediate, erased_among, sessions_taking_jobs
from archiver.archive.writer import RowWriter, add_history
from archiver.keys import GONE_EVENTS
from archiver.kinds import RECORD_TABLES, TABLES, Kind
from archiver.models import COLUMNS, Gone, Outcome, Rejected, Row, TimedHint, encode_resp, iso_utc


class StoreError(Exception):
    """The file cannot be used; the message says what to do."""


DAMAGED_ADVICE = (
    "the archive's file is damaged: stop the daemon, then restore a backup or recover the file (docs/operations.md, "
    "'A damaged file'); a backfill brings back what Redis still holds"
)


def _primary_code(exc: BaseException) -> int:
    """SQLite's result code of an error (its extended code stripped to the primary), else 0."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def is_damaged(exc: BaseException) -> bool:
    """SQLite says the file is not a sound database: corrupt pages, or not SQLite at all."""
    return _primary_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def store_advice(exc: BaseException) -> str | None:
    """What to do about a write the file as a whole refused, for people (None: nothing but wait)."""
    if is_damaged(exc):
        return DAMAGED_ADVICE
    code = _primary_code(exc)
    if code == sqlite3.SQLITE_FULL:
        return "the archive's disk is full: free space there (the archiver retries)"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
        return "give the archiver's user write access to the file, its -wal and -shm, and its folder"
    return None


class AlreadyRunning(StoreError):
    pass


class UnsupportedSQLite(StoreError):
    """The SQLite library cannot run the archiver: nothing to retry, a set-up to change."""


@dataclass
class Batch:
    outcomes: Sequence[Outcome]
    gone_events: Mapping[bytes, bytes] = field(default_factory=dict)  # key -> del/expired/evicted
    hints: Mapping[tuple[Kind, str], Sequence[TimedHint]] = field(default_factory=dict)
    state: Mapping[str, str] = field(default_factory=dict)
    dry_run: bool = False  # work out the result, then roll back


@dataclass
class BatchResult:
    records: Counter[str] = field(default_factory=Counter)  # live records read, by kind
    written: Counter[str] = field(default_factory=Counter)  # rows inserted or changed, by kind
    unchanged: int = 0
    stale: int = 0  # a newer read had already landed
    tombstoned: int = 0
    quarantined: list[Rejected] = field(default_factory=list)  # newly quarantined by this batch
    quarantined_before: int = 0  # ... and by the batches merged in (counted: their payloads may be big)
    quarantine_repeats: int = 0
    quarantine_not_kept: int = 0  # rejected records not kept: the quarantine is full (each key counted once)
    quarantine_full: bool = False  # the quarantine's total cap began to bite with this batch
    history: int = 0
    erased: int = 0  # records not written: erased (desto's History tab, forget, retention)
    # records this batch inserted, changed or tombstoned (kind, id); kept by the batch's own merges
    # only, like ``quarantined``: the daemon's totals need no list of every record ever written
    changed: list[tuple[Kind, str]] = field(default_factory=list)

    @property
    def new_quarantined(self) -> int:
        return self.quarantined_before + len(self.quarantined)

    def merge(self, other: BatchResult, keep_quarantined: bool = False) -> None:
        """Add ``other``'s counts (totals keep counts, not the quarantined payloads, unless asked)."""
        self.records.update(other.records)
        self.written.update(other.written)
        self.unchanged += other.unchanged
        self.stale += other.stale
        self.tombstoned += other.tombstoned
        if keep_quarantined:
            self.quarantined.extend(other.quarantined)
            self.quarantined_before += other.quarantined_before
            self.changed.extend(other.changed)
        else:
            self.quarantined_before += other.new_quarantined
        self.quarantine_repeats += other.quarantine_repeats
        self.quarantine_not_kept += other.quarantine_not_kept
        self.quarantine_full = self.quarantine_full or other.quarantine_full
        self.history += other.history
        self.erased += other.erased


# desto's own default data folder (``desto_data/`` beside where it runs), which desto creates itself
# when it is missing: the one folder the archiver creates too.
DESTO_DEFAULT_FOLDER = "desto_data"


def archive_path_refused(path: Path) -> str | None:
    """Why ``path`` cannot be the archive, for a command that may create it; None when it can.

    A mistyped path must not become a new, empty archive in folders nobody looks at: a missing
    folder is refused, except desto's default ``desto_data`` in a folder that exists."""
    try:
        return _path_refused(path)
    except OSError:  # a folder on the way may not be looked into: opening the file says so
        return None


def _path_refused(path: Path) -> str | None:
    if path.is_dir():
        return f"{path.absolute()} is a folder: give the archive's file in it, e.g. {path.absolute() / 'desto.db'}"
    if path.exists():
        return None
    folder = path.absolute().parent
    if folder.is_dir():
        return None
    if folder.exists():
        return f"{folder} is not a folder: give the archive's path with --db PATH (or SQLITE_DB_PATH)"
    if folder.name == DESTO_DEFAULT_FOLDER and folder.parent.is_dir():
        return None
    return (
        f"the folder {folder} does not exist: create it first (mkdir -p {folder}), or correct --db "
        "(SQLITE_DB_PATH) if it is mistyped; only desto's default folder desto_data/ is created"
    )


class DaemonLock:
    """One daemon per file: an flock on ``<file>.archiver-lock``, released by the kernel on exit.

    The lock file stays after a daemon's run (removing it at a stop would race a starting daemon
    that has it open), except when this daemon created it and then could not use the archive: a
    failed start leaves nothing behind. A lock taken on a file removed meanwhile is taken again.

    The archive's folder may be shared with desto's group (2770), whose members may put anything at
    the lock's path: it is never opened through a symbolic link, and written only when it is a
    regular file of this user's with no other name (a hard link to the archive would be truncated)."""

    _OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, db_path: Path) -> None:
        self.path = db_path.with_name(db_path.name + ".archiver-lock")
        self._fd: int | None = None
        self.created = False  # this daemon created the lock file

    def acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(self.path, self._OPEN | os.O_CREAT | os.O_EXCL, 0o666)
                    created = True
                except FileExistsError:
                    try:
                        fd = os.open(self.path, self._OPEN)
                    except FileNotFoundError:
                        continue  # removed between the two opens (a failed start): create it again
                    created = False
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise StoreError(self._refused("is a symbolic link")) from None
                raise StoreError(
                    f"cannot create {self.path}: {exc.strerror}; the archive's folder must be writable"
                ) from None
            problem = _not_own_file(os.fstat(fd))
            if problem is not None:
                os.close(fd)
                raise StoreError(self._refused(problem))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise AlreadyRunning(
                    f"another desto-archiver is already running on {self.path.with_suffix('')} ({holder}); "
                    "stop it first, or point this one at another file with SQLITE_DB_PATH"
                ) from None
            try:
                st = os.lstat(self.path)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break
            os.close(fd)  # a failed start removed the file after this one opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd, self.created = fd, created

    def _refused(self, problem: str) -> str:
        return (
            f"{self.path} {problem}: the daemon writes its lock only into a file of its own, and leaves this one "
            "alone. Whoever may write the archive's folder could have put it there: look at it, remove it, and "
            "start again (it holds nothing but the lock)"
        )

    def release(self, failed_start: bool = False) -> None:
        """Let the lock go; after ``failed_start``, also remove the lock file this daemon created
        (while still holding the lock, so no other daemon holds it)."""
        if self._fd is not None:
            if failed_start and self.created:
                with suppress(FileNotFoundError):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database from a connection of its own, a PASSIVE checkpoint
    a second after commits (those of that second go together): it never blocks the writer, so
    commits rarely carry a checkpoint's writes and fsyncs. Commits that come alone, seconds apart
    (an idle daemon's heartbeats), wait up to LONE_S for one checkpoint together; with nothing
    committed it sleeps. (Starting the WAL over is the writer's: see Store.restart_wal_if_big.)"""

    LONE_S = 30.0

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        super().__init__(name="archiver-checkpointer", daemon=True)
        self._conn = sqlite3.connect(path, timeout=1, isolation_level=None, check_same_thread=False)
        self._interval = interval
        self._stop_event = threading.Event()
        self._wrote = threading.Event()  # a commit since the thread last looked
        self._wrote.set()
        self._busy = threading.Event()  # commits less than the interval apart
        self._last_commit = -math.inf  # monotonic
        self.paused = False  # while a scrub follows the WAL (scrub.py): it starts the WAL over itself

    def wrote(self) -> None:
        """The writer committed (called from its thread)."""
        now = time.monotonic()
        gap, self._last_commit = now - self._last_commit, now
        self._wrote.set()
        if gap < self._interval:
            self._busy.set()

    def run(self) -> None:
        while True:
            self._wrote.wait()
            if self._settle():
                return
            if not self.paused:  # a paused checkpoint waits for the next commit after the scrub
                self.checkpoint()

    def _settle(self) -> bool:
        """Wait before a checkpoint, as the class says; True when a stop is asked."""
        self._wrote.clear()
        self._busy.clear()
        if self._stop_event.wait(self._interval):
            return True
        if not self._busy.is_set():  # lone commits: asleep until they come close together
            self._busy.wait(self.LONE_S - self._interval)
        return self._stop_event.is_set()

    def checkpoint(self) -> None:
        with suppress(sqlite3.Error):  # busy or full now: the next round copies what is left
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def stop(self) -> None:
        self._stop_event.set()
        self._wrote.set()
        self._busy.set()
        self.join(timeout=5)
        self.checkpoint()
        with suppress(sqlite3.Error):
            self._conn.close()


def _not_own_file(st: os.stat_result) -> str | None:
    """Why a lock file opened is not one the daemon may write (None: it may)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_nlink != 1:
        return f"has other names (hard links: {st.st_nlink})"
    return None


def _trim_heap() -> None:
    """glibc's malloc_trim(0): freed heap returned to the system (elsewhere: nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Store:
    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        schema_found: int,
        busy_timeout: float = 5.0,
        quarantine: Limits | None = None,
    ) -> None:
        self.conn = conn
        self.path = path
        # The file, its WAL and its shared memory as opened: SQLite holds them by descriptor, so a
        # file removed or moved away under it goes on taking writes nobody will read.
        self._opened = {suffix: _identity(Path(f"{path}{suffix}")) for suffix in ("", "-wal", "-shm")}
        self.schema_found = schema_found
        self.checkpointer: Checkpointer | None = None
        # Called after each commit of this connection and when another program's commit is seen:
        # the change log may have grown (the daemon's shipper ships at once, not at its next look).
        self.logged: Callable[[], None] | None = None
        self.busy_timeout = busy_timeout  # seconds a write waits for another writer's lock
        self._wal = Path(f"{path}-wal")
        self._data_version = -1
        self._next_wal_restart = 0.0  # monotonic time of the next try at starting the WAL over
        self._unresolved: set[bytes] = {
            bytes(row[0]) for row in conn.execute("SELECT DISTINCT key FROM quarantine WHERE resolved_at IS NULL")
        }
        self.page_scrub: PageScrub | None = None  # a scrub of the file under way (erase.py)
        self.quarantine = Quarantine(quarantine or Limits())

    @classmethod
    def open(
        cls,
        path: Path,
        busy_timeout: float = 5.0,
        *,
        cache_mb: int = 8,
        build_deferred: bool = True,
        quarantine: Limits | None = None,
    ) -> Store:
        """Open (creating or migrating) the archive; StoreError with a clear message when it cannot.
        ``cache_mb``: SQLite's page cache. ``build_deferred``: build the indexes a killed bulk load
        left out (a dry run must not). ``quarantine``: its caps (the defaults when None)."""
        unsupported = unsupported_sqlite()
        if unsupported is not None:
            raise UnsupportedSQLite(unsupported)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder {path.parent}: {exc.strerror}") from None
        try:
            # SQLite creates a new file 0644 whatever the umask allows; created here, its mode is
            # 0666 less the umask (0660 under UMask=0007: desto's group may write, others nothing).
            # SQLite gives the -wal and -shm files the database's mode. A new inode: no process
            # holds SQLite locks on it that closing this descriptor could drop.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror}; check the folder's permissions") from None
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}; check the path and its permissions") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (got {mode}); is it on a network filesystem?")
            conn.execute("PRAGMA synchronous=NORMAL")
            # A batch dirties pages all over desto's random-keyed indexes; copying them back from
            # the WAL (with its fsyncs) is the checkpointer thread's work, not the commit's.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
            conn.execute("PRAGMA foreign_keys=OFF")
            # What the archiver deletes or rewrites is overwritten, not left in free space (erase.py),
            # from the migrations on.
            conn.execute("PRAGMA secure_delete=ON")
            found, _ = migrate(conn)
        except NewerSchemaError as exc:
            conn.close()
            raise StoreError(f"{path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"cannot use {path}: {exc}; is it a SQLite file, and writable?") from None
        store = cls(conn, path, found, busy_timeout, quarantine)
        # A bulk load that never finished (killed) left its indexes out. When the file is busy,
        # the bulk load's own end, or the next open, builds them.
        if build_deferred:
            with suppress(sqlite3.OperationalError):
                store.restore_indexes()
        store.checkpointer = Checkpointer(path)
        store.checkpointer.start()
        return store

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.page_scrub is not None:
            self.page_scrub.close()
            self.page_scrub = None
        with suppress(sqlite3.Error):
            self.conn.close()

    def file_lost(self) -> str | None:
        """Why the path no longer names the file this store writes (``removed``, or ``replaced``
        by another file, e.g. moved away or a restore moved over it), or None while it does. The
        same test as SQLite's own: the path's inode against the one opened."""
        if self._opened[""] is None:
            return None  # never known (the file could not be looked at when opened)
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return "removed"
        except OSError:
            return None  # cannot tell right now: the next look decides
        if (found.st_dev, found.st_ino) != self._opened[""]:
            return "replaced"
        return None

    def release_lost_file(self) -> list[str]:
        """Once :meth:`file_lost`: remove the WAL and shared-memory files of the lost file that
        are still at the path (only those this store opened, by inode), then close. SQLite pairs
        them with a database by name: left there, they would be read as the log of whatever file
        the path names next, and a restore moved into place would be overwritten by the lost
        file's pages. Returns the names removed."""
        removed = []
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            opened = self._opened[suffix]
            if opened is not None and _identity(side) == opened:
                with suppress(FileNotFoundError):
                    side.unlink()
                    removed.append(side.name)
        self.close()
        return removed

    @contextmanager
    def _without_busy_wait(self) -> Iterator[sqlite3.Connection]:
        """The writer's connection with SQLite's busy handler off, for as long as the block runs."""
        conn = self.conn
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            yield conn
        finally:
            conn.execute(f"PRAGMA busy_timeout = {round(self.busy_timeout * 1000)}")

    def _begin(self) -> None:
        """BEGIN IMMEDIATE on the writer's connection, polling for the lock (sql.begin_immediate)
        with SQLite's own busy handler off meanwhile."""
        with self._without_busy_wait() as conn:
            begin_immediate(conn, self.busy_timeout)

    def transaction(self, commit: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), for the commands that change the file."""
        return self._transaction(commit)

    @contextmanager
    def _transaction(self, commit: bool = True) -> Iterator[sqlite3.Connection]:
        self._begin()
        try:
            yield self.conn
            self.conn.execute("COMMIT" if commit else "ROLLBACK")
            if commit and self.checkpointer is not None:
                self.checkpointer.wrote()
            if commit and self.logged is not None:
                self.logged()
        except BaseException:
            with suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise

    # ─── the archiver's own state ──────────────────────────────────────────────────────────

    def set_state(self, values: Mapping[str, str], now_us: int) -> None:
        with self._transaction() as conn:
            self._put_state(conn, values, now_us)

    @staticmethod
    def _put_state(conn: sqlite3.Connection, values: Mapping[str, str], now_us: int) -> None:
        conn.executemany(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(name, value, iso_utc(now_us)) for name, value in values.items()],
        )

    def get_state(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT name, value FROM archiver_state").fetchall())

    _NEWEST = "newest_read_us"

    def newest_version(self) -> int | None:
        """The newest read version in the file (None: no read yet), for the reader's clock
        (read_clock.ReadClock). Every write keeps it in archiver_state; for a file an older
        desto-archiver wrote (or a note that is not a number), the rows are looked through."""
        row = self.conn.execute("SELECT value FROM archiver_state WHERE name = ?", (self._NEWEST,)).fetchone()
        if row is not None and str(row[0]).isdigit():
            return int(row[0])
        found = [self.conn.execute(f"SELECT max(read_at_us) FROM {table}").fetchone()[0] for table in RECORD_TABLES]
        return max((int(v) for v in found if v is not None), default=None)

    def _note_newest(self, conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> None:
        newest = max((o.version_us for o in outcomes if not isinstance(o, Rejected)), default=None)
        if newest is None:
            return
        conn.execute(
            "INSERT INTO archiver_state (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE "
            "SET value = excluded.value, updated_at = excluded.updated_at "
            "WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
            (self._NEWEST, str(newest), iso_utc(time.time_ns() // 1000)),
        )

    # ─── bulk loads: secondary indexes built once, at the end ──────────────────────────────────

    _DEFERRED = "deferred_indexes"
    _BULK_TABLES = (*RECORD_TABLES, "status_history")

    def is_empty(self) -> bool:
        """No record and no history yet: a first backfill, which may defer the indexes."""
        return not any(self.conn.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0] for t in self._BULK_TABLES)

    def defer_indexes(self) -> int:
        """Drop the secondary indexes of the record and history tables (the unique ones stay:
        they enforce desto's constraints) and note their definitions in the file, in one
        transaction. With desto's random ids each index costs a random page write per row;
        built at the end, an index is one sort. Returns how many were deferred."""
        with self._transaction() as conn:
            marks = ", ".join("?" * len(self._BULK_TABLES))
            found = conn.execute(
                f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                f"AND tbl_name IN ({marks}) AND sql NOT LIKE 'CREATE UNIQUE%' ORDER BY name",
                self._BULK_TABLES,
            ).fetchall()
            if not found:
                return 0
            self._put_state(conn, {self._DEFERRED: json.dumps(found)}, time.time_ns() // 1000)
            for name, _ in found:
                conn.execute('DROP INDEX "{}"'.format(name.replace('"', '""')))
        return len(found)

    def restore_indexes(self) -> int:
        """Build the indexes :meth:`defer_indexes` dropped (those nobody built meanwhile:
        desto's own store recreates its own when it opens the file). Returns how many."""
        row = self.conn.execute("SELECT value FROM archiver_state WHERE name = ?", (self._DEFERRED,)).fetchone()
        if row is None:
            return 0
        built = 0
        with self._transaction() as conn:
            for name, sql in json.loads(row[0]):
                if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)).fetchone():
                    continue
                conn.execute(sql)
                built += 1
            conn.execute("DELETE FROM archiver_state WHERE name = ?", (self._DEFERRED,))
        return built

    # ─── writes by other programs (desto's own store) ────────────────────────────────────────

    def give_back_memory(self) -> None:
        """Free SQLite's page cache (it fills again as pages are read) and hand the heap the
        allocator keeps back to the system: what a burst of work took, once it is over."""
        with suppress(sqlite3.Error):
            self.conn.execute("PRAGMA shrink_memory")
        _trim_heap()

    def foreign_commits(self) -> bool:
        """Whether another connection committed to the file since the last call (cheap)."""
        version = int(self.conn.execute("PRAGMA data_version").fetchone()[0])
        changed = version != self._data_version
        self._data_version = version
        if changed and self.logged is not None:
            self.logged()
        return changed

    def take_rechecks(self, limit: int) -> list[tuple[Kind, str]]:
        """Records another program wrote (the schema's triggers noted them): to re-read from Redis,
        so the archive holds Redis' state, not a stale copy desto's own store saved."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT kind, record_id FROM archiver_recheck LIMIT ?", (limit,)).fetchall()
            conn.executemany("DELETE FROM archiver_recheck WHERE kind = ? AND record_id = ?", rows)
        return [(Kind(kind), record_id) for kind, record_id in rows]

    # ─── reconciliation support ────────────────────────────────────────────────────────────

    def live_not_read_since(self, kind: Kind, since_us: int, after_rowid: int, limit: int) -> list[tuple[int, str]]:
        """Live rows (no tombstone) whose last read is older than ``since_us``, by rowid."""
        table = TABLES[kind]
        rows = self.conn.execute(
            f"SELECT rowid, {COLUMNS[kind][0]} FROM {table} WHERE gone_at IS NULL "
            "AND (read_at_us IS NULL OR read_at_us < ?) AND rowid > ? ORDER BY rowid LIMIT ?",
            (since_us, after_rowid, limit),
        ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    # ─── one batch, one transaction ────────────────────────────────────────────────────────

    def apply(self, batch: Batch) -> BatchResult:
        """Apply a batch in one transaction. A record the file itself refuses (a constraint or
        trigger someone added, say) is quarantined alone and never blocks the rest; errors of
        the file as a whole (locked, full, read-only) propagate, for the caller to retry."""
        try:
            return self._apply(batch)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            if len(batch.outcomes) <= 1 or is_damaged(exc):  # the file's fault, not a record's
                raise
        result = BatchResult()
        for outcome in batch.outcomes:
            single = Batch([outcome], batch.gone_events, batch.hints, batch.state, batch.dry_run)
            try:
                result.merge(self._apply(single), keep_quarantined=True)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                if not isinstance(outcome, Row) or is_damaged(exc):
                    raise
                refused = Batch([_refused(outcome, exc)], dry_run=batch.dry_run)
                result.merge(self._apply(refused), keep_quarantined=True)
        return result

    def _apply(self, batch: Batch) -> BatchResult:
        result = BatchResult()
        resolved: set[bytes] = set()
        pending = Pending()
        rows: dict[Kind, list[Row]] = {}
        for outcome in batch.outcomes:
            if isinstance(outcome, Row):
                rows.setdefault(outcome.kind, []).append(outcome)
        with self._transaction(commit=not batch.dry_run) as conn:
            for kind, kind_rows in rows.items():
                RowWriter(conn, kind, batch.hints, result).write(kind_rows)
                resolved.update(r.key for r in kind_rows if r.key in self._unresolved)
            rejected = [o for o in batch.outcomes if isinstance(o, Rejected) and o.kind is not None]
            refused = self._erased_rejections(conn, rejected) if rejected else set()
            result.erased += len(refused)
            for outcome in batch.outcomes:
                if isinstance(outcome, Gone):
                    if outcome.kind is not None:
                        self._tombstone(conn, outcome, batch.gone_events.get(outcome.key), result)
                    if outcome.key in self._unresolved:
                        resolved.add(outcome.key)
                elif isinstance(outcome, Rejected) and id(outcome) not in refused:
                    self._quarantine(conn, outcome, pending, result)
            if pending.refused or pending.stored_new:
                self.quarantine.note(conn, pending, max(o.read_at_us for o in batch.outcomes))
            if resolved:
                now = iso_utc(max(o.read_at_us for o in batch.outcomes))
                conn.executemany(
                    "UPDATE quarantine SET resolved_at = ? WHERE key = ? AND resolved_at IS NULL",
                    [(now, key) for key in resolved],
                )
            if batch.state:
                self._put_state(conn, batch.state, max((o.read_at_us for o in batch.outcomes), default=0))
            self._note_newest(conn, batch.outcomes)
        result.quarantine_not_kept = len(pending.counted)
        if not batch.dry_run:
            result.quarantine_full = self.quarantine.committed(pending)
            self._unresolved.difference_update(resolved)
            self._unresolved.update(r.key for r in result.quarantined)
            self.restart_wal_if_big()
        return result

    # Each restart is a full checkpoint on the writer's path: the limit is high enough that a
    # stream of new records rarely pays for one (see the performance notes in docs/).
    MAX_WAL_BYTES = 256 * 1024 * 1024
    # After a try a reader prevented, the next one waits this long: each try copies pages first.
    WAL_RESTART_RETRY_S = 1.0

    def restart_wal_if_big(self) -> None:
        """A writer that never pauses keeps the WAL from starting over (a checkpoint from another
        connection never finds a moment without it): past MAX_WAL_BYTES, checkpoint from here,
        between two transactions, and truncate. The checkpointer thread has copied most pages
        already. The writer never waits for this: a reader on an old snapshot (desto's tab, an
        export, a backup) or another writer makes it give up at once and try again later."""
        if time.monotonic() < self._next_wal_restart:
            return
        try:
            big = self._wal.stat().st_size > self.MAX_WAL_BYTES
        except OSError:
            return
        if not big:
            return
        with self._without_busy_wait() as conn:
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.Error:
                busy = 1
        if busy:
            self._next_wal_restart = time.monotonic() + self.WAL_RESTART_RETRY_S

    @staticmethod
    def _erased_rejections(conn: sqlite3.Connection, rejected: list[Rejected]) -> set[int]:
        """The rejections (by id()) of erased records, and of jobs of sessions erased in a way that
        takes their jobs: their raw payload must not land in quarantine."""
        refused: set[int] = set()
        for kind in {r.kind for r in rejected}:
            assert kind is not None
            of_kind = [r for r in rejected if r.kind is kind and r.record_id]
            erased = erased_among(conn, kind, [str(r.record_id) for r in of_kind])
            refused.update(id(r) for r in of_kind if r.record_id in erased)
        of_sessions = [r for r in rejected if r.session_id is not None]
        sessions = sessions_taking_jobs(conn, [str(r.session_id) for r in of_sessions])
        refused.update(id(r) for r in of_sessions if r.session_id in sessions)
        return refused

    def _tombstone(self, conn: sqlite3.Connection, gone: Gone, event: bytes | None, result: BatchResult) -> None:
        assert gone.kind is not None
        table, id_col = TABLES[gone.kind], COLUMNS[gone.kind][0]
        status_col = "coalesce(observed_status, status)" if "status" in COLUMNS[gone.kind] else "NULL"
        found = conn.execute(
            f"SELECT read_at_us, gone_at, expires_at, {status_col} FROM {table} WHERE {id_col} = ?",
            (gone.record_id,),
        ).fetchone()
        if found is None or found[1] is not None:
            return  # never archived (nothing to keep), or already tombstoned
        read_at_us, _, expires_at, status = found
        if read_at_us is not None and gone.version_us < read_at_us:
            result.stale += 1
            return
        seen_at = iso_utc(gone.read_at_us)
        reason = GONE_EVENTS.get(event or b"")
        gone_at = seen_at
        if reason is None:
            if expires_at is not None and expires_at <= seen_at:
                reason, gone_at = "expired", expires_at  # the TTL we read says exactly when
            else:
                reason = "missing"
        elif reason == "expired" and expires_at is not None and expires_at <= seen_at:
            gone_at = expires_at
        conn.execute(
            f"UPDATE {table} SET gone_at = ?, gone_reason = ?, read_at_us = ? WHERE {id_col} = ?",
            (gone_at, reason, gone.version_us, gone.record_id),
        )
        add_history(conn, gone.kind, gone.record_id, reason, status, status, None, gone_at, None, "redis")
        result.tombstoned += 1
        result.changed.append((gone.kind, gone.record_id))
        result.history += 1

    def _quarantine(self, conn: sqlite3.Connection, rejected: Rejected, pending: Pending, result: BatchResult) -> None:
        put = self.quarantine.put(conn, rejected, pending)
        if put is Put.NEW:
            result.quarantined.append(rejected)
        elif put is Put.REPEAT:
            result.quarantine_repeats += 1
        elif put is Put.STALE:
            result.stale += 1


def _refused(row: Row, exc: Exception) -> Rejected:
    fields = [part for pair in zip(COLUMNS[row.kind], row.values, strict=True) for part in pair]
    return Rejected(
        key=row.key,
        kind=row.kind,
        record_id=row.record_id,
        redis_type="hash",
        payload=encode_resp([str(v) if v is not None else None for v in fields]),
        reason=f"the archive refused the normalized row: {exc}",
        read_at_us=row.read_at_us,
        session_id=(str(row.values[1] or "") or None) if row.kind is Kind.JOB else None,
        version_us=row.version_us,
    )
