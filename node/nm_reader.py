"""Read reconstructed nuclear-medicine (NM Image Storage) SPECT into NIfTI.

Geometry follows PS3.3 C.8.4.11/C.8.4.15: position and orientation sit in
``DetectorInformationSequence[0]`` (first frame), the slice step is the *signed*
``SpacingBetweenSlices`` and frames are indexed by ``SliceVector`` (0054,0080)::

    P_LPS(c, r, f) = IPP + c*dc*row + r*dr*col + (SliceVector[f] - SliceVector[0]) * sbs * n

Volumes come out in NIfTI voxel order ``(i, j, k)`` = (column, row, slice in
SliceVector order) with a RAS+ affine ``diag(-1, -1, 1, 1) @ A_LPS``, so slice ``k``
*is* one stored frame: :class:`NMVolume.references` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom import Dataset

from node.errors import UnsupportedSeriesError

logger = logging.getLogger(__name__)

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
SLICE_VECTOR_TAG = 0x00540080
TIME_SLOT_VECTOR_TAG = 0x00540070
_ORTHOGONALITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SliceReference:
    """Where slice ``k`` of a converted volume was stored.

    Parameters
    ----------
    sop_instance_uid
        SOP Instance UID of the file holding the slice.
    frame_number
        1-based frame number inside that instance for multi-frame IODs (NM is one,
        even with a single frame); ``None`` for single-frame IODs (CT, PET).
    """

    sop_instance_uid: str
    frame_number: int | None


@dataclass(frozen=True)
class NMVolume:
    """A reconstructed NM volume and the source of each of its slices.

    Parameters
    ----------
    image
        float32 array in voxel order ``(i, j, k)`` = (column, row, slice) with a RAS+
        affine; values are real-world values (rescale applied).
    references
        ``references[k]`` names the instance and frame that slice ``k`` came from.
    """

    image: nib.Nifti1Image
    references: tuple[SliceReference, ...]

    @property
    def frame_order(self) -> tuple[int | None, ...]:
        """1-based source frame number of each slice ``k``."""
        return tuple(ref.frame_number for ref in self.references)


@dataclass(frozen=True)
class NMFrameGeometry:
    """Patient-space (LPS) geometry of the frames of one NM instance, in file order.

    Parameters
    ----------
    orientation
        ImageOrientationPatient as written (6 direction cosines: row, then column).
    pixel_spacing
        ``(dr, dc)``: PixelSpacing, spacing between rows then between columns, mm.
    spacing_between_slices
        Signed slice step along the normal ``row x col`` in mm (0.0 when unknown for
        a single-frame file).
    slice_vector
        SliceVector value of each frame, file order.
    frame_positions
        ``(F, 3)`` float64 LPS position of the first pixel of each frame, file order.
    """

    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    spacing_between_slices: float
    slice_vector: tuple[int, ...]
    frame_positions: np.ndarray

    @property
    def row_cosine(self) -> np.ndarray:
        """Unit vector (LPS) of increasing column index."""
        return np.asarray(self.orientation[:3], dtype=np.float64)

    @property
    def column_cosine(self) -> np.ndarray:
        """Unit vector (LPS) of increasing row index."""
        return np.asarray(self.orientation[3:], dtype=np.float64)

    @property
    def normal(self) -> np.ndarray:
        """Slice normal ``row x col`` (LPS)."""
        return np.cross(self.row_cosine, self.column_cosine)


def _as_list(value: object) -> list:
    """A DICOM value with VM >= 1 as a list (pydicom returns a scalar for VM 1)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    return list(value)  # type: ignore[call-overload]


