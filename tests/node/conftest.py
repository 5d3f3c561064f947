"""Fixtures for the NM conversion and SEG tests: a small synthetic SPECT-like phantom and dciodvfy."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from peers import STORESCP_AE, require_tool, storescp
from pydicom import Dataset
from studies import free_port

from node.standin_pacs import StandInPacs

SHAPE = (32, 28, 24)  # (columns, rows, slices): non-square on purpose, so i/j mix-ups show
VOXEL_MM = (4.0, 4.5, 5.0)


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(kind: str) -> np.ndarray:
    """RAS+ affine of the phantom grid: ``axial`` (LPS-like voxel axes) or ``oblique`` (rotated)."""
    affine = np.eye(4)
    if kind == "axial":
        affine[:3, :3] = np.diag([-VOXEL_MM[0], -VOXEL_MM[1], VOXEL_MM[2]])
        affine[:3, 3] = [61.25, 70.5, -40.125]
    elif kind == "oblique":
        affine[:3, :3] = _rotation((20.0, -35.0, 50.0)) @ np.diag(VOXEL_MM)
        affine[:3, 3] = [-12.3, 45.6, 78.9]
    else:
        raise ValueError(kind)
    return affine


def make_phantom(kind: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """An off-centre ellipsoid shell (the "myocardium") on a weak gradient background.

    Returns the float32 image and the bool shell mask, both ``SHAPE`` in ``(i, j, k)``.
    Shell voxels are >= 100, everything else < 30, so thresholding at 60 recovers the mask.
    """
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    radius = np.sqrt(((i - 18.0) / 8.0) ** 2 + ((j - 12.0) / 6.5) ** 2 + ((k - 11.0) / 6.0) ** 2)
    mask = (radius > 0.6) & (radius < 1.0)
    background = 0.5 * i + 0.3 * j + 0.2 * k  # < 30: distinguishes every axis and direction
    data = (100.0 * mask + background).astype(np.float32)
    return nib.Nifti1Image(data, make_affine(kind)), mask


def to_bytes_and_back(ds: Dataset) -> Dataset:
    """Encode as Part 10 and decode again, like a file on disk."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def permute_nm_frames(ds: Dataset, seed: int) -> tuple[Dataset, np.ndarray]:
    """Store the frames of a positive-spacing NM file in a random order, SliceVector saying which is which.

    Returns the modified dataset (same UIDs) and ``permutation``: file frame ``f`` now
    holds the slice that was frame ``permutation[f]``. The detector position is moved to
    the new first frame, as the standard asks.
    """
    frames = ds.pixel_array
    permutation = np.random.default_rng(seed).permutation(frames.shape[0])
    ds.PixelData = np.ascontiguousarray(frames[permutation]).tobytes()
    ds.SliceVector = [int(p) + 1 for p in permutation]
    detector = ds.DetectorInformationSequence[0]
    orientation = np.array([float(v) for v in detector.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    position = np.array([float(v) for v in detector.ImagePositionPatient])
    detector.ImagePositionPatient = list(position + permutation[0] * float(ds.SpacingBetweenSlices) * normal)
    return to_bytes_and_back(ds), permutation


@pytest.fixture
def shuffle_nm_frames() -> Callable[[Dataset, int], tuple[Dataset, np.ndarray]]:
    """Factory ``shuffle_nm_frames(ds, seed) -> (ds, permutation)``: see :func:`permute_nm_frames`."""
    return permute_nm_frames


@pytest.fixture
def nm_phantom() -> Callable[[str], tuple[nib.Nifti1Image, np.ndarray]]:
    """Factory ``phantom(kind) -> (image, mask)``; kind ``axial`` or ``oblique``."""
    return make_phantom


@pytest.fixture
def dicom_reencode() -> Callable[[Dataset], Dataset]:
    """``reencode(ds)``: the dataset after a round trip through Part 10 bytes."""
    return to_bytes_and_back


@pytest.fixture
def dciodvfy(tmp_path: Path) -> Callable[[bytes], tuple[list[str], list[str]]]:
    """``dciodvfy(data) -> (error_lines, warning_lines)`` for Part 10 bytes.

    Skips when dciodvfy is not installed, unless the environment variable CI is set.
    """
    executable = require_tool("dciodvfy")
    counter = iter(range(1_000_000))

    def run(data: bytes) -> tuple[list[str], list[str]]:
        path = tmp_path / f"object{next(counter)}.dcm"
        path.write_bytes(data)
        result = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=60, check=False)
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
        return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warn")]

    return run


@pytest.fixture
def stop_later() -> Iterator[list]:
    """Things with a ``stop()`` (nodes, stand-in PACS) the test appends; stopped last-in first-out."""
    started: list = []
    yield started
    for item in reversed(started):
        item.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StandInPacs]:
    """A stand-in PACS (storage SCP) on a free port, stopped after the test."""
    server = StandInPacs(tmp_path / "pacs")
    yield server
    server.stop()


@pytest.fixture
def destination_scp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK ``storescp`` as ``STORESCP_AE`` on a free port; yields ``(port, folder it stores into)``."""
    port = free_port()
    with storescp(tmp_path / "received", port, STORESCP_AE) as folder:
        yield port, folder
