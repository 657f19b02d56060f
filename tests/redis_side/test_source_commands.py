"""The commands the Redis side sends, against fakeredis (Redis' commands in process, no server):
the scan of desto's keys among other programs' and their classification, and the bounded read
without scripting (MULTI/EXEC under WATCH, the path a user without EVAL takes). The read script
itself, and everything timing- or server-dependent, is tested against real redis-servers."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from archiver.config import load_settings
from archiver.keys import KeyClass, classify
from archiver.kinds import Kind
from archiver.models import MAX_RECORD_FIELDS
from archiver.redis_side import source as source_module
from archiver.redis_side.source import Source

pytestmark = pytest.mark.unit

WEEK_S = 7 * 24 * 3600


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def source(fake: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> Source:
    monkeypatch.setattr(source_module, "make_client", lambda settings, name: fake)
    made = Source(load_settings(redis_url="redis://127.0.0.1:1"))  # never connected: fakeredis answers
    made._use_script = False  # fakeredis runs no Lua here: the read without scripting
    return made


def desto_keyspace(fake: fakeredis.FakeRedis) -> set[bytes]:
    """What desto 0.7.0 keeps in Redis for a small history, beside another program's keys; returns
    the record keys."""
    records = {
        b"desto:session:3f2a9c1e-0c1b-4c7e-9b57-1f0e4ad4c2b1": {"session_id": "3f2a9c1e", "status": "finished"},
        b"desto:job:91c0d2aa-5b7e-4d1f-8f6a-2c3b4d5e6f70": {"job_id": "91c0d2aa", "status": "finished"},
        b"desto:favorite:7d1e4f1a-aa53-4a8e-9d3c-2a4b5c6d7e8f": {"favorite_id": "7d1e4f1a", "name": "nightly"},
        b"desto:atjob:12": {"atjob_id": "12", "session_name": "later"},
        b"desto:session:with:colons": {"session_id": "with:colons"},
    }
    for key, fields in records.items():
        fake.hset(key, mapping=fields)
        if not key.startswith(b"desto:favorite:"):
            fake.expire(key, WEEK_S)
    fake.set(b"desto:favorite:name:nightly", b"7d1e4f1a-aa53-4a8e-9d3c-2a4b5c6d7e8f")  # desto's name index
    fake.sadd(b"desto:favorites:all", b"7d1e4f1a-aa53-4a8e-9d3c-2a4b5c6d7e8f")  # and its set of favorites
    fake.set(b"desto:something-new", b"1")  # a shape desto may start writing: not a record
    for other in (b"celery-task-meta-1", b"session:abc", b"desto", b"xdesto:session:a"):
        fake.set(other, b"another program's")
    return set(records)


def test_the_scan_finds_desto_s_keys_only_and_each_is_told_what_it_is(
    fake: fakeredis.FakeRedis, source: Source
) -> None:
    records = desto_keyspace(fake)
    found: list[bytes] = []
    cursor = 0
    while True:  # page by page, as a reconcile's scan goes
        cursor, keys = source.scan_page(cursor, 3)
        found.extend(keys)
        if cursor == 0:
            break
    assert len(found) == len(set(found)) and all(k.startswith(b"desto:") for k in found)
    parsed = {key: classify(key) for key in found}
    assert {k for k, p in parsed.items() if p and p.cls is KeyClass.RECORD} == records
    assert {k for k, p in parsed.items() if p and p.cls is KeyClass.INDEX} == {
        b"desto:favorite:name:nightly",
        b"desto:favorites:all",
    }
    assert {k for k, p in parsed.items() if p and p.cls is KeyClass.UNKNOWN} == {b"desto:something-new"}
    colons = parsed[b"desto:session:with:colons"]
    assert colons is not None and colons.kind is Kind.SESSION and colons.raw_id == b"with:colons"


def test_the_read_without_scripting_takes_a_record_whole_and_only_describes_what_no_record_can_be(
    fake: fakeredis.FakeRedis, source: Source
) -> None:
    desto_keyspace(fake)
    fake.hset(b"desto:session:huge", mapping={f"field{i}": "v" for i in range(MAX_RECORD_FIELDS + 1)})
    fake.rpush(b"desto:job:a-list", *[b"item"] * 5)
    session, huge, a_list, missing = source.fetch(
        [b"desto:session:3f2a9c1e-0c1b-4c7e-9b57-1f0e4ad4c2b1", b"desto:session:huge", b"desto:job:a-list",
         b"desto:session:gone"]
    )  # fmt: skip
    assert session.redis_type == "hash" and session.described is None
    assert dict(zip(session.value[::2], session.value[1::2], strict=True)) == {
        b"session_id": b"3f2a9c1e",
        b"status": b"finished",
    }
    assert 0 < session.pttl_ms <= WEEK_S * 1000 and session.version_us == session.read_at_us > 0
    for too_big in (huge, a_list):  # read in part, for the quarantine's description
        assert too_big.described is not None and "too big for a desto record" in too_big.described
    assert huge.redis_type == "hash" and a_list.redis_type == "list"
    assert missing.redis_type == "none" and missing.value is None and missing.pttl_ms == -2
    # one read, one clock: every key of the step has the version of the same instant
    assert len({f.version_us for f in (session, huge, a_list, missing)}) == 1
