"""The quarantine stays bounded whatever Redis holds: one row per key, big values kept as a digest,
a length and a prefix, and a total size past which new keys are counted, not stored."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import urllib.request
from pathlib import Path
from unittest.mock import ANY

from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from archiver.archive import changelog, erase, schema
from archiver.archive.quarantine import PREFIX_BYTES, Limits, not_kept, used_bytes
from archiver.archive.reader import Filters, Reader
from archiver.archive.store import Batch, Store
from archiver.central.ship import Shipper
from archiver.config import load_settings
from archiver.keys import classify
from archiver.models import Fetched, Outcome, decode_resp, encode_resp, iso_utc, normalize
from tests.archive.test_erase import MARKER, desto_store, grep_count
from tests.archive.test_store import T0
from tests.commands.test_commands import cli
from tests.helpers import count, daemon_thread, job_hash, query, session_hash, settings_for, wait_for
from tests.pg_helpers import central_differences, pg_rows
from tests.redis_server import free_port

KIB = 1024


def settled_size(db_path: Path) -> int:
    """The file's size once its WAL is copied back and emptied (nothing else may be writing it)."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    return db_path.stat().st_size


def test_a_big_bad_job_changed_a_hundred_times_keeps_one_row_and_the_file_grows_by_at_most_the_cap(
    redis_server, redis, db_path: Path
) -> None:
    """A job whose exit code desto cannot read, 300 KB of it, changed 100 times: one quarantine row
    (the newest value, counted), and the file grows by no more than the per-record cap."""
    job = job_hash(exit_code="bad-0-" + "x" * 300_000)
    key = f"desto:job:{job['job_id']}"
    settings = settings_for(redis_server, db_path)
    with daemon_thread(settings):
        redis.hset(key, mapping=job)
        wait_for(lambda: count(db_path, "quarantine", "reason LIKE ?", ("%'bad-0-%",)), what="quarantined")
    before = settled_size(db_path)
    with daemon_thread(settings):
        for i in range(1, 101):
            redis.hset(key, "exit_code", f"bad-{i}-" + "x" * 300_000)
            wait_for(
                lambda i=i: count(db_path, "quarantine", "reason LIKE ?", (f"%'bad-{i}-%",)),
                what=f"change {i} quarantined",
            )
    grown = settled_size(db_path) - before
    rows = query(db_path, "SELECT * FROM quarantine")
    assert len(rows) == 1, f"{len(rows)} quarantine rows for one key"
    assert "'bad-100-" in rows[0]["reason"]
    assert grown <= 64 * KIB, f"the file grew by {grown:,} bytes"


# ─── one row per key, and the per-record cap ─────────────────────────────────────────────────────


def rejected(key: bytes, value: bytes, at: int, version: int | None = None) -> Outcome:
    """A read of a string under a record key (desto writes hashes): always rejected."""
    parsed = classify(key)
    assert parsed is not None
    return normalize(parsed, Fetched(key, "string", value, -1, at, at if version is None else version))


def test_a_key_keeps_one_row_through_its_changes_and_an_older_read_never_replaces_a_newer(db_path: Path) -> None:
    key = b"desto:session:changing"
    store = Store.open(db_path)
    try:
        first = store.apply(Batch([rejected(key, b"v1", T0)]))
        store.apply(Batch([rejected(key, b"v1", T0 + 1)]))
        again = store.apply(Batch([rejected(key, b"v2", T0 + 2)]))
        late = store.apply(Batch([rejected(key, b"v0", T0 + 3, version=T0 - 5)]))  # read before the others
    finally:
        store.close()
    assert len(first.quarantined) == 1 and not again.quarantined and again.quarantine_repeats == 1
    assert late.stale == 1
    [q] = query(db_path, "SELECT * FROM quarantine")
    assert decode_resp(q["payload"]) == b"v2" and q["payload_sha256"] == hashlib.sha256(encode_resp(b"v2")).hexdigest()
    assert (q["times_seen"], q["changes_seen"], q["truncated"]) == (3, 1, 0)
    assert (q["first_seen_at"], q["last_seen_at"]) == (iso_utc(T0), iso_utc(T0 + 2))


