"""structlog set-up: readable lines on a terminal, one JSON object per line otherwise.

Writing a log line must never stop the archiving: when stderr cannot be written (its disk is
full, its reader went away), lines are dropped and counted, and the count is reported once
writing works again.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog
import structlog.tracebacks

from archiver.output import visible

# Tracebacks as JSON, without the frames' local variables (structlog's default shows them): they
# hold what the archiver was handling, command lines and passwords included, and can be big.
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class SafeLogger:
    """structlog's print logger, without ever raising: a failed write is counted, not fatal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.dropped = 0

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                if self.dropped:
                    self._stream.write(f'{{"event": "log.lines_dropped", "count": {self.dropped}}}\n')
                    self.dropped = 0
                self._stream.write(message + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # ValueError: the stream was closed
                self.dropped += 1

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class SafeLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = SafeLogger(stream)

    def __call__(self, *args: Any) -> SafeLogger:
        return self._logger


def _visible_text(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """The console's lines are read on a terminal: the event's text values (a key, a name from
    Redis) with each control character shown as its escape. JSON lines escape them by JSON's rules."""
    return {k: visible(v) if isinstance(v, str) else v for k, v in event.items()}


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process; logs go to stderr."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [_TRACEBACKS, structlog.processors.JSONRenderer()]
    else:
        processors += [
            _visible_text,
            structlog.dev.ConsoleRenderer(colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=SafeLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
