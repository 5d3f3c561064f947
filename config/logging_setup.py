"""Logging set-up for the command-line entry points (libraries only get loggers)."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbose: bool = False) -> None:
    """One line per event on stderr: time, level, logger, message (debug level when ``verbose``)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("matplotlib", "PIL", "pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
