"""structlog set-up for the front doors (the library itself only logs, never configures)."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]


def configure_logging(*, log_format: LogFormat = "console", level: str = "warning") -> None:
    """Send structured logs to stderr, as readable lines or as JSON lines."""
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            exceptions_without_source_on_filtered_threads,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def exceptions_without_source_on_filtered_threads(
    _logger: object, _method: str, event_dict: structlog.types.EventDict,
) -> structlog.types.EventDict:
    """On a thread whose seccomp filter refuses to open files (a vCPU or device I/O
    thread), render the traceback from the frames alone: the usual rendering reads each
    frame's source line, and that open would kill the process in kill mode."""
    exc_info = event_dict.get("exc_info")
    if not exc_info:
        return event_dict
    from .isolation.seccomp import thread_filter_kind
    from .isolation.syscalls import ALLOWED

    kind = thread_filter_kind()
    if kind is None or "openat" in ALLOWED[kind]:
        return event_dict
    error = (sys.exc_info()[1] if exc_info is True else exc_info[1]
             if isinstance(exc_info, tuple) else exc_info)
    del event_dict["exc_info"]
    if isinstance(error, BaseException):
        event_dict["exception"] = _traceback_from_frames(error)
    return event_dict


def _traceback_from_frames(error: BaseException) -> str:
    lines = ["Traceback (source lines left out on a filtered thread):"]
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
        tb = tb.tb_next
    lines.append(f"{type(error).__name__}: {error}")
    return "\n".join(lines)


class _StderrLogger:
    """Writes each rendered line to whatever ``sys.stderr`` is at that moment, and never
    lets a failing sink (a closed terminal, a closed pipe) raise into a vCPU thread."""

    def msg(self, message: str) -> None:
        try:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrLoggerFactory:
    def __call__(self, *args: object) -> _StderrLogger:
        return _StderrLogger()
