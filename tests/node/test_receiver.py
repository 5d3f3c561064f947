"""Series assembly in the receiver: complete on the announced count, on idle time, or after a longer wait."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from load_scenario import half_resolution
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from studies import spect_like_volume

from node.nm_writer import dataset_to_bytes, nifti_to_nm_series, nifti_to_pet_like_series
from node.receiver import Receiver
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
