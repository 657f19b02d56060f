"""The record kinds the archiver keeps, in one registry every module iterates.

A kind's entry says where its records live in Redis (keys.py derives the key prefix and desto's
channel from its name), where they go in the file (table, id column), how people name them, and
what the rest of the archiver needs to know of it. A new kind is an entry here, its parser
(models.SPECS) and a schema migration (schema.py) that creates its table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """The record kinds the archiver keeps: each is also the middle part of its keys in Redis."""

    SESSION = "session"
    JOB = "job"
    FAVORITE = "favorite"
    ATJOB = "atjob"


SESSION_STATUSES = frozenset({"starting", "running", "finished", "failed", "scheduled"})
JOB_STATUSES = frozenset({"queued", "running", "finished", "failed", "scheduled"})


@dataclass(frozen=True, slots=True)
class KindInfo:
    kind: Kind
    table: str  # the archive's table
    id_column: str  # the table's primary key
    id_field: str  # the hash field that repeats the id of the key
    plural: str  # how commands name the kind's records (`export`, `stats`)
    noun: str  # how people call one record
    listing: tuple[str, str, str]  # for listings: the time column, the name expression, the order
    desto_table: bool = False  # desto's own SQLiteStore creates and reads the table
    statuses: frozenset[str] | None = None  # desto's enum of the status field (None: free text)
    has_status: bool = True  # the record has a status field
    channel: bool = False  # desto publishes its status changes on desto:<kind>_updates
    ttl: bool = False  # desto gives each record its 7-day TTL when it creates it
    id_column_repeated: str | None = None  # a column that keeps the id a second time, as desto does
    renamed: bool = False  # desto lets the record's unique name change (favorites): real_name is kept


KINDS: dict[Kind, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo(
            Kind.SESSION,
            table="sessions",
            id_column="session_id",
            id_field="session_id",
            plural="sessions",
            noun="session",
            listing=("start_time", "session_name", "created_at, session_id"),
            desto_table=True,
            statuses=SESSION_STATUSES,
            channel=True,
            ttl=True,
        ),
        KindInfo(
            Kind.JOB,
            table="jobs",
            id_column="job_id",
            id_field="job_id",
            plural="jobs",
            noun="job",
            listing=("start_time", "command", "created_at, job_id"),
            desto_table=True,
            statuses=JOB_STATUSES,
            channel=True,
            ttl=True,
        ),
        KindInfo(
            Kind.FAVORITE,
            table="favorites",
            id_column="favorite_id",
            id_field="favorite_id",
            plural="favorites",
            noun="favorite",
            listing=("created_at", "coalesce(real_name, name)", "created_at, favorite_id"),
            desto_table=True,
            has_status=False,
            renamed=True,
        ),
        KindInfo(
            Kind.ATJOB,
            table="at_jobs",
            id_column="at_job_id",
            id_field="job_id",
            plural="atjobs",
            noun="at-job",
            listing=("request_time", "session_name", "created_at, at_job_id"),
            id_column_repeated="job_id",
        ),
    )
}

TABLES: dict[Kind, str] = {kind: info.table for kind, info in KINDS.items()}
RECORD_TABLES: tuple[str, ...] = tuple(TABLES.values())
BY_PLURAL: dict[str, KindInfo] = {info.plural: info for info in KINDS.values()}
BY_TABLE: dict[str, KindInfo] = {info.table: info for info in KINDS.values()}
