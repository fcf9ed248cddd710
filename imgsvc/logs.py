"""Process logging: plain text lines on a terminal, one JSON object per line otherwise (or as
`IMGSVC_LOG_FORMAT` says). Set up once by the CLI entry point, never by library code.

A record's `extra={...}` fields become keys of its JSON object (the request line of
routes/observe.py carries request_id, key_id, method, route, status, model, duration_ms,
credits); callers never pass secrets there.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Literal

LogFormat = Literal["auto", "text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Attributes every LogRecord has (and uvicorn's ANSI-coloured copy of its message); anything
# else on a record came from `extra`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_STANDARD |= {"color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, the record's
    `extra` fields, and `exc` (the traceback) when it carries one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve(log_format: LogFormat, stream: IO[str]) -> Literal["text", "json"]:
    """`auto`: text when `stream` is a terminal, JSON otherwise (a file, a pipe, a collector)."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure(log_format: LogFormat = "auto", *, level: int = logging.INFO) -> None:
    """Send every logger's records (uvicorn's and Celery's included, as they propagate) to
    stderr in the chosen format, replacing any handler set up before."""
    stream = sys.stderr
    handler = logging.StreamHandler(stream)
    if resolve(log_format, stream) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
