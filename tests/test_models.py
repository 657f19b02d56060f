"""The normalizer: desto's string forms in, rows desto reads back (or a reasoned rejection) out."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archiver.keys import classify, record_key
from archiver.kinds import Kind
from archiver.models import (
    COLUMNS,
    Fetched,
    Gone,
    Rejected,
    Row,
    decode_resp,
    encode_resp,
    iso_utc,
    normalize,
    parse_hint,
    sqlite_utc,
)
from tests.helpers import atjob_hash, favorite_hash, job_hash, session_hash

pytestmark = pytest.mark.unit

READ_AT = 1_795_000_000_000_000  # µs on Redis' clock


def fetched(key: bytes, fields: dict[str, str] | dict[bytes, bytes], pttl: int = -1, rtype: str = "hash") -> Fetched:
    flat: list[bytes] = []
    for name, value in fields.items():
        flat.append(name if isinstance(name, bytes) else name.encode())
        flat.append(value if isinstance(value, bytes) else value.encode())
    return Fetched(key, rtype, flat, pttl, READ_AT, READ_AT)


def run(key: bytes, fields, **kw):
    parsed = classify(key)
    assert parsed is not None
    return normalize(parsed, fetched(key, fields, **kw))


def columns(row: Row) -> dict[str, object]:
    return dict(zip(COLUMNS[row.kind], row.values, strict=True))


def test_session_fields_become_desto_column_forms() -> None:
    record = session_hash(job_ids="a,b", tmux_active="True", end_time="", at_job_id="12")
    row = run(record_key(Kind.SESSION, record["session_id"]), record)
    assert isinstance(row, Row)
    cols = columns(row)
    assert cols["session_id"] == record["session_id"]
    assert cols["start_time"] == record["start_time"]  # kept exactly as desto wrote it
    assert cols["end_time"] is None  # desto's empty time is NULL in its table
    assert cols["job_ids"] == "a,b"
    assert cols["tmux_active"] == 1
    assert cols["at_job_id"] == "12"
    assert row.status == "running"
    assert row.extra is None


@pytest.mark.parametrize(("text", "stored"), [("True", 1), ("False", 0), ("true", 1), ("yes", 0), ("", 0)])
def test_tmux_active_reads_as_desto_reads_it(text: str, stored: int) -> None:
    record = session_hash(tmux_active=text)
    row = run(record_key(Kind.SESSION, record["session_id"]), record)
    assert isinstance(row, Row)
    assert columns(row)["tmux_active"] == stored


def test_job_exit_code_is_an_int_or_null() -> None:
    record = job_hash(exit_code="0", status="finished", end_time="2026-11-26T10:00:00")
    row = run(record_key(Kind.JOB, record["job_id"]), record)
    assert isinstance(row, Row) and columns(row)["exit_code"] == 0
    record = job_hash(exit_code="")
    row = run(record_key(Kind.JOB, record["job_id"]), record)
    assert isinstance(row, Row) and columns(row)["exit_code"] is None


def test_favorite_use_count_is_an_int() -> None:
    record = favorite_hash(use_count="42")
    row = run(record_key(Kind.FAVORITE, record["favorite_id"]), record)
    assert isinstance(row, Row)
    assert columns(row)["use_count"] == 42
    assert row.name == record["name"]


def test_atjob_fields_are_kept_as_text_under_the_at_number() -> None:
    record = atjob_hash("31", scheduled_time="tomorrow 3am")  # at's own text when desto could not parse it
    row = run(record_key(Kind.ATJOB, "31"), record)
    assert isinstance(row, Row)
    cols = columns(row)
    assert cols["at_job_id"] == "31" and cols["job_id"] == "31"
    assert cols["scheduled_time"] == "tomorrow 3am"
    assert json.loads(str(cols["script_path"])) == ["/app/desto_scripts/nightly.sh"]


@pytest.mark.parametrize(
    ("kind", "record", "reason"),
    [
        (Kind.SESSION, session_hash(status="paused"), "unknown status 'paused'"),
        (Kind.JOB, job_hash(status=""), "unknown status ''"),
        (Kind.SESSION, session_hash(start_time="yesterday"), "start_time: not an ISO time"),
        (Kind.JOB, job_hash(exit_code="1.5"), "exit_code: not an integer"),
        (Kind.JOB, job_hash(exit_code=str(2**70)), "out of SQLite's range"),
        (Kind.FAVORITE, favorite_hash(use_count=""), "use_count: not an integer"),
        (Kind.FAVORITE, favorite_hash(last_used_at="2026-13-01T00:00:00"), "last_used_at: not an ISO time"),
    ],
)
def test_values_desto_could_not_read_are_rejected_with_the_reason(kind: Kind, record, reason: str) -> None:
    record_id = next(v for k, v in record.items() if k.endswith("_id") and k[:-3] in kind.value)
    outcome = run(record_key(kind, record_id), record)
    assert isinstance(outcome, Rejected)
    assert reason in outcome.reason
    assert outcome.kind is kind and outcome.record_id == record_id


def test_invalid_utf8_is_rejected_and_the_raw_bytes_are_kept() -> None:
    sid = str(uuid.uuid4())
    raw = {k.encode(): v.encode() for k, v in session_hash(sid).items()}
    raw[b"session_name"] = b"caf\xe9"  # latin-1, not UTF-8
    outcome = run(record_key(Kind.SESSION, sid), raw)
    assert isinstance(outcome, Rejected)
    assert "not valid UTF-8" in outcome.reason
    flat = decode_resp(outcome.payload)
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == raw


def test_wrong_redis_type_is_rejected_with_its_value() -> None:
    key = record_key(Kind.SESSION, "abc")
    outcome = normalize(classify(key), Fetched(key, "string", b"not a hash", -1, READ_AT, READ_AT))  # type: ignore[arg-type]
    assert isinstance(outcome, Rejected)
    assert "wrong Redis type: string" in outcome.reason
    assert decode_resp(outcome.payload) == b"not a hash"


def test_id_field_that_differs_from_the_key_is_rejected() -> None:
    record = session_hash()
    outcome = run(record_key(Kind.SESSION, "some-session-name"), record)
    assert isinstance(outcome, Rejected)
    assert "does not match the key's id" in outcome.reason


def test_missing_id_field_takes_the_key_id() -> None:
    record = job_hash()
    del record["job_id"]
    row = run(record_key(Kind.JOB, "job-from-key"), record)
    assert isinstance(row, Row) and row.record_id == "job-from-key"


def test_a_fragment_without_desto_core_fields_is_rejected() -> None:
    # e.g. a lone HSET of status on a key that had already expired
    outcome = run(record_key(Kind.SESSION, "s1"), {"status": "finished", "end_time": "2026-11-26T10:00:00"})
    assert isinstance(outcome, Rejected)
    assert "missing field(s) session_name" in outcome.reason


def test_optional_fields_missing_take_desto_defaults() -> None:
    record = session_hash()
    for name in ("tmux_active", "at_job_id", "job_ids", "last_heartbeat"):
        del record[name]
    row = run(record_key(Kind.SESSION, record["session_id"]), record)
    assert isinstance(row, Row)
    cols = columns(row)
    assert (cols["tmux_active"], cols["at_job_id"], cols["job_ids"], cols["last_heartbeat"]) == (0, "", "", None)


def test_unknown_fields_are_kept_in_extra() -> None:
    record = session_hash(job_finished_time="2026-11-26T10:00:00")
    row = run(record_key(Kind.SESSION, record["session_id"]), record)
    assert isinstance(row, Row)
    assert json.loads(row.extra or "{}") == {"job_finished_time": "2026-11-26T10:00:00"}


def test_missing_key_is_gone_and_unknown_keys_are_rejected() -> None:
    key = record_key(Kind.JOB, "j1")
    assert normalize(classify(key), Fetched(key, "none", None, -2, READ_AT, READ_AT)) == Gone(
        key, Kind.JOB, "j1", READ_AT, READ_AT
    )  # type: ignore[arg-type]
    unknown = b"desto:status:nightly"
    outcome = normalize(classify(unknown), Fetched(unknown, "string", b"running", -1, READ_AT, READ_AT))  # type: ignore[arg-type]
    assert isinstance(outcome, Rejected) and outcome.kind is None
    assert "unrecognized key" in outcome.reason


def test_empty_or_undecodable_key_ids_are_rejected() -> None:
    for key in (b"desto:session:", b"desto:job:\xff\xfe"):
        outcome = normalize(classify(key), fetched(key, job_hash()))  # type: ignore[arg-type]
        assert isinstance(outcome, Rejected)


def test_creation_time_is_dated_from_desto_seven_day_ttl() -> None:
    record = session_hash()
    one_hour_ms = 3_600_000
    row = run(record_key(Kind.SESSION, record["session_id"]), record, pttl=7 * 86_400_000 - one_hour_ms)
    assert isinstance(row, Row)
    assert row.created_at_us == READ_AT - one_hour_ms * 1000
    assert row.expires_at_us == READ_AT + (7 * 86_400_000 - one_hour_ms) * 1000
    no_ttl = run(record_key(Kind.SESSION, record["session_id"]), record, pttl=-1)
    assert isinstance(no_ttl, Row) and no_ttl.created_at_us == READ_AT and no_ttl.expires_at_us is None


def test_parse_hint_reads_desto_messages_and_ignores_anything_else() -> None:
    data = json.dumps({"job_id": "j1", "session_id": "s1", "status": "finished", "timestamp": "2026-11-26T10:00:00"})
    hint = parse_hint(b"desto:job_updates", data.encode())
    assert hint is not None and (hint.kind, hint.record_id, hint.status) == (Kind.JOB, "j1", "finished")
    assert hint.timestamp == "2026-11-26T10:00:00"
    assert parse_hint(b"desto:job_updates", b"{not json") is None
    assert parse_hint(b"desto:job_updates", b"[1, 2]") is None
    assert parse_hint(b"desto:session_updates", json.dumps({"status": "running"}).encode()) is None
    message = json.dumps({"session_id": "s", "status": "x", "timestamp": 5}).encode()
    bad_time = parse_hint(b"desto:session_updates", message)
    assert bad_time is not None and bad_time.timestamp is None


def test_time_formats() -> None:
    assert sqlite_utc(1_764_197_504_331_712) == "2025-11-26 22:51:44"
    assert iso_utc(1_764_197_504_331_712) == "2025-11-26T22:51:44.331712Z"


# ─── properties ──────────────────────────────────────────────────────────────────────────────────

_values = st.one_of(st.text(), st.binary(max_size=64))
_names = st.one_of(st.sampled_from(sorted(session_hash())), st.text(max_size=12))
_fields = st.dictionaries(_names, _values, max_size=14)


@given(fields=_fields, kind=st.sampled_from(list(Kind)), record_id=st.text(min_size=1, max_size=40))
def test_normalize_never_raises_and_every_row_is_well_typed(fields, kind: Kind, record_id: str) -> None:
    key = record_key(kind, record_id)
    outcome = run(key, fields)
    assert isinstance(outcome, (Row, Rejected))
    if isinstance(outcome, Row):
        assert len(outcome.values) == len(COLUMNS[kind])
        for value in outcome.values:
            assert value is None or isinstance(value, (str, int))
    else:
        assert outcome.reason
        flat = decode_resp(outcome.payload)
        assert len(flat) == 2 * len(fields)


@given(st.recursive(st.one_of(st.none(), st.binary(), st.integers()), lambda inner: st.lists(inner, max_size=5)))
def test_resp_round_trips(value) -> None:
    assert decode_resp(encode_resp(value)) == value
