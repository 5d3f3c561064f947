"""Bad input against a running node: a clear DIMSE status or job error, a log line, the node stays up.

Instance-level problems are refused at C-STORE and nothing is written (0xC210 cannot
understand, 0xA900 data set does not match SOP class); association-level ones are
rejected (A-ASSOCIATE-RJ) or get no presentation context; series-level ones are
stored, their job ends ``failed`` with a reason naming the problem and the instance,
and no SEG is sent. A broken model fails jobs, not the node. Peers: pynetdicom (raw
bytes are sent with its chunked-dataset mode) and DCMTK echoscu/storescu.
"""

from __future__ import annotations

import io
import json
import logging
import re
import resource
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pynetdicom
import pytest
from peers import require_tool
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    Verification,
)
from studies import WEIGHTS, node_config, part10_bytes, spect_like_volume

from config.schema import PeerSection
from node.network import PeerAddress
from node.nm_writer import dataset_to_bytes, nifti_to_nm, nifti_to_nm_series
from node.scu import send_datasets
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs
from storage import Job, JobState

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # garbage input makes pydicom warn

NODE_AE = "SPECTNODE"
ALLOWED = ["TESTSCU", "STORESCU", "ECHOSCU"]
CANNOT_UNDERSTAND = 0xC210
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInPacs]:
    server = StandInPacs(tmp_path_factory.mktemp("pacs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: StandInPacs) -> Iterator[Node]:
    """One node for the module: allow list, 1 s idle timeouts (also for series short of their announced
    count: several cases send one odd slice), the shipped model loaded on first use."""
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    config = node_config(
        tmp_path_factory.mktemp("node"),
        "node.series_idle_timeout=1",
        "node.series_incomplete_timeout=1",
        f"node.allowed_calling_ae_titles=[{','.join(ALLOWED)}]",
        peers=[PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)],
    )
    running = Node.start(config, load_model=False)
    yield running
    running.stop()


# ---------------------------------------------------------------- helpers


def _study(name: str) -> Dataset:
    """A valid multi-frame NM RECON TOMO study the shipped model segments."""
    return nifti_to_nm(spect_like_volume(), patient_name=f"Bad^{name}", patient_id=name)


def _dataset_bytes(ds: Dataset) -> bytes:
    """The data set alone (no file meta), Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _raw_file(folder: Path, body: bytes, sop_class_uid: str, sop_instance_uid: str) -> Path:
    """A Part 10 file whose data set is ``body`` verbatim, for pynetdicom's chunked sending.

    The file meta gives the C-STORE request its SOP Class and Instance UIDs; the
    bytes after it go onto the wire unparsed, whatever they are.
    """
    path = folder / f"{sop_instance_uid}-{time.monotonic_ns()}.dcm"
    path.write_bytes(part10_bytes(body, sop_class_uid, sop_instance_uid))
    return path


def _associate(node: Node, calling: str = "TESTSCU", called: str = NODE_AE, contexts=(NuclearMedicineImageStorage,)):
    ae = AE(ae_title=calling)
    for sop_class in contexts:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", node.port, ae_title=called)


def _send_raw(node: Node, path: Path, monkeypatch: pytest.MonkeyPatch, contexts=(NuclearMedicineImageStorage,)) -> int:
    """C-STORE the file at ``path`` byte for byte; returns the DIMSE status."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = _associate(node, contexts=contexts)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert response, "no C-STORE response"
    return int(response.Status)


def _store_all(node: Node, datasets: list[Dataset]) -> None:
    outcome = send_datasets(datasets, PeerAddress(NODE_AE, "127.0.0.1", node.port), "TESTSCU")
    assert outcome.all_succeeded, outcome


def _final_job(node: Node, series_uid: str, timeout: float = 60.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.storage.index.jobs_for_series(series_uid)
        if jobs and jobs[-1].state in FINAL_STATES:
            return jobs[-1]
        time.sleep(0.1)
    raise AssertionError(f"the job of series {series_uid} did not finish in {timeout} s: {jobs}")


def _nothing_running(node: Node) -> None:
    assert not node.storage.index.jobs(state=JobState.RUNNING), "a job is stuck in running"


def _echo_ok(node: Node) -> bool:
    assoc = _associate(node, contexts=(Verification,))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def _audit_events(node: Node, event: str) -> list[dict]:
    path = node.config.node.audit_log or node.config.storage.root / "audit.jsonl"
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def _seg_sent_for(pacs: StandInPacs, series_uid: str) -> bool:
    for data in list(pacs.received.values()):
        seg = dcmread(io.BytesIO(data), stop_before_pixels=True)
        if str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid:
            return True
    return False


# ---------------------------------------------------------------- instance level: refused at C-STORE


def _not_dicom(ds: Dataset) -> bytes:
    return b"This is a text file, not a DICOM data set.\n" * 20


def _empty(ds: Dataset) -> bytes:
    return b""


def _cut_in_pixel_data(ds: Dataset) -> bytes:
    body = _dataset_bytes(ds)
    return body[: len(body) - 1000]


def _cut_one_byte_short(ds: Dataset) -> bytes:
    return _dataset_bytes(ds)[:-1]


def _cut_in_an_element_header(ds: Dataset) -> bytes:
    body = _dataset_bytes(ds)
    pixel_header = body.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010) tag, little endian
    return body[: pixel_header + 6]


@pytest.mark.parametrize(
    ("make_body", "message"),
    [
        (_not_dicom, "not a DICOM data set"),
        (_empty, "not a DICOM data set"),
        (_cut_in_pixel_data, r"element \(7FE0,0010\) holds \d+ of its \d+ bytes: the data set is truncated"),
        (_cut_one_byte_short, r"element \(7FE0,0010\) holds \d+ of its \d+ bytes: the data set is truncated"),
        (_cut_in_an_element_header, "ends 6 bytes into an element header: truncated"),
    ],
)
def test_undecodable_or_truncated_instance_is_refused_with_cannot_understand(
    node: Node,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_body: Callable[[Dataset], bytes],
    message: str,
) -> None:
    ds = _study("TRUNC")
    path = _raw_file(tmp_path, make_body(ds), NuclearMedicineImageStorage, str(ds.SOPInstanceUID))
    with caplog.at_level(logging.WARNING, logger="node.receiver"):
        status = _send_raw(node, path, monkeypatch)
    assert status == CANNOT_UNDERSTAND
    assert any(
        r.name == "node.receiver" and str(ds.SOPInstanceUID) in r.getMessage() and "0xC210" in r.getMessage()
        for r in caplog.records
    )
    assert caplog.records and re.search(message, caplog.text), caplog.text
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None  # nothing written
    assert node.storage.index.series(str(ds.SeriesInstanceUID)) is None
    assert _echo_ok(node)


def test_data_set_not_matching_the_request_is_refused(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An NM data set sent as CT, or under another SOP Instance UID: 0xA900, nothing stored."""
    ds = _study("MISMATCH")
    body = _dataset_bytes(ds)
    as_ct = _raw_file(tmp_path, body, CTImageStorage, str(ds.SOPInstanceUID))
    other_uid = _raw_file(tmp_path, body, NuclearMedicineImageStorage, generate_uid())
    with caplog.at_level(logging.WARNING, logger="node.receiver"):
        assert _send_raw(node, as_ct, monkeypatch, contexts=(CTImageStorage,)) == DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert _send_raw(node, other_uid, monkeypatch) == DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert f"SOP Class UID {NuclearMedicineImageStorage} is not the request's {CTImageStorage}" in caplog.text
    assert f"SOP Instance UID {ds.SOPInstanceUID} is not the request's" in caplog.text
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None
    refused = [e for e in _audit_events(node, "instance-refused") if e.get("status") == "0xA900"]
    assert len(refused) >= 2


def test_data_set_without_its_uids_is_refused(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = _study("NOUIDS")
    del ds.StudyInstanceUID
    path = _raw_file(tmp_path, _dataset_bytes(ds), NuclearMedicineImageStorage, str(ds.SOPInstanceUID))
    with caplog.at_level(logging.WARNING, logger="node.receiver"):
        assert _send_raw(node, path, monkeypatch) == CANNOT_UNDERSTAND
    assert "the data set has no StudyInstanceUID" in caplog.text
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None


# ---------------------------------------------------------------- association level


@pytest.mark.peers
@pytest.mark.parametrize(
    ("calling", "called", "diagnostic", "dcmtk_message"),
    [
        ("TESTSCU", "NOTTHENODE", 0x07, "Reason: Called AE Title Not Recognized"),
        ("INTRUDER", NODE_AE, 0x03, "Reason: Calling AE Title Not Recognized"),
    ],
)
def test_wrong_ae_titles_are_rejected(
    node: Node,
    caplog: pytest.LogCaptureFixture,
    calling: str,
    called: str,
    diagnostic: int,
    dcmtk_message: str,
) -> None:
    """A-ASSOCIATE-RJ permanent, by the service user, with the reason; seen by pynetdicom and echoscu."""
    assoc = _associate(node, calling=calling, called=called, contexts=(Verification,))
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, diagnostic)

    echoscu = require_tool("echoscu")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = subprocess.run(
            [echoscu, "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    assert dcmtk_message in result.stdout + result.stderr, result.stdout + result.stderr
    # Node side (echoscu is not pynetdicom, so these records are the node's own).
    assert f"association requested by {calling}" in caplog.text
    assert any(e.get("calling_ae") == calling for e in _audit_events(node, "association-rejected"))
    assert _echo_ok(node)


@pytest.mark.peers
def test_unsupported_sop_class_gets_no_presentation_context(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MR Image Storage is not offered: its context is rejected (abstract syntax not supported)."""
    assoc = _associate(node, contexts=(MRImageStorage,))
    assert not assoc.is_established  # pynetdicom gives up when no context is accepted
    ((context,),) = [assoc.rejected_contexts]
    assert context.abstract_syntax == MRImageStorage and context.result == 0x03

    ds = _study("MRSCU")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    path.write_bytes(dataset_to_bytes(ds))
    storescu = require_tool("storescu")
    with caplog.at_level(logging.INFO):
        result = subprocess.run(
            [storescu, "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"No presentation context for: (MR) {MRImageStorage}" in output
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None
    assert _echo_ok(node)


def test_stored_but_not_processed_sop_class_is_skipped(node: Node, pacs: StandInPacs) -> None:
    """A CT image (a class the node stores) is kept; its job is skipped with the reason; no SEG."""
    ds = _study("CTSTORED")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    _store_all(node, [ds])
    job = _final_job(node, str(ds.SeriesInstanceUID))
    assert job.state == JobState.SKIPPED and "CT is not emission tomography" in job.reason
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is not None
    assert not _seg_sent_for(pacs, str(ds.SeriesInstanceUID))


# ---------------------------------------------------------------- series level: kept, job failed


def _short_pixel_data(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _no_detector_information(ds: Dataset) -> None:
    del ds.DetectorInformationSequence


def _no_pixel_spacing(ds: Dataset) -> None:
    del ds.PixelSpacing


def _frames_inconsistent_with_slice_vector(ds: Dataset) -> None:
    ds.NumberOfFrames = int(ds.NumberOfFrames) - 3


def _one_voxel(ds: Dataset) -> None:
    ds.Rows = ds.Columns = ds.NumberOfFrames = 1
    ds.SliceVector = [1]
    ds.PixelData = ds.PixelData[:2]


def _declared_1024_cubed(ds: Dataset) -> None:
    """1024x1024x1024 16-bit voxels declared (2 GiB); the pixel data stays the original 0.4 MiB."""
    ds.Rows = ds.Columns = ds.NumberOfFrames = 1024
    ds.SliceVector = list(range(1, 1025))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_short_pixel_data, r"pixel data is 229376 bytes, shorter than rows\*cols\*frames = 64\*64\*56"),
        (_no_detector_information, "no DetectorInformationSequence: no geometry"),
        (_no_pixel_spacing, r"no PixelSpacing \(0028,0030\)"),
        (_frames_inconsistent_with_slice_vector, r"NumberOfFrames \(53\) is inconsistent with SliceVector \(56"),
        (_one_voxel, "declared volume 1x1x1 .* too small to segment"),
        (_declared_1024_cubed, "declared volume 1024x1024x1024 .* larger than the 134217728 voxels"),
    ],
)
def test_series_that_cannot_be_processed_is_kept_and_its_job_fails(
    node: Node,
    pacs: StandInPacs,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Dataset], None],
    reason: str,
) -> None:
    ds = _study(damage.__name__.strip("_")[:16].upper())
    damage(ds)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with caplog.at_level(logging.WARNING, logger="node.worker"):
        _store_all(node, [ds])  # accepted: 0x0000
        job = _final_job(node, str(ds.SeriesInstanceUID))
    assert job.state == JobState.FAILED, job
    assert job.reason.startswith(f"InvalidSeriesError: NM instance {ds.SOPInstanceUID}: "), job.reason
    assert re.search(reason, job.reason), job.reason
    assert f"job {job.id} series={ds.SeriesInstanceUID} failed: {job.reason}" in caplog.text
    record = node.storage.index.instance(str(ds.SOPInstanceUID))
    assert record is not None and node.storage.layout.resolve(record.path).is_file()  # kept
    assert not node.storage.index.results(str(ds.StudyInstanceUID))  # no SEG made...
    assert not _seg_sent_for(pacs, str(ds.SeriesInstanceUID))  # ...nor sent
    _nothing_running(node)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    assert grown_mib < 512, f"peak memory grew by {grown_mib:.0f} MiB"


