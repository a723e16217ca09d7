"""Logging shared by every ccexec process: one line per event, on stderr.

Lines read `ccexec.ROLE[PID] LEVEL event key=value ...`. Under systemd
(JOURNAL_STREAM is set) the timestamp is left out: journald adds its own.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def setup(role: str, level: str = "info", file: str | None = None, max_bytes: int = 0,
          backups: int = 0) -> logging.Logger:
    line = f"ccexec.{role}[%(process)d] %(levelname)s %(message)s"
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(stamp + line))
    handlers: list[logging.Handler] = [handler]
    if file:
        rotating = logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups)
        rotating.setFormatter(logging.Formatter("%(asctime)s " + line))
        handlers.append(rotating)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # websockets logs every HTTP response and close at INFO: noise here.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(f"ccexec.{role}")


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log one structured event line: `name key=value ...`."""
    if logger.isEnabledFor(level):
        pairs = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
        logger.log(level, f"{name} {pairs}".rstrip())
