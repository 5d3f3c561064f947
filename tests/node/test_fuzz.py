"""Fuzzing the NM reader and the C-STORE path with hypothesis-generated input.

Properties:

* the NM reader (and the series dispatch) either converts a dataset or raises one of
  the node's documented errors (:class:`~node.errors.InvalidSeriesError`,
  :class:`~node.errors.UnsupportedSeriesError`), whatever the header or pixel bytes
  hold, and never allocates much more memory than the input;
* every byte string or mutated dataset handed to the C-STORE sink gets a DIMSE status
  (never an exception), and every job it queues ends ``done``, ``failed`` or
  ``skipped``: none is left ``running``.

Values are fuzzed as raw bytes in Implicit VR files, so the reader sees what a real
file with that content decodes to (a VR of US holding 2 random bytes, a DS holding
``nan\\1``...). Examples are bounded and derandomised: the file runs in seconds and CI
sees the same examples on every run.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pynetdicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from studies import node_config, part10_bytes

from node.convert import series_to_nifti
from node.errors import InvalidSeriesError, UnsupportedSeriesError
from node.nm_reader import NM_IMAGE_STORAGE, read_nm_multiframe, read_nm_series
from node.nm_writer import nifti_to_nm, nifti_to_nm_series
from node.receiver import Receiver
from node.service import Node
from node.worker import SegmentationWorker, WorkerSettings
from seg.model import UNetSpec
from storage import Job, JobState, Storage

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DOCUMENTED_ERRORS = (InvalidSeriesError, UnsupportedSeriesError)
PEAK_MEMORY_LIMIT = 32 * 2**20  # bytes; inputs are a few kB, a 0.5 GiB volume must never be allocated

SHAPE = (10, 9, 8)  # (columns, rows, slices): the smallest volume the reader accepts is 8 per axis

# Elements whose raw bytes are fuzzed, top level and inside DetectorInformationSequence[0].
TOP_LEVEL_TAGS = {
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "NumberOfFrames": 0x00280008,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "SamplesPerPixel": 0x00280002,
    "PixelSpacing": 0x00280030,
    "SliceThickness": 0x00180050,
    "SpacingBetweenSlices": 0x00180088,
    "SliceVector": 0x00540080,
    "RescaleSlope": 0x00281053,
    "RescaleIntercept": 0x00281052,
    "ImageType": 0x00080008,
    "SeriesInstanceUID": 0x0020000E,
    "FrameIncrementPointer": 0x00280009,
}
DETECTOR_TAGS = {"ImagePositionPatient": 0x00200032, "ImageOrientationPatient": 0x00200037}
PIXEL_DATA_TAG = 0x7FE00010

INTERESTING_VALUES = [
    b"",
    b" ",
    b"0",
    b"-1",
    b"1",
    b"8",
    b"16",
    b"65535",
    b"2147483648",
    b"nan",
    b"inf",
    b"-inf",
    b"1e308",
    b"1e-320",
    b"abc",
    b"1\\2",
    b"0\\0",
    b"4.5\\-4.5",
    b"1\\0\\0\\0\\1\\0",
    b"1\\0\\0\\1\\0\\0",
    b"nan\\0\\0\\0\\1\\0",
    b"ORIGINAL\\PRIMARY\\RECON TOMO\\EMISSION",
    b"ORIGINAL\\PRIMARY\\RECON GATED TOMO",
    b"\x00\x00",
    b"\xff\xff",
    b"\x01\x00",
    b"\x00\x04",
    b"\x10\x00\x00\x00",
]


def _float_text(values: list[float]) -> bytes:
    return "\\".join(repr(v) for v in values).encode()


RAW_VALUES = st.one_of(
    st.sampled_from(INTERESTING_VALUES),
    st.binary(max_size=12),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=7).map(_float_text),
    st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=10).map(lambda v: "\\".join(map(str, v)).encode()),
)


@st.composite
def element_edit(draw: st.DrawFn, tags: dict[str, int]) -> tuple[int, bytes | None]:
    """``(tag, raw value)`` to write, or ``(tag, None)`` to delete the element."""
    tag = draw(st.sampled_from(sorted(tags.values())))
    return tag, draw(st.none() | RAW_VALUES)


@st.composite
def pixel_edit(draw: st.DrawFn) -> str | bytes:
    """``"keep"``, ``"delete"``, ``"truncate"``, ``"extend"`` or random bytes for PixelData."""
    return draw(st.sampled_from(["keep", "delete", "truncate", "extend"]) | st.binary(max_size=4096))


@dataclass(frozen=True)
class DatasetEdits:
    """What to change in one valid dataset before encoding it."""

    top_level: list[tuple[int, bytes | None]]
    detector: list[tuple[int, bytes | None]]
    detector_sequence: str  # "keep", "delete", "empty", "two-items"
    pixels: str | bytes


DATASET_EDITS = st.builds(
    DatasetEdits,
    top_level=st.lists(element_edit(TOP_LEVEL_TAGS), max_size=4),
    detector=st.lists(element_edit(DETECTOR_TAGS), max_size=2),
    detector_sequence=st.sampled_from(["keep", "keep", "keep", "delete", "empty", "two-items"]),
    pixels=pixel_edit(),
)


def _set_raw(ds: Dataset, tag: int, raw: bytes | None) -> None:
    """Write ``raw`` as the value bytes of ``tag`` (delete it for None).

    In an Implicit VR file the VR is not encoded, so on reading the value is decoded
    with the dictionary VR, exactly as a file holding those bytes would be.
    """
    if raw is None:
        if tag in ds:
            del ds[tag]
        return
    ds[tag] = DataElement(tag, "OB", raw)


def apply_edits(ds: Dataset, edits: DatasetEdits) -> Dataset:
    """The dataset with ``edits`` applied (in place), ready to encode."""
    for tag, raw in edits.top_level:
        _set_raw(ds, tag, raw)
    if "DetectorInformationSequence" in ds and ds.DetectorInformationSequence:
        for tag, raw in edits.detector:
            _set_raw(ds.DetectorInformationSequence[0], tag, raw)
    if edits.detector_sequence == "delete" and "DetectorInformationSequence" in ds:
        del ds.DetectorInformationSequence
    elif edits.detector_sequence == "empty":
        ds.DetectorInformationSequence = Sequence([])
    elif edits.detector_sequence == "two-items" and "DetectorInformationSequence" in ds:
        ds.DetectorInformationSequence.append(Dataset())
    pixels = ds.get("PixelData")
    if edits.pixels == "delete":
        if "PixelData" in ds:
            del ds.PixelData
    elif edits.pixels == "truncate" and pixels:
        ds.PixelData = pixels[: len(pixels) // 3]
    elif edits.pixels == "extend" and pixels:
        ds.PixelData = pixels + pixels[:64]
    elif isinstance(edits.pixels, bytes):
        ds[PIXEL_DATA_TAG] = DataElement(PIXEL_DATA_TAG, "OB", edits.pixels)
    return ds


def encode_implicit(ds: Dataset) -> bytes:
    """Part 10 bytes in Implicit VR Little Endian (raw values keep their bytes)."""
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def decode(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=True)


@functools.lru_cache(maxsize=1)
def _volume() -> nib.Nifti1Image:
    data = np.random.default_rng(11).uniform(0.0, 100.0, SHAPE).astype(np.float32)
    affine = np.diag([-4.0, -4.5, 5.0, 1.0])
    affine[:3, 3] = [20.0, -10.0, 30.0]
    return nib.Nifti1Image(data, affine)


@functools.lru_cache(maxsize=1)
def multiframe_bytes() -> bytes:
    return encode_implicit(nifti_to_nm(_volume(), patient_name="Fuzz^Reader", patient_id="FUZZ1"))


@functools.lru_cache(maxsize=1)
def slice_file_bytes() -> tuple[bytes, ...]:
    return tuple(
        encode_implicit(ds) for ds in nifti_to_nm_series(_volume(), patient_name="Fuzz^Slices", patient_id="FUZZ2")
    )


@pytest.fixture(autouse=True)
def _quiet_readers(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Keep hundreds of expected warnings out of the report (they are not what is tested here)."""
    caplog.set_level(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _within_memory_budget(read, *args):
    """``read(*args)`` under tracemalloc; fails if the peak exceeds :data:`PEAK_MEMORY_LIMIT`."""
    tracemalloc.start()
    try:
        try:
            outcome = read(*args)
        finally:
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_MEMORY_LIMIT, f"the reader allocated {peak / 2**20:.0f} MiB"
    return outcome


def _check_volume(image: nib.Nifti1Image, n_references: int) -> None:
    data = np.asarray(image.dataobj)
    assert data.ndim == 3 and data.shape[2] == n_references
    assert min(data.shape) >= 8
    assert np.all(np.isfinite(data))
    assert np.all(np.isfinite(image.affine)) and abs(np.linalg.det(image.affine[:3, :3])) > 0


def test_the_unedited_fixtures_convert() -> None:
    """The fuzz starts from valid data: with no edit, both forms convert."""
    volume = read_nm_multiframe(decode(multiframe_bytes()))
    assert volume.image.shape == SHAPE
    series = read_nm_series([decode(data) for data in slice_file_bytes()])
    assert series.image.shape == SHAPE


@FUZZ
@given(edits=DATASET_EDITS)
def test_nm_reader_raises_only_documented_errors(edits: DatasetEdits) -> None:
    ds = decode(encode_implicit(apply_edits(decode(multiframe_bytes()), edits)))
    try:
        volume = _within_memory_budget(read_nm_multiframe, ds)
    except DOCUMENTED_ERRORS as exc:
        assert str(exc).strip()
        if isinstance(exc, InvalidSeriesError):
            assert str(exc).startswith("NM instance "), exc
        return
    _check_volume(volume.image, len(volume.references))


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, SHAPE[2] - 1), DATASET_EDITS), min_size=1, max_size=3),
    drop=st.lists(st.integers(0, SHAPE[2] - 1), max_size=2),
)
def test_nm_series_reader_raises_only_documented_errors(edits: list[tuple[int, DatasetEdits]], drop: list[int]) -> None:
    files = [decode(data) for data in slice_file_bytes()]
    for index, edit in edits:
        files[index] = decode(encode_implicit(apply_edits(files[index], edit)))
    files = [ds for i, ds in enumerate(files) if i not in drop]
    for read in (read_nm_series, series_to_nifti):
        try:
            outcome = _within_memory_budget(read, files)
        except DOCUMENTED_ERRORS as exc:
            assert str(exc).strip()
            continue
        _check_volume(outcome.image, len(outcome.references))


