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


def test_text_lines_cannot_be_forged_by_a_peer(capsys: pytest.CaptureFixture[str]) -> None:
    """A SOP Instance UID sent by a peer with a line break in it (pynetdicom checks only its length)."""
    configure_logging()
    forged = "1.2.3\n2026-01-01 00:00:00,000 INFO node.x: FORGED"
    logging.getLogger("node.receiver").warning("C-STORE %s from %s refused", forged, "ATTACKER")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("node.worker").exception("job %d failed", 7)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("C-STORE 1.2.3\\n2026-01-01 00:00:00,000 INFO node.x: FORGED from ATTACKER refused")
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "Traceback" in lines[2] and lines[-1] == "ValueError: boom"  # tracebacks keep their lines
    logging.getLogger("pydicom").warning("Invalid value for VR DA: '1961-07-04'")  # values of patient data
    assert capsys.readouterr().err == ""
