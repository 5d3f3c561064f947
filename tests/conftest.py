"""Fixtures for the whole suite."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Undo what a CLI entry point called in-process did to the root logger.

    ``configure_logging`` binds a handler to the ``sys.stderr`` of the moment, which is
    pytest's capture stream and closed after the test: later tests' log lines would be
    lost ("I/O operation on closed file") instead of captured.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