# ---------------------------------------------------------------- the C-STORE path

# Statuses of node.receiver.Receiver.store for the sender's faults; 0xA700 (out of resources) is
# for the node's own disk and index, which are healthy here, so it would be a misclassification.
STORE_STATUSES = {0x0000, 0xA900, 0xC210}
FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)
_uid_counter = itertools.count(1)


class ThresholdPredictor:
    """Stands in for the U-Net (not what is fuzzed): the brightest tenth of the volume is "myocardium".

    It gives converted fuzz cases a non-empty mask, so their SEG is encoded and stored
    like a real result, exercising the encoder with fuzzed headers too.
    """

    description = "threshold stand-in"
    checkpoint = SimpleNamespace(provenance={"code_version": "fuzz"}, spec=UNetSpec(init_features=1))

    def predict_array(self, volume: np.ndarray, affine: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(mask=(volume > np.percentile(volume, 90)).astype(np.uint8), geometry=None)


@dataclass
class StorePath:
    """A storage root, its C-STORE sink and a worker, used without any network."""

    storage: Storage
    receiver: Receiver
    worker: SegmentationWorker

    def settle(self) -> list[Job]:
        """Complete idle series, then run every queued job; returns the jobs processed."""
        self.receiver.sweep_idle(0.0, now=time.time() + 1.0)
        processed = []
        while (job := self.storage.index.claim_job("fuzz")) is not None:
            assert self.worker.process(job) in FINAL_STATES
            processed.append(job)
        return processed


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorePath]:
    storage = Storage.open(tmp_path_factory.mktemp("fuzz-store"))
    settings_ = WorkerSettings(
        accept_pet_like=True, seg_series_number=999, seg_series_description="fuzz", destinations=()
    )
    worker = SegmentationWorker(storage, ThresholdPredictor, settings_, worker_id="fuzz")
    yield StorePath(storage, Receiver(storage), worker)
    storage.close()


