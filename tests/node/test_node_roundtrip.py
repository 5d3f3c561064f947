"""In-process round trips: pynetdicom SCU -> the node -> a storage SCP standing in for the PACS."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from node_process import assert_one_seg_delivered
from pydicom import dcmread
from studies import WEIGHTS, free_port, node_config, spect_like_volume

from config.schema import PeerSection
from node.convert import series_to_nifti
from node.network import PeerAddress
from node.nm_writer import nifti_to_nm, nifti_to_nm_series, nifti_to_pet_like_series
from node.scu import send_datasets
from node.seg_encode import read_seg_mask
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs
from storage import JobState
from storage.records import DeliveryRecord, DeliveryState


@pytest.fixture
def node(tmp_path: Path, pacs: StandInPacs) -> Iterator[Node]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)]
    # one-slice-per-file series announce no count and complete after this idle time: 3 s keeps a sender that
    # stalls on a busy machine from completing half a series (whose SEG the tests would then read)
    config = node_config(tmp_path / "node", "node.series_idle_timeout=3", peers=peers)
    running = Node.start(config)
    yield running
    running.stop()


def _send(node: Node, datasets) -> None:
    outcome = send_datasets(datasets, PeerAddress("SPECTNODE", "127.0.0.1", node.port), "TESTSCU")
    assert outcome.all_succeeded, outcome


def _seg_for(pacs: StandInPacs, series_uid: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for data in list(pacs.received.values()):
            seg = dcmread(io.BytesIO(data))
            if str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid:
                return seg, data
        time.sleep(0.1)
    raise AssertionError(f"no SEG for series {series_uid} within {timeout} s")


def _check_seg_on_same_voxels(node: Node, datasets, seg_bytes: bytes) -> np.ndarray:
    """The SEG read back equals the model's mask on the converted source grid, voxel for voxel."""
    converted = series_to_nifti(datasets)
    expected = (
        node.worker.predictor_factory()
        .predict_array(np.asarray(converted.image.dataobj, dtype=np.float32), converted.image.affine)
        .mask
    )
    got = read_seg_mask(seg_bytes, converted.references)
    assert got.shape == expected.shape
    assert np.array_equal(got.astype(bool), expected.astype(bool))
    assert got.sum() > 50
    return got


@pytest.mark.parametrize(("kind", "negative"), [("axial", False), ("axial", True), ("oblique", False)])
def test_nm_multiframe(node: Node, pacs: StandInPacs, kind: str, negative: bool) -> None:
    source = nifti_to_nm(spect_like_volume(kind), negative_spacing=negative, patient_name="Test^NM", patient_id="NM1")
    _send(node, [source])
    seg, data = _seg_for(pacs, str(source.SeriesInstanceUID))
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID
    assert int(seg.SeriesNumber) == node.config.node.seg_series_number
    assert "RESEARCH USE ONLY" in seg.SeriesDescription and "RESEARCH USE ONLY" in seg.ContentDescription
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "49848007"
    roundtrip = dcmread(io.BytesIO(data))
    _check_seg_on_same_voxels(node, [dcmread(io.BytesIO(_bytes(source)))], data)
    assert roundtrip.SOPInstanceUID == seg.SOPInstanceUID


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_nm_one_slice_per_file(node: Node, pacs: StandInPacs) -> None:
    files = nifti_to_nm_series(spect_like_volume(), patient_name="Test^Slices", patient_id="NM2")
    _send(node, files)
    seg, data = _seg_for(pacs, str(files[0].SeriesInstanceUID))
    _check_seg_on_same_voxels(node, [dcmread(io.BytesIO(_bytes(f))) for f in files], data)


def test_pet_like_series(node: Node, pacs: StandInPacs) -> None:
    files = nifti_to_pet_like_series(spect_like_volume(), modality="NM", patient_name="Test^Pet", patient_id="PT1")
    _send(node, files)
    seg, data = _seg_for(pacs, str(files[0].SeriesInstanceUID))
    _check_seg_on_same_voxels(node, [dcmread(io.BytesIO(_bytes(f))) for f in files], data)


def test_non_spect_series_is_stored_not_processed(node: Node, pacs: StandInPacs) -> None:
    projection = nifti_to_nm(spect_like_volume(), patient_name="Test^Proj", patient_id="NM3")
    projection.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]  # raw projections
    _send(node, [projection])
    series = str(projection.SeriesInstanceUID)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = node.storage.index.jobs_for_series(series)
        if jobs and jobs[-1].state == JobState.SKIPPED:
            break
        time.sleep(0.1)
    jobs = node.storage.index.jobs_for_series(series)
    assert jobs and jobs[-1].state == JobState.SKIPPED and jobs[-1].reason
    assert node.storage.index.instance(str(projection.SOPInstanceUID)) is not None
    assert not node.storage.index.results(str(projection.StudyInstanceUID))


def _wait_all_delivered(node: Node, timeout: float = 30.0) -> None:
    """Until every delivery is recorded ``done`` (the node records the PACS's acknowledgement after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = node.storage.index.deliveries()
        if deliveries and all(d.state == DeliveryState.DONE for d in deliveries):
            return
        time.sleep(0.05)
    raise AssertionError(f"deliveries not done: {node.storage.index.deliveries()}")


def _one_seg_delivered_once(node: Node, source) -> DeliveryRecord:
    """:func:`assert_one_seg_delivered` after ``sweep_idle(0)``, which completes now whatever the idle
    sweep would complete later: no series is left to make a second job."""
    assert node.receiver.sweep_idle(idle_timeout=0.0) == []
    return assert_one_seg_delivered(node.storage.index, source)


def test_resent_instance_is_idempotent(node: Node, pacs: StandInPacs) -> None:
    source = nifti_to_nm(spect_like_volume(), patient_name="Test^Twice", patient_id="NM4")
    _send(node, [source])
    _seg_for(pacs, str(source.SeriesInstanceUID))
    _wait_all_delivered(node)
    _send(node, [source])  # acknowledged after the node decided: stored unchanged, no new job
    assert len(node.storage.index.instances_for_series(str(source.SeriesInstanceUID))) == 1
    delivery = _one_seg_delivered_once(node, source)
    assert delivery.attempts == 1 and len(pacs.received) == 1


def test_destination_down_then_up(tmp_path: Path) -> None:
    port = free_port()
    peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=port)]
    config = node_config(tmp_path / "node", "node.send_backoff_base=0.5", "node.send_backoff_max=1", peers=peers)
    running = Node.start(config)
    try:
        source = nifti_to_nm(spect_like_volume(), patient_name="Test^Down", patient_id="NM5")
        _send(running, [source])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failed_attempts = [d for d in running.storage.index.deliveries() if d.attempts >= 2]
            if failed_attempts:
                break
            time.sleep(0.1)
        assert failed_attempts, "the node should have tried (and failed) to deliver while the PACS was down"
        pacs = StandInPacs(tmp_path / "pacs", port=port)
        try:
            seg, _ = _seg_for(pacs, str(source.SeriesInstanceUID), timeout=30)
            _wait_all_delivered(running)
            delivery = _one_seg_delivered_once(running, source)
            assert delivery.attempts >= 3  # failed while the PACS was down, then delivered
            assert len(pacs.received) == 1  # one object, however many attempts
        finally:
            pacs.stop()
    finally:
        running.stop()
