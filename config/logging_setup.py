"""Logging set-up for the command-line entry points (libraries only get loggers)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonLineFormatter(logging.Formatter):
    """One JSON object per event: time (UTC, ISO 8601), level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


class OneLineFormatter(logging.Formatter):
    """Plain text, one line per event: line breaks in a message (a UID or title sent by a peer)
    are escaped, so no peer can forge a log line. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)


def configure_logging(verbose: bool = False, json_lines: bool = False) -> None:
    """One line per event on stderr: plain text (time, level, logger, message) or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLineFormatter() if json_lines else OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("matplotlib", "PIL", "pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
    # pydicom's value warnings quote the value ("Invalid value for VR DA: '1961-07-04'"): patient data
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, logging.getLogger("pydicom").level))