def _fresh_identity(ds: Dataset) -> Dataset:
    """New SOP Instance and Series UIDs, so that every example is a new instance in a new series."""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _new_uid()
    ds.SeriesInstanceUID = _new_uid()
    return ds


def _new_uid() -> str:
    return f"2.25.{next(_uid_counter)}"


def implicit_body(ds: Dataset) -> bytes:
    """The data set alone (no file meta) in Implicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def received_bytes(body: bytes, sop_instance_uid: str, transfer_syntax_uid: str = ExplicitVRLittleEndian) -> bytes:
    """What pynetdicom hands the C-STORE handler: preamble, file meta built from the request, the data set."""
    return part10_bytes(body, NM_IMAGE_STORAGE, sop_instance_uid, transfer_syntax_uid)


@dataclass(frozen=True)
class StoreCase:
    """One fuzzed C-STORE: the data set bytes, the request's SOP Instance UID, the transfer syntax.

    ``with_meta`` False hands the sink the bytes alone (no preamble or file meta), which
    pynetdicom never does but the sink must survive anyway.
    """

    body: bytes
    request_uid: str
    transfer_syntax_uid: str
    with_meta: bool = True

    @property
    def encoded(self) -> bytes:
        """What the C-STORE handler passes to the sink."""
        if not self.with_meta:
            return self.body
        return received_bytes(self.body, self.request_uid, self.transfer_syntax_uid)


@st.composite
def store_cases(draw: st.DrawFn) -> StoreCase:
    """Random bytes, or a valid NM instance with edits, flipped bytes and a random cut."""
    kind = draw(st.sampled_from(["bytes", "bytes-no-meta", "mutated", "mutated", "mutated", "slice"]))
    if kind.startswith("bytes"):
        body = draw(st.binary(max_size=2048))
        return StoreCase(body, _new_uid(), ExplicitVRLittleEndian, with_meta=kind == "bytes")
    source = multiframe_bytes() if kind == "mutated" else draw(st.sampled_from(slice_file_bytes()))
    ds = _fresh_identity(decode(source))
    uid = str(ds.SOPInstanceUID)
    body = bytearray(implicit_body(apply_edits(ds, draw(DATASET_EDITS))))
    for _ in range(draw(st.integers(0, 3))):  # flip a few bytes anywhere in the data set
        if body:
            position = draw(st.integers(0, len(body) - 1))
            body[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    request_uid = draw(st.sampled_from([uid, uid, uid, _new_uid()]))  # sometimes not the data set's
    return StoreCase(bytes(body), request_uid, ImplicitVRLittleEndian)


def test_the_store_path_encodes_a_seg_for_an_unedited_instance(store_path: StorePath) -> None:
    """The fuzz below reaches the SEG encoder: unedited, an instance gets its job done and its SEG stored."""
    ds = _fresh_identity(decode(multiframe_bytes()))
    case = StoreCase(implicit_body(ds), str(ds.SOPInstanceUID), ImplicitVRLittleEndian)
    assert (
        store_path.receiver.store(case.encoded, NM_IMAGE_STORAGE, case.request_uid, case.transfer_syntax_uid, "T") == 0
    )
    jobs = store_path.settle()
    assert [store_path.storage.index.job(job.id).state for job in jobs] == [JobState.DONE]  # type: ignore[union-attr]
    assert store_path.storage.index.results(str(ds.StudyInstanceUID))


@FUZZ
@given(case=store_cases())
def test_store_path_always_answers_a_status_and_finishes_every_job(store_path: StorePath, case: StoreCase) -> None:
    status = store_path.receiver.store(
        case.encoded, NM_IMAGE_STORAGE, case.request_uid, case.transfer_syntax_uid, "FUZZSCU"
    )
    assert status in STORE_STATUSES
    event(f"status 0x{status:04X}")
    # Refused: nothing written. Accepted: indexed under the request's UID.
    assert (store_path.storage.index.instance(case.request_uid) is not None) == (status == 0x0000)
    for job in store_path.settle():
        final = store_path.storage.index.job(job.id)
        assert final is not None and final.state in FINAL_STATES
        event(f"job {final.state.value}")
        if final.state == JobState.FAILED:
            assert final.reason
    assert not store_path.storage.index.jobs(state=JobState.RUNNING)
    assert not store_path.storage.index.jobs(state=JobState.QUEUED)


NETWORK_EXAMPLES = 25


def test_store_over_a_real_association(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bounded number of fuzz cases through a running node: a status for each, the node stays up.

    pynetdicom's chunked-dataset mode sends the bytes after the file meta unparsed, so
    garbage reaches the node's C-STORE handler as it would from a broken sender. The
    model file is absent: a case that converts fails at inference, which is fine here.
    """
    config = node_config(tmp_path / "node", f"model.weights={tmp_path / 'absent.pth'}", "node.series_idle_timeout=1")
    node = Node.start(config, load_model=False)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="FUZZSCU")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # one context per syntax: the node picks one
        ae.add_requested_context(NM_IMAGE_STORAGE, syntax)
    ae.add_requested_context(Verification)
    statuses: list[int] = []
    try:

        @settings(FUZZ, max_examples=NETWORK_EXAMPLES)
        @given(case=store_cases())
        def send(case: StoreCase) -> None:
            path = tmp_path / "case.dcm"
            path.write_bytes(received_bytes(case.body, case.request_uid, case.transfer_syntax_uid))
            assoc = ae.associate("127.0.0.1", node.port, ae_title="SPECTNODE")
            assert assoc.is_established
            try:
                response = assoc.send_c_store(path)
                assert response and int(response.Status) in STORE_STATUSES, response
                statuses.append(int(response.Status))
            finally:
                assoc.release()

        send()
        assert len(statuses) >= NETWORK_EXAMPLES
        deadline = time.monotonic() + 60
        index = node.storage.index
        while (index.jobs(state=JobState.QUEUED) or index.jobs(state=JobState.RUNNING)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not index.jobs(state=JobState.RUNNING) and not index.jobs(state=JobState.QUEUED)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SPECTNODE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        node.stop()
