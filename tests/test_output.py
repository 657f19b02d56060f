"""Output for people shows control characters as escapes; output for machines keeps them; a CSV
cell a spreadsheet would evaluate is written as text."""

from __future__ import annotations

import csv
import io
import re

import pytest
import structlog

from archiver.log import configure, get_logger
from archiver.output import pairs, table, visible, write_csv, write_jsonl

pytestmark = pytest.mark.unit

CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, é and 日本", "plain text, é and 日本"),
        ("\x1b]0;title\x07", r"\x1b]0;title\x07"),
        ("\x1b]52;c;aGk=\x1b\\", "\\x1b]52;c;aGk=\\x1b\\"),  # ended by ST: ESC and a backslash
        ("a\rb\x08c\x7fd", r"a\rb\x08c\x7fd"),
        ("tab\tline\nend", r"tab\tline\nend"),
        ("\x00\x1f", r"\x00\x1f"),
        ("c1 \x80 \x9b31m \x9f", r"c1 \x80 \x9b31m \x9f"),
        ("invalid utf-8 \udcff\udc80", r"invalid utf-8 \xff\x80"),  # bytes kept by surrogateescape
        ("\xa0 no-break space stays", "\xa0 no-break space stays"),
    ],
)
def test_visible_shows_every_control_character_as_its_escape(text: str, shown: str) -> None:
    assert visible(text) == shown


def test_visible_keeps_line_breaks_only_when_asked() -> None:
    assert visible("one\ntwo\x1b[2J", keep_newlines=True) == "one\ntwo\\x1b[2J"
    assert visible("one\ntwo") == "one\\ntwo"


def test_tables_and_summaries_show_escapes_and_keep_each_value_on_its_line() -> None:
    text = table([{"name": "x\x1b[2J\ny", "n": 1}], ["name", "n"])
    assert not CONTROL.search(text) and text.count("\n") == 2 and r"x\x1b[2J\ny" in text
    summary = pairs([("session", "a\rb\x9b1m\nc"), ("status", "ok")])
    assert not CONTROL.search(summary) and summary.count("\n") == 1 and r"a\rb\x9b1m\nc" in summary


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_a_csv_cell_a_spreadsheet_would_evaluate_is_written_as_text(start: str) -> None:
    out = io.StringIO(newline="")
    write_csv(["command", "exit_code"], [{"command": f"{start}1+1", "exit_code": -1}], out)
    [row] = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert row == {"command": f"'{start}1+1", "exit_code": "-1"}  # numbers stay numbers

    raw = io.StringIO(newline="")
    write_csv(["command"], [{"command": f"{start}1+1"}], raw, raw=True)
    [row] = list(csv.DictReader(io.StringIO(raw.getvalue(), newline="")))
    assert row == {"command": f"{start}1+1"}


def test_json_lines_keep_control_characters_exactly() -> None:
    import json

    out = io.StringIO()
    write_jsonl([{"command": "\x1b]0;t\x07\x9b\x7f=1"}], out)
    assert json.loads(out.getvalue()) == {"command": "\x1b]0;t\x07\x9b\x7f=1"}


def test_console_log_lines_show_escapes() -> None:
    """JSON log lines escape control characters by JSON's rules; the console's readable lines
    (a terminal's) show them as escapes too, in the event and in every value."""
    stream = io.StringIO()
    try:
        configure("console", "info", stream=stream)
        get_logger("test").warning("quarantine.\x1b]0;owned\x07", key="desto:session:\x1b[2J\r", n=1)
    finally:
        structlog.reset_defaults()
    line = stream.getvalue()
    assert line.endswith("\n") and not CONTROL.search(line[:-1]), repr(line)
    assert r"quarantine.\x1b]0;owned\x07" in line and r"desto:session:\x1b[2J\r" in line