def check_orientation(orientation: Sequence[float]) -> None:
    """Raise ValueError unless ``orientation`` holds two orthogonal unit vectors."""
    values = np.asarray(orientation, dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must hold 6 values, got {len(values)}")
    row, col = values[:3], values[3:]
    if (
        abs(np.linalg.norm(row) - 1.0) > _ORTHOGONALITY_TOLERANCE
        or abs(np.linalg.norm(col) - 1.0) > _ORTHOGONALITY_TOLERANCE
        or abs(float(row @ col)) > _ORTHOGONALITY_TOLERANCE
    ):
        raise ValueError(f"ImageOrientationPatient {list(values)} is not two orthogonal unit vectors")


def ras_affine(
    row_cosine: np.ndarray,
    column_cosine: np.ndarray,
    pixel_spacing: Sequence[float],
    slice_step: np.ndarray,
    origin: np.ndarray,
) -> np.ndarray:
    """4x4 RAS+ affine of a volume in ``(column, row, slice)`` voxel order.

    Parameters
    ----------
    row_cosine, column_cosine
        ``(3,)`` LPS unit vectors of increasing column / row index.
    pixel_spacing
        ``(dr, dc)`` as in PixelSpacing.
    slice_step
        ``(3,)`` LPS displacement from slice ``k`` to ``k + 1``, mm.
    origin
        ``(3,)`` LPS position of voxel ``(0, 0, 0)``.

    Returns
    -------
    numpy.ndarray
        ``(4, 4)`` float64, ``diag(-1, -1, 1, 1) @ A_LPS``.
    """
    d_row, d_col = float(pixel_spacing[0]), float(pixel_spacing[1])
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = d_col * np.asarray(row_cosine, dtype=np.float64)
    affine_lps[:3, 1] = d_row * np.asarray(column_cosine, dtype=np.float64)
    affine_lps[:3, 2] = np.asarray(slice_step, dtype=np.float64)
    affine_lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


def make_nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Wrap a float32 ``(i, j, k)`` array and RAS+ affine as a NIfTI-1 image (mm, scanner space)."""
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    image.header.set_sform(affine, code=1)  # on the header: image.affine keeps full float64 precision
    image.header.set_qform(affine, code=1)
    return image


def check_recon_tomo(ds: Dataset) -> None:
    """Raise :class:`UnsupportedSeriesError` unless ``ds`` is a non-gated NM reconstruction."""
    image_type = [str(v).strip().upper() for v in _as_list(ds.get("ImageType"))]
    increments = [int(t) for t in _as_list(ds.get("FrameIncrementPointer"))]
    if (len(image_type) > 2 and "GATED" in image_type[2]) or TIME_SLOT_VECTOR_TAG in increments:
        raise UnsupportedSeriesError("gated SPECT (RECON GATED TOMO) is not supported yet")
    if len(image_type) > 2:
        if image_type[2] != "RECON TOMO":
            raise UnsupportedSeriesError(f"NM ImageType {image_type[2]!r} is not a tomographic reconstruction")
    else:
        logger.warning("NM ImageType %s has no value 3; assuming RECON TOMO", image_type)
    if len(image_type) > 3 and image_type[3] == "TRANSMISSION":
        raise UnsupportedSeriesError("transmission (attenuation map) images are not processed")


def _slice_spacing(ds: Dataset, number_of_frames: int) -> float:
    """Signed SpacingBetweenSlices, else SliceThickness (warned), else 0.0 for one frame."""
    if ds.get("SpacingBetweenSlices") not in (None, ""):
        return float(ds.SpacingBetweenSlices)
    if ds.get("SliceThickness") not in (None, ""):
        logger.warning("SpacingBetweenSlices missing in %s; using SliceThickness", ds.get("SOPInstanceUID"))
        return float(ds.SliceThickness)
    if number_of_frames == 1:
        return 0.0
    raise ValueError("multi-frame NM image has neither SpacingBetweenSlices nor SliceThickness")


def nm_frame_geometry(ds: Dataset) -> NMFrameGeometry:
    """Compute the LPS geometry of every frame of an NM instance, in file order.

    Raises
    ------
    ValueError
        Missing detector position/orientation, PixelSpacing or slice spacing, or a
        SliceVector that is absent, inconsistent with NumberOfFrames, or not a run
        of distinct consecutive integers.
    """
    detectors = ds.get("DetectorInformationSequence")
    if not detectors:
        raise ValueError("NM image has no DetectorInformationSequence: no geometry")
    detector = detectors[0]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        if detector.get(keyword) in (None, "") or len(_as_list(detector.get(keyword))) == 0:
            raise ValueError(f"DetectorInformationSequence[0] has no {keyword}: no geometry")
    position = np.asarray([float(v) for v in detector.ImagePositionPatient], dtype=np.float64)
    if position.shape != (3,):
        raise ValueError(f"DetectorInformationSequence[0].ImagePositionPatient must hold 3 values: {position}")
    orientation = tuple(float(v) for v in detector.ImageOrientationPatient)
    check_orientation(orientation)
    spacing = _as_list(ds.get("PixelSpacing"))
    if len(spacing) != 2:
        raise ValueError("NM image has no PixelSpacing (0028,0030)")
    pixel_spacing = (float(spacing[0]), float(spacing[1]))

    number_of_frames = int(ds.get("NumberOfFrames") or 1)
    slice_vector = [int(v) for v in _as_list(ds.get("SliceVector"))]
    if not slice_vector:
        if number_of_frames != 1:
            raise ValueError(f"multi-frame NM image ({number_of_frames} frames) has no SliceVector (0054,0080)")
        slice_vector = [1]
    if len(slice_vector) != number_of_frames:
        raise ValueError(
            f"NumberOfFrames ({number_of_frames}) is inconsistent with SliceVector ({len(slice_vector)} values)"
        )
    ordered = np.sort(np.asarray(slice_vector))
    if np.any(np.diff(ordered) != 1):
        raise ValueError(f"SliceVector values must be distinct consecutive integers, got {slice_vector}")

    sbs = _slice_spacing(ds, number_of_frames)
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = (np.asarray(slice_vector, dtype=np.float64) - slice_vector[0]) * sbs
    frame_positions = position[None, :] + offsets[:, None] * normal[None, :]
    return NMFrameGeometry(orientation, pixel_spacing, sbs, tuple(slice_vector), frame_positions)


def stored_frames(ds: Dataset, number_of_frames: int) -> np.ndarray:
    """Stored pixel values as ``(F, rows, cols)`` (dtype as stored, sign honoured).

    Raises
    ------
    ValueError
        No pixel data, more than one sample per pixel, or native pixel data shorter
        than ``rows * cols * frames`` samples.
    """
    if "PixelData" not in ds:
        raise ValueError("image has no PixelData")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise ValueError("only single-sample (grey-scale) images are supported")
    rows, cols = int(ds.Rows), int(ds.Columns)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        bytes_per_sample = (int(ds.BitsAllocated) + 7) // 8
        expected = rows * cols * number_of_frames * bytes_per_sample
        if len(ds.PixelData) < expected:
            raise ValueError(
                f"pixel data is {len(ds.PixelData)} bytes, shorter than rows*cols*frames "
                f"= {rows}*{cols}*{number_of_frames} samples ({expected} bytes)"
            )
    return np.asarray(ds.pixel_array).reshape(number_of_frames, rows, cols)


def value_mapping(ds: Dataset) -> tuple[float, float]:
    """``(slope, intercept)``: top-level Rescale, else the first RealWorldValueMapping item, else identity."""
    if ds.get("RescaleSlope") not in (None, "") or ds.get("RescaleIntercept") not in (None, ""):
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        return (
            float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0,
        )
    mappings = ds.get("RealWorldValueMappingSequence")
    if mappings:
        item = mappings[0]
        if item.get("RealWorldValueSlope") is None:
            raise ValueError("RealWorldValueMappingSequence[0] uses a LUT; only linear mappings are supported")
        return float(item.RealWorldValueSlope), float(item.get("RealWorldValueIntercept") or 0.0)
    return 1.0, 0.0


def _to_real_world(frames: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return (frames.astype(np.float64) * slope + intercept).astype(np.float32)


def read_nm_multiframe(ds: Dataset) -> NMVolume:
    """Convert one NM Image Storage RECON TOMO instance into a NIfTI volume.

    Parameters
    ----------
    ds
        NM Image Storage dataset with pixel data (any number of frames).

    Returns
    -------
    NMVolume
        float32 ``(columns, rows, frames)`` image, slices in SliceVector order, RAS+
        affine; ``references[k].frame_number`` is the 1-based file frame of slice ``k``.

    Raises
    ------
    UnsupportedSeriesError
        Gated or non-reconstructed NM images.
    ValueError
        Missing or inconsistent geometry or pixel data (see :func:`nm_frame_geometry`).
    """
    check_recon_tomo(ds)
    geometry = nm_frame_geometry(ds)
    number_of_frames = len(geometry.slice_vector)
    order = np.argsort(np.asarray(geometry.slice_vector), kind="stable")
    frames = stored_frames(ds, number_of_frames)
    slope, intercept = value_mapping(ds)
    data = _to_real_world(frames[order], slope, intercept).transpose(2, 1, 0)
    step = geometry.spacing_between_slices * geometry.normal
    if not np.any(step):
        step = geometry.normal  # one frame, spacing unknown: any non-singular step
    affine = ras_affine(
        geometry.row_cosine, geometry.column_cosine, geometry.pixel_spacing, step, geometry.frame_positions[order[0]]
    )
    uid = str(ds.SOPInstanceUID)
    references = tuple(SliceReference(uid, int(f) + 1) for f in order)
    logger.debug("NM %s: %d frames, sbs %.4g mm", uid, number_of_frames, geometry.spacing_between_slices)
    return NMVolume(make_nifti(data, affine), references)


def sort_along_normal(
    positions: np.ndarray, row_cosine: np.ndarray, column_cosine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Order a stack of single-slice positions along the normal and find the slice step.

    Parameters
    ----------
    positions
        ``(N, 3)`` LPS positions of the first pixel of each slice.
    row_cosine, column_cosine
        ``(3,)`` shared orientation.

    Returns
    -------
    tuple of numpy.ndarray
        ``order`` (``(N,)`` int, ascending along ``row x col``) and the ``(3,)`` mean
        step between consecutive sorted slices (the normal times 1 mm when N == 1).

    Raises
    ------
    ValueError
        Slices at the same position, shifted in plane, or unevenly spaced.
    """
    normal = np.cross(row_cosine, column_cosine)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    if len(order) == 1:
        return order, normal
    sorted_positions = positions[order]
    gaps = np.diff(distances[order])
    if np.any(gaps < 1e-3):
        raise ValueError("two slices of the series lie at the same position")
    in_plane = (sorted_positions - sorted_positions[0]) - np.outer(distances[order] - distances[order][0], normal)
    if np.max(np.abs(in_plane)) > 1e-2:
        raise ValueError("slices are shifted in plane: not one stack")
    if np.max(gaps) - np.min(gaps) > max(1e-2, 1e-3 * float(np.median(gaps))):
        raise ValueError(f"uneven slice spacing ({np.min(gaps):.4g} to {np.max(gaps):.4g} mm)")
    step = (sorted_positions[-1] - sorted_positions[0]) / (len(order) - 1)
    return order, step


def read_nm_series(datasets: Sequence[Dataset]) -> NMVolume:
    """Convert a one-slice-per-file NM RECON TOMO series into a NIfTI volume.

    Parameters
    ----------
    datasets
        NM Image Storage datasets of one series, one frame each, any order.

    Returns
    -------
    NMVolume
        float32 ``(columns, rows, files)`` image sorted along the slice normal;
        ``references[k]`` is ``(SOPInstanceUID, 1)`` of the file of slice ``k``.

    Raises
    ------
    UnsupportedSeriesError
        Gated or non-reconstructed NM images.
    ValueError
        Empty input, multi-frame files, mixed series, inconsistent orientation,
        pixel spacing or matrix, or a stack that is not evenly spaced.
    """
    if not datasets:
        raise ValueError("no datasets given")
    first = datasets[0]
    geometries: list[NMFrameGeometry] = []
    for ds in datasets:
        check_recon_tomo(ds)
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise ValueError("read_nm_series takes one-frame files; use read_nm_multiframe for multi-frame NM")
        if ds.get("SeriesInstanceUID") != first.get("SeriesInstanceUID"):
            raise ValueError("datasets belong to more than one series")
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise ValueError(f"inconsistent matrix: {ds.Rows}x{ds.Columns} vs {first.Rows}x{first.Columns}")
        geometry = nm_frame_geometry(ds)
        if geometries:
            reference = geometries[0]
            if not np.allclose(geometry.orientation, reference.orientation, atol=1e-4):
                raise ValueError("inconsistent ImageOrientationPatient across the series")
            if not np.allclose(geometry.pixel_spacing, reference.pixel_spacing, rtol=1e-4):
                raise ValueError("inconsistent PixelSpacing across the series")
        geometries.append(geometry)

    reference = geometries[0]
    positions = np.stack([g.frame_positions[0] for g in geometries])
    order, step = sort_along_normal(positions, reference.row_cosine, reference.column_cosine)
    declared = abs(reference.spacing_between_slices)
    if len(order) > 1 and declared > 0 and abs(np.linalg.norm(step) - declared) > 1e-2:
        logger.warning(
            "slice spacing from positions %.4g mm != SpacingBetweenSlices %.4g mm", np.linalg.norm(step), declared
        )
    slices = []
    for index in order:
        ds = datasets[index]
        slope, intercept = value_mapping(ds)
        slices.append(_to_real_world(stored_frames(ds, 1)[0], slope, intercept))
    data = np.stack(slices).transpose(2, 1, 0)
    affine = ras_affine(
        reference.row_cosine, reference.column_cosine, reference.pixel_spacing, step, positions[order[0]]
    )
    references = tuple(SliceReference(str(datasets[i].SOPInstanceUID), 1) for i in order)
    return NMVolume(make_nifti(data, affine), references)
