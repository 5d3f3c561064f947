"""The node as a process (``spect-node serve``): readiness by C-ECHO, SIGTERM, kill -9, real DCMTK peers."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from studies import WEIGHTS, free_port, spect_like_volume

from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.standin_pacs import PACS_AE, StandInPacs
from storage import Index, JobState


def require_tool(name: str) -> str:
    """Path of a DCMTK/dicom3tools binary; a missing peer fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI (apt-get install dcmtk dicom3tools)")
        pytest.skip(f"{name} not installed")
    return path


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

    def start(self, timeout: float = 60.0) -> NodeProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
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


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StandInPacs]:
    server = StandInPacs(tmp_path / "pacs")
    yield server
    server.stop()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _write_study(tmp: Path, name: str) -> tuple[Path, str]:
    ds = nifti_to_nm(spect_like_volume(), patient_name=f"Test^{name}", patient_id=name)
    path = tmp / f"{name}.dcm"
    path.write_bytes(dataset_to_bytes(ds))
    return path, str(ds.SeriesInstanceUID)


def _storescu(port: int, path: Path) -> None:
    storescu = require_tool("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    result = subprocess.run(
        [storescu, "-R", "-aec", "SPECTNODE", "-aet", "STORESCU", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_storescu_in_seg_out_valid(tmp_path: Path, pacs: StandInPacs) -> None:
    """DCMTK storescu -R into the node; the SEG at the PACS passes dciodvfy; SIGTERM exits 0."""
    dciodvfy = require_tool("dciodvfy")
    node = NodeProcess(tmp_path, pacs.port).start()
    try:
        path, series = _write_study(tmp_path, "DCMTK1")
        _storescu(node.port, path)
        _wait(lambda: len(pacs.received) == 1, 120, "the SEG at the PACS")
    finally:
        assert node.kill(signal.SIGTERM) == 0, node.log.read_text()
    (seg_bytes,) = pacs.received.values()
    seg = dcmread(io.BytesIO(seg_bytes))
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(seg_bytes)
    check = subprocess.run([dciodvfy, str(seg_path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["convert", "infer", "encode"])
def test_kill9_mid_job_then_restart_completes(tmp_path: Path, pacs: StandInPacs, stage: str) -> None:
    """Killed at a stage of the job, the node restarts and sends exactly one SEG."""
    node = NodeProcess(tmp_path, pacs.port, test_pause_at=stage).start()
    path, series = _write_study(tmp_path, f"KILL{stage.upper()}")
    _storescu(node.port, path)  # acknowledged: the node now owes a SEG

    def job_running() -> bool:
        with node.index() as index:
            jobs = index.jobs_for_series(series)
            return bool(jobs) and jobs[-1].state == JobState.RUNNING

    _wait(job_running, 60, "the job to start")
    time.sleep(0.5)
    node.kill(signal.SIGKILL)
    assert not pacs.received
    restarted = NodeProcess(tmp_path, pacs.port, port=node.port).start()
    try:
        _wait(lambda: len(pacs.received) == 1, 120, "the SEG after restart")
        time.sleep(1.0)
        assert len(pacs.received) == 1
        with restarted.index() as index:
            (job,) = index.jobs_for_series(series)
            assert job.state == JobState.DONE and job.attempts == 2
    finally:
        restarted.kill(signal.SIGTERM)
