"""Output for people (aligned tables) and for machines (JSON, CSV, JSON Lines), in one place."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

_MAX_CELL = 60


def to_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=str)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """An aligned text table with a header row; '-' for absent values."""
    if not rows:
        return "(none)"
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def pairs(items: Iterable[tuple[str, Any]]) -> str:
    """``key: value`` lines, aligned."""
    items = list(items)
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {cell(v) if not isinstance(v, str) else v}" for k, v in items)


def write_csv(columns: Sequence[str], rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """CSV a spreadsheet opens: a header row, every field quoted where needed, NULL as empty."""
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
        count += 1
    return count


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return to_json(value)
    return value


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> int:
    """One JSON object per line, values typed (integers stay integers, NULL is null)."""
    count = 0
    for row in rows:
        out.write(to_json(row))
        out.write("\n")
        count += 1
    return count