def test_a_value_above_the_per_record_cap_keeps_its_digest_its_length_and_its_first_bytes(db_path: Path) -> None:
    big, small = b"desto:session:big", b"desto:session:small"
    value = bytes(range(256)) * 400  # 100 KiB
    store = Store.open(db_path, quarantine=Limits(record_bytes=64 * KIB))
    try:
        store.apply(Batch([rejected(big, value, T0), rejected(small, value[: 60 * KIB], T0)]))
    finally:
        store.close()
    rows = {bytes(r["key"]): r for r in query(db_path, "SELECT * FROM quarantine")}
    whole = encode_resp(value)
    assert rows[big]["truncated"] == 1 and rows[big]["payload_length"] == len(whole)
    assert rows[big]["payload"] == whole[:PREFIX_BYTES]
    assert rows[big]["payload_sha256"] == hashlib.sha256(whole).hexdigest()
    assert rows[small]["truncated"] == 0 and decode_resp(rows[small]["payload"]) == value[: 60 * KIB]
    # what people read of it says so
    with Reader.open(db_path) as reader:
        assert reader.stats()["quarantine"]["truncated"] == 1
        _, exported = reader.export("quarantine", Filters())
        by_key = {r["key_text"]: r for r in exported}
    assert by_key["desto:session:big"]["truncated"] == 1
    assert by_key["desto:session:big"]["payload_length"] == len(whole)


# ─── the total cap ───────────────────────────────────────────────────────────────────────────────