def _small_slice_series(name: str) -> list[Dataset]:
    image = spect_like_volume()
    cropped = image.slicer[:, :, 20:32]  # 12 slices: quick to send one file each
    return nifti_to_nm_series(cropped, patient_name=f"Bad^{name}", patient_id=name)


def test_slice_series_with_an_inconsistent_file_is_kept_and_its_job_fails(node: Node, pacs: StandInPacs) -> None:
    files = _small_slice_series("SLICES")
    odd = files[5]
    odd.Rows = 60  # one file claims another matrix (its pixel data is long enough for it)
    _store_all(node, files)
    job = _final_job(node, str(files[0].SeriesInstanceUID))
    assert job.state == JobState.FAILED
    assert f"NM instance {odd.SOPInstanceUID}: inconsistent matrix: 60x64 vs 64x64" in job.reason
    assert len(node.storage.index.instances_for_series(str(files[0].SeriesInstanceUID))) == len(files)
    assert not _seg_sent_for(pacs, str(files[0].SeriesInstanceUID))
    _nothing_running(node)


def test_node_still_segments_a_good_study_after_bad_input(
    node: Node, pacs: StandInPacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input on the same association's heels; the next good study gets its SEG at the PACS."""
    bad = _study("BEFOREGOOD")
    _not_dicom_path = _raw_file(tmp_path, _not_dicom(bad), NuclearMedicineImageStorage, str(bad.SOPInstanceUID))
    assert _send_raw(node, _not_dicom_path, monkeypatch) == CANNOT_UNDERSTAND
    broken = _study("BROKEN")
    _no_detector_information(broken)
    good = _study("GOOD")
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", False)
    _store_all(node, [broken, good])
    assert _final_job(node, str(broken.SeriesInstanceUID)).state == JobState.FAILED
    job = _final_job(node, str(good.SeriesInstanceUID), timeout=180)
    assert job.state == JobState.DONE, job
    deadline = time.monotonic() + 60
    while not _seg_sent_for(pacs, str(good.SeriesInstanceUID)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _seg_sent_for(pacs, str(good.SeriesInstanceUID))
    _nothing_running(node)


# ---------------------------------------------------------------- worker exceptions


def _missing_model(folder: Path) -> Path:
    return folder / "no-such-model.pth"


def _corrupt_model(folder: Path) -> Path:
    path = folder / "corrupt.pth"
    path.write_bytes(b"these bytes are not a torch checkpoint" * 100)
    return path


@pytest.mark.parametrize("make_model", [_missing_model, _corrupt_model])
def test_unusable_model_fails_jobs_and_the_node_keeps_receiving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, make_model: Callable[[Path], Path]
) -> None:
    weights = make_model(tmp_path)
    config = node_config(tmp_path / "node", f"model.weights={weights}")
    with caplog.at_level(logging.ERROR):
        running = Node.start(config, load_model=True)  # the load fails: logged, the node starts anyway
    try:
        assert f"model unavailable ({weights})" in caplog.text
        first, second = _study("NOMODEL1"), _study("NOMODEL2")
        _store_all(running, [first])
        job = _final_job(running, str(first.SeriesInstanceUID))
        assert job.state == JobState.FAILED
        assert job.reason.startswith(f"RuntimeError: model unavailable ({weights}): "), job.reason
        _store_all(running, [second])  # still receiving after the failure
        assert _final_job(running, str(second.SeriesInstanceUID)).state == JobState.FAILED
        for ds in (first, second):
            assert running.storage.index.instance(str(ds.SOPInstanceUID)) is not None
        assert not running.storage.index.jobs(state=JobState.RUNNING)
        assert _echo_ok(running)
    finally:
        running.stop()


def test_worker_survives_an_index_error_between_jobs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The index failing once while claiming a job does not kill the worker thread."""
    config = node_config(tmp_path / "node", f"model.weights={tmp_path / 'absent.pth'}")
    running = Node.start(config, load_model=False)
    try:
        index = running.storage.index
        claim = index.claim_job
        failures = iter([sqlite3.OperationalError("database is locked (injected)")])

        def flaky_claim(*args, **kwargs):
            error = next(failures, None)
            if error is not None:
                raise error
            return claim(*args, **kwargs)

        index.claim_job = flaky_claim  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="node.worker"):
            ds = _study("AFTERERROR")
            _store_all(running, [ds])
            job = _final_job(running, str(ds.SeriesInstanceUID), timeout=30)
        assert "database is locked (injected)" in caplog.text
        assert job.state == JobState.FAILED and "model unavailable" in job.reason
        assert all(thread.is_alive() for thread in running.threads)
    finally:
        running.stop()
