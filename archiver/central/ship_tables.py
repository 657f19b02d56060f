"""How each shipped table goes to PostgreSQL: the columns the file and the central table both have,
the central statements, and the file's values made to fit the central column types."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from archiver.archive import changelog
from archiver.central.postgres import NUMBERED

if TYPE_CHECKING:
    import psycopg


@dataclass
class Table:
    """How one table is copied: the columns both sides have, and the central statements."""

    name: str
    key: str
    columns: list[str]
    kinds: list[str]  # the central type of each column: bigint, text, bytea
    upsert: str
    delete: str
    numbered: bool
    stage: str  # the connection's temporary table a big batch is copied into
    copy: str
    upsert_staged: str
    selected: str  # the columns as the file's SELECT names them
    good_shapes: set[tuple[type, ...]] = field(default_factory=set)
    text_of: dict[tuple[type, ...], Callable[[Sequence[Any]], Any] | None] = field(default_factory=dict)

    def learn(self, shape: tuple[type, ...]) -> bool:
        """Whether rows of these value types go to PostgreSQL as they are (then remembered)."""
        wanted = {"text": str, "bigint": int, "bytea": bytes}
        if not all(t is type(None) or t is wanted[k] for t, k in zip(shape, self.kinds, strict=True)):
            return False
        texts = [i for i, t in enumerate(shape) if t is str]
        self.text_of[shape] = itemgetter(*texts) if texts else None
        self.good_shapes.add(shape)
        return True


def coerce(kind: str, value: Any) -> Any:
    """SQLite stores any value in any column; the central column has one type. A value that does
    not fit becomes NULL rather than stopping the shipping of every row after it."""
    if value is None:
        return None
    if kind == "bigint":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            return None
    if kind == "bytea":
        return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    text = str(value)
    return text.replace("\x00", "\ufffd") if "\x00" in text else text  # PostgreSQL's text holds no NUL


def pg_name(pg: psycopg.Connection[Any], name: str, with_params: bool) -> str:
    """A name read from the database (a column's) as a statement holds it: quoted whatever it holds,
    so it is never SQL; in a statement run with parameters, a ``%`` in it doubled, so psycopg does
    not take it for one."""
    from psycopg import sql

    return sql.Identifier(name.replace("%", "%%") if with_params else name).as_string(pg)


def file_names(columns: Sequence[str]) -> str:
    """The columns as SQLite reads them in a SELECT: each quoted, a double quote in it doubled."""
    return ", ".join('"' + c.replace('"', '""') + '"' for c in columns)


def describe(pg: psycopg.Connection[Any], conn: sqlite3.Connection, schema: str) -> dict[str, Table]:
    """Every shipped table as both sides have it now."""
    central: dict[str, list[tuple[str, str]]] = {}
    for table, column, kind in pg.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
        "ORDER BY table_name, ordinal_position",
        (schema,),
    ):
        central.setdefault(table, []).append((column, kind))
    found: dict[str, Table] = {}
    for table, key in changelog.SHIPPED.items():
        mine = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        both = [(c, k) for c, k in central.get(table, []) if c in mine]
        columns, kinds = [c for c, _ in both], [k for _, k in both]
        # names read from the database are quoted as names, whatever they hold: a column whose name
        # closes its quotes stays a column, never SQL run by whoever ships
        quoted, plain = [pg_name(pg, c, True) for c in columns], [pg_name(pg, c, False) for c in columns]
        numbered = table in NUMBERED
        conflict = f"source_name, file_id, {key}" if numbered else f"source_name, {key}"
        others = [(q, p) for c, q, p in zip(columns, quoted, plain, strict=True) if c != key]
        sets = ", ".join(["file_id = EXCLUDED.file_id", *(f"{q} = EXCLUDED.{q}" for q, _ in others)])
        sets_plain = ", ".join(["file_id = EXCLUDED.file_id", *(f"{p} = EXCLUDED.{p}" for _, p in others)])
        guard = (
            ""
            if numbered
            else (
                f" WHERE {table}.read_at_us IS NULL OR EXCLUDED.read_at_us IS NULL "
                f"OR EXCLUDED.read_at_us >= {table}.read_at_us"
            )
        )
        upsert = (
            f"INSERT INTO {schema}.{table} (source_name, file_id, {', '.join(quoted)}) "
            f"VALUES (%s, %s, {', '.join(['%s'] * len(quoted))}) "
            f"ON CONFLICT ({conflict}) DO UPDATE SET {sets}{guard}"
        )
        delete = f"DELETE FROM {schema}.{table} WHERE source_name = %s AND {key} = ANY(%s)" + (
            " AND file_id = %s" if numbered else ""
        )
        stage = f"archiver_stage_{table}"
        names = f"source_name, file_id, {', '.join(plain)}"  # these two statements take no parameters
        upsert_staged = (
            f"INSERT INTO {schema}.{table} ({names}) SELECT {names} FROM {stage} "
            f"ON CONFLICT ({conflict}) DO UPDATE SET {sets_plain}{guard}"
        )
        copy = f"COPY {stage} ({names}) FROM STDIN"
        found[table] = Table(
            table, key, columns, kinds, upsert, delete, numbered, stage, copy, upsert_staged, file_names(columns)
        )
    return found


def as_params(table: Table, head: tuple[str, str], rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The rows as PostgreSQL takes them, each after ``head`` (source_name, file_id). Most rows
    already are: their types (a signature checked once per shape) match the columns and their text
    holds no NUL; only the others go through coerce, value by value."""
    out: list[tuple[Any, ...]] = []
    append, good, text_of = out.append, table.good_shapes, table.text_of
    for r in rows:
        shape = tuple(map(type, r))
        if shape not in good and not table.learn(shape):
            append((*head, *(coerce(k, v) for k, v in zip(table.kinds, r, strict=True))))
            continue
        getter = text_of[shape]
        texts = getter(r) if getter is not None else ""
        if "\x00" in (texts if isinstance(texts, str) else "".join(texts)):
            append((*head, *(coerce(k, v) for k, v in zip(table.kinds, r, strict=True))))
        else:
            append((*head, *r))
    return out