def test_the_total_cap_bites_once_per_event_counts_each_key_once_and_lets_go_once_there_is_room(
    db_path: Path,
) -> None:
    keys = [f"desto:session:k{i}".encode() for i in range(8)]
    value = b"v" * 900  # a row is its key and about 900 bytes: four fit in 4,096
    store = Store.open(db_path, quarantine=Limits(record_bytes=1024, total_bytes=4096))
    try:
        first = store.apply(Batch([rejected(k, value, T0) for k in keys[:6]]))
        assert (len(first.quarantined), first.quarantine_not_kept, first.quarantine_full) == (4, 2, True)
        # read again (a reconcile), and changed: the two keys kept out are not counted again, nor the cap said again
        again = store.apply(Batch([rejected(k, value + b"!", T0 + 1) for k in keys[:6]]))
        assert (again.quarantine_repeats, again.quarantine_not_kept, again.quarantine_full) == (4, 0, False)
        noted = not_kept(store.conn)
        assert noted is not None and (noted["count"], noted["full"], noted["max_bytes"]) == (2, True, 4096)
        assert noted["first_at"] == iso_utc(T0) and noted["last_at"] == iso_utc(T0 + 1)
        # erasures make room: the next key is stored, and the note says there is room again
        with store.transaction() as conn:
            conn.execute("DELETE FROM quarantine WHERE key IN (?, ?, ?)", tuple(keys[:3]))
        room = store.apply(Batch([rejected(keys[4], value, T0 + 2)]))
        assert len(room.quarantined) == 1 and not room.quarantine_full
        noted = not_kept(store.conn)
        assert noted is not None and (noted["count"], noted["full"]) == (2, False)
        # filling up again is another event, said again; keys counted before stay counted once
        full = store.apply(Batch([rejected(k, value, T0 + 3) for k in keys]))
        # k0 and k1 fit again; k2, k6 and k7 are counted, k5 was already
        assert full.quarantine_full and full.quarantine_not_kept == 3 and len(full.quarantined) == 2
        assert used_bytes(store.conn) <= 4096
    finally:
        store.close()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_past_the_total_cap_new_keys_are_counted_not_stored_and_stats_check_and_a_metric_say_so(
    redis_server, redis, db_path: Path
) -> None:
    cap, port = 3000, free_port()
    settings = settings_for(redis_server, db_path, quarantine_max_bytes=cap, metrics_port=port)
    jobs = [job_hash(f"cap-{i}", exit_code=f"bad-{i}", command="c" * 600) for i in range(8)]  # ~900 bytes each
    with capture_logs() as logs, daemon_thread(settings):
        for job in jobs:
            redis.hset(f"desto:job:{job['job_id']}", mapping=job)

        def seen() -> dict[str, float] | None:
            m = scrape(port)
            done = m["desto_archiver_quarantined_total"] + m["desto_archiver_quarantine_not_kept_total"] == 8
            return m if done else None

        metrics = wait_for(seen, what="every bad job quarantined or counted")
        stored = {r["record_id"] for r in query(db_path, "SELECT record_id FROM quarantine")}
        left_out = [j for j in jobs if j["job_id"] not in stored]
        assert stored and left_out, f"{len(stored)} stored: the cap should let some in and keep some out"
        assert metrics["desto_archiver_quarantine_not_kept_total"] == len(left_out)
        held = query(db_path, "SELECT sum(length(key) + length(payload)) FROM quarantine")[0][0]
        assert held <= cap
        # a key in the quarantine is still updated; one kept out, changed again, is not counted again
        kept_id = sorted(stored)[0]
        redis.hset(f"desto:job:{kept_id}", "exit_code", "worse")
        redis.hset(f"desto:job:{left_out[0]['job_id']}", "exit_code", "worse")
        wait_for(lambda: count(db_path, "quarantine", "record_id = ? AND reason LIKE '%worse%'", (kept_id,)))
        wait_for(lambda: scrape(port)["desto_archiver_quarantine_not_kept_total"] == len(left_out))
        assert count(db_path, "quarantine") == len(stored)
        stats = json.loads(cli(redis_server, db_path, "stats", "--json").stdout)
        checked = cli(redis_server, db_path, "check", "--json", "--settle", "0")
        text = cli(redis_server, db_path, "stats").stdout
    noted = stats["quarantine"]["not_kept"]
    assert noted["count"] == len(left_out) and noted["full"] is True and noted["max_bytes"] == cap
    assert f"{len(left_out):,} rejected records not stored" in text and "the quarantine is full" in text
    report = json.loads(checked.stdout)
    finding = {c["check"]: c for c in report["checks"]}["quarantine"]
    assert finding["status"] == "warn" and f"{len(left_out)} rejected records not stored" in finding["detail"]
    assert "ARCHIVER_QUARANTINE_MAX_BYTES" in finding["hint"]
    assert report["verify"]["not_kept"] == len(left_out) and report["verify"]["missing"] == 0
    assert [e for e in logs if e["event"] == "quarantine.full"] == [
        {
            "event": "quarantine.full",
            "log_level": "warning",
            "max_bytes": cap,
            "not_kept": ANY,
            "detail": ANY,
        }
    ], "the cap is said once, not once per record"


# ─── schema 7: the rows of an older file collapse to one per key ────────────────────────────────


def file_of_version_6(path: Path, shipping: bool = False) -> tuple[dict[str, str], dict[str, str]]:
    """A file as schema 6 left it, with a job quarantined three times (three values, three rows),
    another key once; ``shipping``: with the change log's triggers on. Returns the job and its session."""
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 7):
        schema.MIGRATIONS[version](conn)
    conn.execute("PRAGMA user_version = 6")
    if shipping:
        changelog.set_enabled(conn, True)
    session = session_hash()
    job = job_hash(session_id=session["session_id"], command=f"deploy --token {MARKER}")
    conn.execute(
        "INSERT INTO sessions (session_id, session_name, status, read_at_us) VALUES (?, 'v6', 'finished', 1)",
        (session["session_id"],),
    )
    key = f"desto:job:{job['job_id']}"
    for n, (first, last, times) in enumerate([("T1", "T1", 1), ("T2", "T4", 2), ("T3", "T3", 1)], start=1):
        payload = encode_resp([part.encode() for pair in {**job, "exit_code": f"bad-{n}"}.items() for part in pair])
        conn.execute(
            "INSERT INTO quarantine (key, key_text, kind, record_id, redis_type, payload, payload_sha256, reason, "
            "first_seen_at, last_seen_at, times_seen, session_id) VALUES (?, ?, 'job', ?, 'hash', ?, ?, ?, ?, ?, ?, ?)",
            (
                key.encode(),
                key,
                job["job_id"],
                payload,
                hashlib.sha256(payload).hexdigest(),
                f"exit_code: not an integer: 'bad-{n}'",
                first,
                last,
                times,
                session["session_id"],
            ),
        )
    conn.execute(
        "INSERT INTO quarantine (key, key_text, kind, record_id, redis_type, payload, payload_sha256, reason, "
        "first_seen_at, last_seen_at, resolved_at) VALUES (?, 'desto:status:x', NULL, NULL, "
        "'string', ?, 'y', 'unrecognized key', 'T1', 'T1', 'T2')",
        (b"desto:status:x", encode_resp(b"running")),
    )
    conn.close()
    return job, session


