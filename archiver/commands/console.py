"""What a command writes and how it ends: its exit codes, its usage errors, stdout and stderr for the
length of a command (a closed pipe told apart, control characters shown as escapes for people),
and the machine output written as it is."""

from __future__ import annotations

import sys
from typing import Any

from archiver.output import to_json, visible

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line value the command cannot use (exit 2)."""


class OutputClosed(Exception):
    """The program reading the output stopped reading (``| head``): not a failure."""


class Stdout:
    """``sys.stdout`` for the length of a command. A closed pipe and a broken Redis connection
    both raise BrokenPipeError; this tells the first apart, so it is not reported as the second."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise OutputClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise OutputClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ForPeople:
    """``sys.stdout`` or ``sys.stderr`` for the length of a command: what is written there is for
    people, so each control character in it is shown as its escape (:func:`visible`) whatever text
    Redis held, and whatever command prints it. Line breaks stay: values within a line were made
    visible by the tables and summaries already. ``raw`` is the stream itself, for the output of
    machines (:func:`machine_stream`) and the deliberate escapes of a progress line."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        self.raw.write(visible(text, keep_newlines=True))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def raw(stream: Any) -> Any:
    """The stream under :class:`ForPeople`: text written there as it is."""
    return getattr(stream, "raw", stream)


def machine_stream() -> Any:
    """Where machine output goes (JSON, JSON Lines, CSV): stdout, the text as it is. JSON writes
    its own escapes for control characters below 0x20; the rest is the data, kept exactly."""
    return raw(sys.stdout)


def print_json(data: Any) -> None:
    print(to_json(data), file=machine_stream())
