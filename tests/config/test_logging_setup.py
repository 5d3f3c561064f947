"""The CLIs' log output: one line per event, optionally JSON."""

from __future__ import annotations

import json
import logging

import pytest

from config.logging_setup import configure_logging


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(json_lines=True)
    logging.getLogger("node.receiver").info("received %s series=%s", "1.2.3", "1.2.4")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("node.worker").exception("job %d failed", 7)
    lines = capsys.readouterr().err.strip().splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["message"] == "received 1.2.3 series=1.2.4" and events[0]["logger"] == "node.receiver"
    assert events[1]["level"] == "ERROR" and "ValueError: boom" in events[1]["exception"]
    assert all(e["time"].endswith("Z") for e in events)
    configure_logging()
