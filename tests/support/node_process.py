"""The node as a process for the tests: ``spect-node serve`` with its own config file, C-ECHO readiness."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from studies import WEIGHTS, free_port

from node.standin_pacs import PACS_AE
from storage import Index, JobState
from storage.records import DeliveryRecord, DeliveryState


class NodeProcess:
    """``spect-node serve`` in a subprocess with its own config file."""

    def __init__(self, tmp: Path, pacs_port: int, port: int | None = None, **node_settings: object) -> None:
        if not WEIGHTS.is_file():
            pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
        self.port = port or free_port()
        self.root = tmp / "node"
        self.config_path = tmp / "node.yaml"
        config = {
            "node": {"port": self.port, "series_idle_timeout": 1, "min_free_bytes": 0, **node_settings},
            "peers": [{"ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port}],
            "storage": {"root": str(self.root)},
            "model": {"weights": str(WEIGHTS), "device": "cpu"},
        }
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = tmp / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, cwd: Path | None = None) -> NodeProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            if echo(self.port):
                return self
            time.sleep(0.2)
        raise AssertionError(f"node not answering C-ECHO after {timeout} s:\n{self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def index(self) -> Index:
        return Index.open(self.root / "index.sqlite3")


def echo(port: int) -> bool:
    ae = AE(ae_title="TESTECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    ae.connection_timeout = 1
    assoc = ae.associate("127.0.0.1", port, ae_title="SPECTNODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_one_seg_delivered(index: Index, source: Dataset) -> DeliveryRecord:
    """The source's series has exactly one job, done, one result and one delivery of it, done; returns the delivery.

    A duplicate job (a second SEG on its way) shows as a second job, result or delivery.
    """
    (job,) = index.jobs_for_series(str(source.SeriesInstanceUID))
    assert job.state == JobState.DONE
    result = index.result_for_job(job.id)
    assert result is not None
    assert [r.id for r in index.results(str(source.StudyInstanceUID))] == [result.id]
    (delivery,) = index.deliveries()
    assert delivery.result_id == result.id and delivery.state == DeliveryState.DONE
    return delivery
