"""The node as a process (``spect-node serve``): readiness by C-ECHO, SIGTERM, kill -9, real DCMTK peers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from node_process import NodeProcess, wait_until
from peers import require_tool
from pydicom import dcmread
from studies import free_port, spect_like_volume

from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.standin_pacs import StandInPacs
from storage import JobState
from storage.records import DeliveryState


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
        wait_until(lambda: len(pacs.received) == 1, 120, "the SEG at the PACS")
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

    wait_until(job_running, 60, "the job to start")
    paused = f"test-only pause at stage '{stage}'"
    wait_until(lambda: paused in node.log.read_text(), 60, f"the job to reach the {stage} stage")
    node.kill(signal.SIGKILL)
    assert not pacs.received
    restarted = NodeProcess(tmp_path, pacs.port, port=node.port).start()
    try:
        wait_until(lambda: len(pacs.received) == 1, 120, "the SEG after restart")
        with restarted.index() as index:
            wait_until(
                lambda: all(d.state == DeliveryState.DONE for d in index.deliveries()), 60, "the delivery recorded"
            )
            (job,) = index.jobs_for_series(series)  # the job re-run, not a second job
            assert job.state == JobState.DONE and job.attempts == 2
            result = index.result_for_job(job.id)
            assert result is not None and len(index.results()) == 1
            (delivery,) = index.deliveries()
            assert (delivery.result_id, delivery.attempts) == (result.id, 1)
        assert len(pacs.received) == 1
    finally:
        restarted.kill(signal.SIGTERM)


def test_serve_says_when_it_has_no_model(tmp_path: Path) -> None:
    """A weights path that does not resolve (a service started from another directory): the node
    still receives, and its one start-up line says that every job will fail."""
    node = NodeProcess(tmp_path, pacs_port=free_port())
    config = yaml.safe_load(node.config_path.read_text())
    config["model"]["weights"] = "models/unet3d_weights.pth"  # relative: not under tmp_path
    node.config_path.write_text(yaml.safe_dump(config))
    node.start(cwd=tmp_path)
    try:

        def start_up_lines() -> list[str]:
            return [ln for ln in node.log.read_text().splitlines() if ln.startswith("spect-node SPECTNODE listening")]

        wait_until(start_up_lines, 30, "the start-up line")
        (line,) = start_up_lines()
        assert "NO MODEL, every job fails until it loads: model unavailable (models/unet3d_weights.pth)" in line
    finally:
        assert node.kill(signal.SIGTERM) == 0
