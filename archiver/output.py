"""Output for people (aligned tables) and for machines (JSON, CSV, JSON Lines), in one place.

Text for people never carries a control character: a session name, a command line or a key from
Redis could otherwise set a terminal's title, write its clipboard, clear its screen or overwrite
a line. :func:`visible` shows each one as its escape instead; machine output keeps the text as it is.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, TextIO

_MAX_CELL = 60

# C0 (tab and line feed among them), DEL and C1; and the lone surrogates that stand for bytes that
# were not UTF-8 (surrogateescape), which a terminal's encoding cannot write either.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8: shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str, keep_newlines: bool = False) -> str:
    """``text`` for a terminal: each control character shown as its escape, as Python writes it in a
    string (``\\x1b`` for ESC, ``\\r``, ``\\t``, ``\\n``, ``\\x9b`` for C1's CSI), every other
    character as it is. ``keep_newlines``: a line break stays one (text made of lines, whose values
    were made visible already)."""
    if text.isprintable():  # no control character (nor any other unprintable one): most text, at C speed
        return text
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


def to_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=str)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    text = visible(str(value))
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """An aligned text table with a header row; '-' for absent values."""
    out = io.StringIO()
    write_table(rows, columns, out, page=max(1, len(rows)))  # one page: every row sets the widths
    return out.getvalue().removesuffix("\n")


def write_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], out: TextIO, page: int = 1000) -> int:
    """:func:`table`, written as the rows come: the columns' widths are those of the first
    ``page`` rows (a wider cell further down only shifts its own line), so memory stays flat."""
    it = iter(rows)
    first = list(islice(it, page))
    if not first:
        out.write("(none)\n")
        return 0
    cells = [[cell(r.get(c)) for c in columns] for r in first]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip() + "\n"

    out.write(line(columns))
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(line(row))
    count = len(first)
    for r in it:
        out.write(line([cell(r.get(c)) for c in columns]))
        count += 1
    return count


def write_json_array(items: Iterable[Any], out: TextIO, page: int = 500) -> int:
    """A JSON array written ``page`` items at a time: the same text as ``to_json(list(items))``."""
    it = iter(items)
    count = 0
    out.write("[")
    while chunk := list(islice(it, page)):
        out.write(", " if count else "")
        out.write(to_json(chunk)[1:-1])
        count += len(chunk)
    out.write("]\n")
    return count


def pairs(items: Iterable[tuple[str, Any]]) -> str:
    """``key: value`` lines, aligned."""
    items = list(items)
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v) if not isinstance(v, str) else visible(v)}" for k, v in items)


# What a spreadsheet takes for the start of a formula (OWASP's list for CSV injection): a text cell
# starting with one is written after a single quote, which the spreadsheet shows as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write_csv(columns: Sequence[str], rows: Iterable[dict[str, Any]], out: TextIO, raw: bool = False) -> int:
    """CSV a spreadsheet opens: a header row, every field quoted where needed, NULL as empty. A text
    cell that starts like a formula (``=``, ``+``, ``-``, ``@``, tab, carriage return) gets a single
    quote in front, so a command line from Redis is shown, never run; ``raw`` writes it as it is."""
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\r\n")
    writer.writerow({c: _csv_value(c, raw) for c in columns})
    count = 0
    for row in rows:
        writer.writerow({k: _csv_value(v, raw) for k, v in row.items()})
        count += 1
    return count


def _csv_value(value: Any, raw: bool) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        value = to_json(value)
    if not raw and isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """One JSON object per line, values typed (integers stay integers, NULL is null)."""
    count = 0
    for row in rows:
        out.write(to_json(row))
        out.write("\n")
        count += 1
    return count
