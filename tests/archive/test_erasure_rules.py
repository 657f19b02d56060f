"""Erasure's rules by the way a record is erased: the table in archiver/archive/erase.py
(``ERASURE_RULES``) is the one docs/deleting-history.md shows, and the code follows it."""

from __future__ import annotations

import pytest

from archiver.archive import erase
from tests.helpers import REPO

pytestmark = pytest.mark.unit

HEADER = "| how | what goes | remembered as | a session's jobs go with it | its bytes overwritten as deleted |"
OVERWRITTEN = {True: "yes", None: "where desto's SQLite has `SECURE_DELETE` (else every page is scrubbed)"}
JOBS = {True: "yes", False: "no: each by its own tombstone"}


def code_table() -> list[str]:
    return [HEADER, "|---|---|---|---|---|"] + [
        f"| {e.way} | {e.goes} | `{e.how}` | {JOBS[e.jobs_follow]} | {OVERWRITTEN[e.overwritten]} |"
        for e in erase.ERASURE_RULES
    ]


def doc_table() -> list[str]:
    text = (REPO / "docs" / "deleting-history.md").read_text(encoding="utf-8")
    section = text.split("## The ways to delete", 1)[1]
    return [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]


def test_the_guide_s_table_of_erasures_is_the_code_s() -> None:
    assert doc_table() == code_table(), "\n".join(code_table())


def test_every_way_of_one_kind_of_erasure_follows_the_same_rules() -> None:
    """The rules are chosen by what archiver_erased remembers (``how``), so ways that share it
    must share them."""
    for how, rule in erase.RULES.items():
        for e in erase.ERASURE_RULES:
            if e.how == how:
                assert (e.described, e.jobs_follow, e.overwritten) == (
                    rule.described,
                    rule.jobs_follow,
                    rule.overwritten,
                )
    assert set(erase.RULES) == {"desto", "forget", "retention"}


def test_the_code_follows_the_table() -> None:
    assert erase.describe("session", "forget") == "desto-archiver forget"
    assert erase.describe("session", "desto") == "desto's History tab"
    assert erase.describe("session", "another program") == "another program"
    assert erase.jobs_follow("desto") and erase.jobs_follow("forget") and not erase.jobs_follow("retention")
    assert erase.jobs_follow(None) and erase.jobs_follow("another program")  # as desto's own


def test_the_writer_and_the_quarantine_keep_the_jobs_of_exactly_the_sessions_the_table_says_keep_them() -> None:
    """The file's writes decide by ``sql.JOBS_STAY`` (the writer cannot import the erasure module,
    which builds on it): the ways whose erased sessions leave their jobs, as the table says."""
    from archiver.archive import sql

    assert set(sql.JOBS_STAY) == {e.how for e in erase.ERASURE_RULES if not e.jobs_follow}