def test_a_file_of_version_6_keeps_the_newest_row_of_each_key_and_its_oldest_first_sighting(tmp_path: Path) -> None:
    db = tmp_path / "desto.db"
    job, session = file_of_version_6(db)
    store = Store.open(db)
    desto = desto_store(db)
    try:
        assert query(db, "PRAGMA user_version")[0][0] == schema.SCHEMA_VERSION
        rows = {r["key_text"]: dict(r) for r in query(db, "SELECT * FROM quarantine")}
        assert set(rows) == {f"desto:job:{job['job_id']}", "desto:status:x"}
        kept = rows[f"desto:job:{job['job_id']}"]
        # the newest by last seen (the second value, seen again at T4), first seen at the oldest sighting
        assert kept["reason"].endswith("'bad-2'") and b"bad-2" in kept["payload"]
        assert (kept["first_seen_at"], kept["last_seen_at"]) == ("T1", "T4")
        assert (kept["times_seen"], kept["changes_seen"], kept["truncated"]) == (4, 2, 0)
        assert kept["payload_length"] == len(kept["payload"]) and kept["session_id"] == session["session_id"]
        other = rows["desto:status:x"]
        assert (other["changes_seen"], other["resolved_at"]) == (0, "T2")
        # one row per key from now on: the key changed again updates the row
        parsed = classify(f"desto:job:{job['job_id']}".encode())
        assert parsed is not None
        flat = [part.encode() for pair in {**job, "exit_code": "bad-9"}.items() for part in pair]
        store.apply(Batch([normalize(parsed, Fetched(parsed.key, "hash", flat, -1, T0, T0))]))
        assert count(db, "quarantine", "record_id = ?", (job["job_id"],)) == 1
        # and erasing its session still takes the quarantined job, and refuses it afterwards
        assert desto.delete_session(session["session_id"])
        erase.finish(store)
        assert count(db, "quarantine") == 1 and count(db, "quarantine", "record_id = ?", (job["job_id"],)) == 0
        again = store.apply(Batch([normalize(parsed, Fetched(parsed.key, "hash", flat, -1, T0 + 1, T0 + 1))]))
        assert again.erased == 1 and count(db, "quarantine", "record_id = ?", (job["job_id"],)) == 0
        assert grep_count(db) + grep_count(Path(f"{db}-wal")) == 0, "the job's secret is still in the file"
    finally:
        desto.close()
        store.close()


def test_the_collapse_of_an_older_file_reaches_postgresql_through_the_change_log(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "desto.db"
    job, _ = file_of_version_6(db, shipping=True)
    settings = load_settings(sqlite_db_path=db, postgres_url=pg_url, source_name="gpu1")
    shipper = Shipper(settings)
    try:
        shipper.open()
        shipper.copy_all()
        assert len(pg_rows(pg_url, "quarantine", "gpu1")) == 4  # as schema 6 kept them
        Store.open(db).close()  # schema 7
        shipper.close_file()
        shipper.open()
        while shipper.ship_batch():
            pass
    finally:
        shipper.close()
    central = pg_rows(pg_url, "quarantine", "gpu1")
    assert len(central) == 2 and central_differences(pg_url, db, "gpu1") == []
    [kept] = [r for r in central if r["record_id"] == job["job_id"]]
    assert (kept["changes_seen"], kept["truncated"], kept["payload_length"]) == (2, 0, len(bytes(kept["payload"])))
