"""A study the node reads but in which the network finds no heart: the job fails, no SEG is sent.

The node runs in-process with the shipped model; its destination is a DCMTK ``storescp``
on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from node_process import wait_until
from peers import STORESCP_AE
from studies import WEIGHTS, node_config, spect_like_volume

from config.schema import PeerSection
from node.audit import read_audit
from node.network import PeerAddress
from node.nm_writer import nifti_to_nm
from node.scu import send_datasets
from node.service import Node
from storage import JobState


@pytest.fixture
def node(tmp_path: Path, destination_scp: tuple[int, Path]) -> Iterator[Node]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    peers = [PeerSection(ae_title=STORESCP_AE, host="127.0.0.1", port=destination_scp[0])]
    running = Node.start(node_config(tmp_path / "node", peers=peers))
    yield running
    running.stop()


def test_a_study_without_a_heart_fails_its_job_and_sends_no_seg(
    tmp_path: Path, node: Node, destination_scp: tuple[int, Path]
) -> None:
    """Low Poisson noise on the SPECT grid: a valid reconstructed NM study in which there is no myocardium."""
    grid = spect_like_volume()
    noise = np.random.default_rng(20).poisson(3.0, grid.shape).astype(np.float32)
    study = nifti_to_nm(nib.Nifti1Image(noise, grid.affine), patient_name="Test^NoHeart", patient_id="NOHEART")
    outcome = send_datasets([study], PeerAddress("SPECTNODE", "127.0.0.1", node.port), "TESTSCU")
    assert outcome.all_succeeded, outcome  # stored and acknowledged: the node owes an answer
    series = str(study.SeriesInstanceUID)
    index = node.storage.index

    def job_finished() -> bool:
        jobs = index.jobs_for_series(series)
        return bool(jobs) and jobs[-1].state not in (JobState.QUEUED, JobState.RUNNING)

    wait_until(job_finished, 120, "the job of the noise study to finish")
    (job,) = index.jobs_for_series(series)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.reason == "NoMyocardiumError: no myocardium found in the volume; no SEG is made"
    assert index.instance(str(study.SOPInstanceUID)) is not None  # the study stays stored
    assert index.result_for_job(job.id) is None and not index.results(str(study.StudyInstanceUID))
    assert index.deliveries() == []  # nothing queued to send, now or later
    _, received = destination_scp
    assert list(received.iterdir()) == []
    (result,) = [record for record in read_audit(tmp_path / "node" / "audit.jsonl") if record["event"] == "job-result"]
    assert (result["state"], result["series_instance_uid"], result["patient_id"]) == ("failed", series, "NOHEART")
    assert "no myocardium found" in result["reason"] and "seg_sop_instance_uid" not in result


def test_a_job_failing_on_storage_is_retried_and_fails_only_after_its_last_attempt(
    tmp_path: Path, destination_scp: tuple[int, Path]
) -> None:
    """A file where the node's NIfTI folder goes makes every write there fail (a real OSError, as
    a full disk or an I/O error would): the job is retried after 1 s, then 2 s, and failed at
    its third attempt; once the cause is gone a retry completes the job and the SEG is sent."""
    peers = [PeerSection(ae_title=STORESCP_AE, host="127.0.0.1", port=destination_scp[0])]
    config = node_config(tmp_path / "node", "node.job_retry_delay=1", "node.job_max_attempts=3", peers=peers)
    running = Node.start(config)
    try:
        nifti = tmp_path / "node" / "nifti"
        nifti.rmdir()
        nifti.write_text("in the way")
        index = running.storage.index
        address = PeerAddress("SPECTNODE", "127.0.0.1", running.port)
        studies = [
            nifti_to_nm(spect_like_volume(), patient_name=f"Test^Disk{n}", patient_id=f"DISK{n}") for n in (1, 2)
        ]

        def last_job(study):  # noqa: ANN001, ANN202
            jobs = index.jobs_for_series(str(study.SeriesInstanceUID))
            return jobs[-1] if jobs else None

        assert send_datasets(studies[:1], address, "TESTSCU").all_succeeded
        wait_until(lambda: (job := last_job(studies[0])) is not None and job.state is JobState.FAILED, 60, "failure")
        failed = last_job(studies[0])
        assert failed is not None and failed.attempts == 3
        assert (
            failed.reason is not None
            and failed.reason.startswith("FileExistsError")
            and "attempt 3 of 3" in failed.reason
        )

        assert send_datasets(studies[1:], address, "TESTSCU").all_succeeded
        wait_until(
            lambda: (job := last_job(studies[1])) is not None and job.state is JobState.QUEUED and job.attempts >= 1,
            60,
            "a retry",
        )
        nifti.unlink()  # gone before the second attempt (1 s) or at worst the third (3 s)
        wait_until(lambda: (job := last_job(studies[1])) is not None and job.state is JobState.DONE, 60, "the retry")
        done = last_job(studies[1])
        assert (
            done is not None
            and 2 <= done.attempts <= 3
            and len(index.jobs_for_series(str(studies[1].SeriesInstanceUID))) == 1
        )
        wait_until(lambda: any(destination_scp[1].iterdir()), 60, "the SEG at the destination")
    finally:
        running.stop()
