"""Reading the central PostgreSQL database for people: stats, the session list and exports across
every host that ships there (``--source`` for one), in the same shapes as the file's reader.

Imports psycopg: loaded only by the commands given ``--postgres-url``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Query
from psycopg.rows import dict_row

from archiver.archive.reader import EXPORTS, Filters, ReadError, _bound, _seconds, payload_json
from archiver.central.postgres import PG_SCHEMA_VERSION, connect, pg_schema_version, shipped_sources, sources_hint
from archiver.config import Settings

_PAGE = 500


class CentralReader:
    def __init__(self, conn: psycopg.Connection[Any], schema: str, source: str | None, address: str) -> None:
        self.conn, self.schema, self.source, self.address = conn, schema, source, address

    @classmethod
    def open(cls, settings: Settings, source: str | None) -> CentralReader:
        try:
            conn = connect(settings)
        except psycopg.Error as exc:
            raise ReadError(f"cannot reach PostgreSQL at {settings.postgres_address()}: {str(exc).strip()}") from None
        schema = settings.postgres_schema
        version = pg_schema_version(conn, schema)
        if version == 0:
            conn.close()
            raise ReadError(
                f"PostgreSQL at {settings.postgres_address()} holds no schema {schema} yet: ship an archive there "
                "first ('desto-archiver ship', or run the daemon with ARCHIVER_POSTGRES_URL)"
            )
        if version > PG_SCHEMA_VERSION:
            conn.close()
            raise ReadError(
                f"PostgreSQL schema {schema} has version {version}, newer than this desto-archiver's "
                f"{PG_SCHEMA_VERSION}: upgrade desto-archiver to read it"
            )
        return cls(conn, schema, source, settings.postgres_address() or "")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> CentralReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _only(self, clauses: list[str], params: list[Any]) -> None:
        if self.source is not None:
            clauses.append("source_name = %s")
            params.append(self.source)

    def _one(self, sql: str, params: list[Any]) -> tuple[Any, ...]:
        row = self.conn.execute(sql, params).fetchone()
        assert row is not None
        return tuple(row)

    # ─── stats ───────────────────────────────────────────────────────────────────────────────

    def stats(self) -> dict[str, Any]:
        where: list[str] = ["true"]
        params: list[Any] = []
        self._only(where, params)
        cond = " AND ".join(where)
        s = self.schema
        kinds: dict[str, Any] = {}
        for name, table in (
            ("sessions", "sessions"),
            ("jobs", "jobs"),
            ("favorites", "favorites"),
            ("atjobs", "at_jobs"),
        ):
            by_status = (
                {
                    r[0]: r[1]
                    for r in self.conn.execute(
                        f"SELECT status, count(*) FROM {s}.{table} WHERE {cond} GROUP BY status ORDER BY status", params
                    )
                }
                if table != "favorites"
                else {}
            )
            row = self._one(
                f"SELECT count(*), count(gone_at), min(created_at), max(created_at) FROM {s}.{table} WHERE {cond}",
                params,
            )
            kinds[name] = {
                "total": row[0],
                "tombstoned": row[1],
                "by_status": by_status,
                "oldest": row[2],
                "newest": row[3],
            }
        quarantine = self._one(
            f"SELECT count(*), count(*) - count(resolved_at), coalesce(sum(length(payload)), 0) "
            f"FROM {s}.quarantine WHERE {cond}",
            params,
        )
        sources = [
            {
                "source": r[0],
                "host": r[1],
                "file": r[2],
                "position": r[3],
                "shipped_at": r[4].isoformat() if r[4] else None,
                "copied_at": r[5].isoformat() if r[5] else None,
            }
            for r in self.conn.execute(
                f"SELECT source_name, host, file, position, shipped_at, copied_at FROM {s}.ship_positions "
                f"WHERE {cond} ORDER BY source_name",
                params,
            )
        ]
        if self.source is not None and not sources:
            found = sources_hint(shipped_sources(self.conn, s))
            raise ReadError(f"no host ships to {self.address} as source {self.source!r}; {found}")
        erased: dict[str, dict[str, int]] = {}
        for kind, how, n in self.conn.execute(
            f"SELECT kind, how, count(*) FROM {s}.erased WHERE {cond} GROUP BY kind, how ORDER BY kind, how", params
        ):
            erased.setdefault(how, {})[kind] = n
        last_erased = self._one(f"SELECT max(erased_at) FROM {s}.erased WHERE {cond}", params)[0]
        return {
            "database": self.address,
            "schema": self.schema,
            "schema_version": pg_schema_version(self.conn, self.schema),
            "sources": sources,
            "records": kinds,
            "history_events": self._one(f"SELECT count(*) FROM {s}.status_history WHERE {cond}", params)[0],
            "quarantine": {"total": quarantine[0], "unresolved": quarantine[1], "payload_bytes": int(quarantine[2])},
            "erased": {"by_how": erased, "pending": 0, "last_at": last_erased},
        }

    # ─── sessions, exports ───────────────────────────────────────────────────────────────────

    def _stream(self, query: Query, params: list[Any]) -> Iterator[dict[str, Any]]:
        """Rows through a server-side cursor: memory stays flat however many there are."""
        with self.conn.transaction(), self.conn.cursor(name="desto_archiver_read", row_factory=dict_row) as cur:
            cur.itersize = _PAGE
            cur.execute(query, params)
            yield from cur

    def sessions(self, filters: Filters) -> Iterator[dict[str, Any]]:
        where, params = self._where("sessions", filters)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit else ""
        for r in self._stream(
            "SELECT source_name, session_id, session_name, status, start_time, end_time, job_ids, gone_at, "
            f"gone_reason FROM {self.schema}.sessions WHERE {where} ORDER BY created_at DESC, source_name, "
            f"session_id{limit}",
            params,
        ):
            r["jobs"] = len([j for j in (r.pop("job_ids") or "").split(",") if j])
            r["duration_s"] = _seconds(r["start_time"], r["end_time"])
            yield r

    def export(self, what: str, filters: Filters) -> tuple[list[str], Iterator[dict[str, Any]]]:
        table, _, _, order = EXPORTS[what]
        columns = [
            r[0]
            for r in self.conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                (self.schema, table),
            )
            if r[0] not in ("file_id", "key")
        ]
        where, params = self._where(what, filters)
        limit = f" LIMIT {int(filters.limit)}" if filters.limit else ""
        # the columns' names are the database's, which a role owning the tables may choose: each is
        # quoted as a name whatever it holds (a % doubled: the statement takes parameters), never run
        statement = sql.SQL("SELECT {} FROM {}.{} WHERE {} ORDER BY {}, source_name{}").format(
            sql.SQL(", ").join(sql.Identifier(c.replace("%", "%%")) for c in columns),
            sql.Identifier(self.schema),
            sql.Identifier(table),
            sql.SQL(where),  # the filters' own text: their values are parameters
            sql.SQL(order),
            sql.SQL(limit),
        )

        def rows() -> Iterator[dict[str, Any]]:
            for r in self._stream(statement, params):
                if what == "quarantine":
                    r["payload"] = payload_json(bytes(r["payload"]), bool(r.get("truncated")))
                yield r

        return columns, rows()

    def _where(self, what: str, filters: Filters) -> tuple[str, list[Any]]:
        _, time_col, name_col, _ = EXPORTS[what]
        clauses: list[str] = ["true"]
        params: list[Any] = []
        self._only(clauses, params)
        if filters.status is not None:
            clauses.append(f"{ {'history': 'status', 'quarantine': 'kind'}.get(what, 'status') } = %s")
            params.append(filters.status)
        if filters.name is not None and name_col is not None:
            clauses.append(f"strpos(lower({name_col}), lower(%s)) > 0")
            params.append(filters.name)
        if time_col is not None:
            # the times are ISO text: compared byte for byte, as SQLite does
            if filters.since is not None:
                clauses.append(f'{time_col} COLLATE "C" >= %s')
                params.append(_bound(time_col, filters.since))
            if filters.until is not None:
                clauses.append(f'{time_col} COLLATE "C" < %s')
                params.append(_bound(time_col, filters.until))
        return " AND ".join(clauses), params
