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
import logging
import tracemalloc
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from node.convert import series_to_nifti
from node.errors import InvalidSeriesError, UnsupportedSeriesError
from node.nm_reader import read_nm_multiframe, read_nm_series
from node.nm_writer import nifti_to_nm, nifti_to_nm_series

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
