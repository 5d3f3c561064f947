"""Series assembly in the receiver: complete on the announced count, on idle time, or after a longer wait.

Also what a sender sees (DCMTK ``storescu``) when the node cannot write an instance for a
reason other than a full disk.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from load_scenario import half_resolution
from peers import require_tool
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian
from studies import node_config, spect_like_volume

from node.audit import read_audit
from node.nm_writer import dataset_to_bytes, nifti_to_nm_series, nifti_to_pet_like_series
from node.receiver import Receiver
from node.service import Node
from storage import Storage

IDLE, INCOMPLETE = 5.0, 120.0
PATIENT = {"patient_name": "Assembly^Test", "patient_id": "ASM001"}


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    with Storage.open(tmp_path / "store") as storage:
        yield Receiver(storage)


def _store(receiver: Receiver, datasets: list[Dataset]) -> float:
    """C-STORE each data set in-process; returns the time just after the last one."""
    for ds in datasets:
        status = receiver.store(dataset_to_bytes(ds), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "SCU")
        assert status == 0x0000
    return time.time()


def _jobs(receiver: Receiver) -> list[str]:
    return [job.series_instance_uid for job in receiver.storage.index.jobs()]


def _counted_series() -> list[Dataset]:
    """A single-frame series that announces its slice count (NumberOfSlices, 28)."""
    return nifti_to_pet_like_series(half_resolution(spect_like_volume()), modality="NM", **PATIENT)


def test_series_completes_when_its_announced_count_is_in(receiver: Receiver) -> None:
    series = _counted_series()
    _store(receiver, series[:-1])
    assert _jobs(receiver) == []
    last = _store(receiver, series[-1:])
    assert _jobs(receiver) == [series[0].SeriesInstanceUID]  # no waiting
    assert receiver.sweep_idle(IDLE, now=last + IDLE + 1, incomplete_timeout=INCOMPLETE) == []


def test_series_short_of_its_count_waits_longer_then_is_processed_with_a_warning(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    series = _counted_series()
    last = _store(receiver, series[:-3])  # the sender stalls before the last three slices
    assert receiver.sweep_idle(IDLE, now=last + IDLE + 1, incomplete_timeout=INCOMPLETE) == []
    assert receiver.sweep_idle(IDLE, now=last + INCOMPLETE - 1, incomplete_timeout=INCOMPLETE) == []
    assert _jobs(receiver) == []
    last = _store(receiver, series[-3:-1])  # two more arrive: still short, the wait starts again
    assert receiver.sweep_idle(IDLE, now=last + INCOMPLETE - 1, incomplete_timeout=INCOMPLETE) == []
    with caplog.at_level(logging.WARNING, logger="node.receiver"):
        done = receiver.sweep_idle(IDLE, now=last + INCOMPLETE + 1, incomplete_timeout=INCOMPLETE)
    assert done == _jobs(receiver) == [series[0].SeriesInstanceUID]
    assert "with 27 of its 28 announced instances" in caplog.text


def test_series_without_a_count_completes_after_the_idle_time(receiver: Receiver) -> None:
    series = nifti_to_nm_series(half_resolution(spect_like_volume()), **PATIENT)  # NM one slice per file: no count
    last = _store(receiver, series)
    assert _jobs(receiver) == []
    assert receiver.sweep_idle(IDLE, now=last + IDLE - 1, incomplete_timeout=INCOMPLETE) == []
    assert receiver.sweep_idle(IDLE, now=last + IDLE + 1, incomplete_timeout=INCOMPLETE) == [
        series[0].SeriesInstanceUID
    ]
    assert _jobs(receiver) == [series[0].SeriesInstanceUID]


def _storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    """``storescu -v``: its log names the status of each C-STORE response."""
    timeouts = ["-to", "30", "-ta", "30", "-td", "30"]  # guards against a hang
    command = [require_tool("storescu"), "-v", "-aet", "STORESCU", "-aec", "SPECTNODE", *timeouts]
    return subprocess.run([*command, "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.peers
def test_a_failed_write_is_answered_out_of_resources_and_the_node_takes_the_retry(
    tmp_path: Path, stop_later: list
) -> None:
    # one slice of a series announcing 28, and long waits: no job starts, so no model is needed
    waits = ["node.series_idle_timeout=3600", "node.series_incomplete_timeout=3600"]
    node = Node.start(node_config(tmp_path / "node", *waits), load_model=False)
    stop_later.append(node)
    accepted, refused = _counted_series()[0], _counted_series()[0]  # two studies
    paths = {}
    for name, ds in (("accepted", accepted), ("refused", refused)):
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(dataset_to_bytes(ds))
    first = _storescu(node.port, paths["accepted"])
    assert first.returncode == 0, first.stdout + first.stderr

    # a regular file where the study's folder goes: mkdir fails (EEXIST), as it would for a
    # folder the node may not write to (chmod does not stop root, under which tests may run)
    obstacle = node.storage.layout.dicom_dir / str(refused.StudyInstanceUID)
    obstacle.write_bytes(b"")
    result = _storescu(node.port, paths["refused"])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Received Store Response (Refused: OutOfResources)" in output, output  # 0xA700
    assert node.storage.index.instance(str(refused.SOPInstanceUID)) is None
    (event,) = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "instance-refused"]
    assert event["status"] == "0xA700" and event["sop_instance_uid"] == str(refused.SOPInstanceUID)
    assert event["reason"].startswith("cannot store") and str(refused.StudyInstanceUID) in event["reason"]

    obstacle.unlink()  # the cause is removed: the sender's retry goes through on the same node
    retry = _storescu(node.port, paths["refused"])
    assert retry.returncode == 0, retry.stdout + retry.stderr
    for ds in (accepted, refused):  # nothing accepted before the failure was lost
        record = node.storage.index.instance(str(ds.SOPInstanceUID))
        assert record is not None
        assert dcmread(node.storage.layout.resolve(record.path)).SOPInstanceUID == ds.SOPInstanceUID
    assert node.storage.index.jobs() == []
