"""Read reconstructed nuclear-medicine (NM Image Storage) SPECT into NIfTI.

Geometry follows PS3.3 C.8.4.11/C.8.4.15: position and orientation sit in
``DetectorInformationSequence[0]`` (first frame), the slice step is the *signed*
``SpacingBetweenSlices`` and frames are indexed by ``SliceVector`` (0054,0080)::

    P_LPS(c, r, f) = IPP + c*dc*row + r*dr*col + (SliceVector[f] - SliceVector[0]) * sbs * n

Volumes come out in NIfTI voxel order ``(i, j, k)`` = (column, row, slice in
SliceVector order) with a RAS+ affine ``diag(-1, -1, 1, 1) @ A_LPS``, so slice ``k``
*is* one stored frame: :class:`NMVolume.references` says which.

Errors: the readers raise :class:`~node.errors.UnsupportedSeriesError` for valid
input the node does not process and :class:`~node.errors.InvalidSeriesError` (a
``ValueError``) for anything malformed, naming the problem and the instance or
series; nothing else escapes them, whatever the dataset holds. Declared sizes are
checked before any pixel is decoded, so a header announcing a huge volume costs
nothing (:data:`node.dicom_values.MAX_VOXELS`); the value helpers live in :mod:`node.dicom_values`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom import Dataset

from node.dicom_values import (
    BITS_ALLOCATED,
    MAX_VOXELS,
    as_list,
    check_declared_shape,
    finite_floats,
    instance_label,
    integer_attribute,
    problems_in,
    series_label,
    shown,
)
from node.errors import InvalidSeriesError, UnsupportedSeriesError

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


def check_orientation(orientation: Sequence[float]) -> None:
    """Raise ValueError unless ``orientation`` holds two orthogonal unit vectors."""
    values = np.asarray(orientation, dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must hold 6 values, got {len(values)}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"ImageOrientationPatient {list(values)} is not finite")
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
    image_type = [str(v).strip().upper() for v in as_list(ds.get("ImageType"))]
    increments = [int(t) for t in as_list(ds.get("FrameIncrementPointer"))]
    if (len(image_type) > 2 and "GATED" in image_type[2]) or TIME_SLOT_VECTOR_TAG in increments:
        raise UnsupportedSeriesError("gated SPECT (RECON GATED TOMO) is not supported yet")
    if len(image_type) < 3:  # value 3 is Type 1 in NM: without it projections and reconstructions look alike
        raise UnsupportedSeriesError("NM ImageType has no value 3: cannot tell a reconstruction from projections")
    if image_type[2] != "RECON TOMO":
        raise UnsupportedSeriesError(f"NM ImageType {shown(image_type[2])} is not a tomographic reconstruction")
    if len(image_type) > 3 and image_type[3] == "TRANSMISSION":
        raise UnsupportedSeriesError("transmission (attenuation map) images are not processed")


def _slice_spacing(ds: Dataset, number_of_frames: int) -> float:
    """Signed SpacingBetweenSlices, else SliceThickness (warned), else 0.0 for one frame.

    A multi-frame image needs a non-zero finite step.
    """
    spacing: float | None = None
    if ds.get("SpacingBetweenSlices") not in (None, ""):
        (spacing,) = finite_floats(ds.SpacingBetweenSlices, "SpacingBetweenSlices", 1)
    elif ds.get("SliceThickness") not in (None, ""):
        logger.warning("SpacingBetweenSlices missing in %s; using SliceThickness", instance_label(ds))
        (spacing,) = finite_floats(ds.SliceThickness, "SliceThickness", 1)
    if spacing is None:
        if number_of_frames == 1:
            return 0.0
        raise ValueError("multi-frame NM image has neither SpacingBetweenSlices nor SliceThickness")
    if number_of_frames > 1 and spacing == 0.0:
        raise ValueError("multi-frame NM image has a slice spacing of 0 mm")
    return spacing


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
        if detector.get(keyword) in (None, "") or len(as_list(detector.get(keyword))) == 0:
            raise ValueError(f"DetectorInformationSequence[0] has no {keyword}: no geometry")
    position = np.asarray(
        finite_floats(detector.ImagePositionPatient, "DetectorInformationSequence[0].ImagePositionPatient", 3),
        dtype=np.float64,
    )
    orientation = finite_floats(
        detector.ImageOrientationPatient, "DetectorInformationSequence[0].ImageOrientationPatient", 6
    )
    check_orientation(orientation)
    if ds.get("PixelSpacing") in (None, ""):
        raise ValueError("NM image has no PixelSpacing (0028,0030)")
    pixel_spacing = finite_floats(ds.PixelSpacing, "PixelSpacing (0028,0030)", 2)
    if min(pixel_spacing) <= 0:
        raise ValueError(f"PixelSpacing (0028,0030) {list(pixel_spacing)} must be positive")

    number_of_frames = integer_attribute(ds, "NumberOfFrames", default=1)
    if number_of_frames < 1:
        raise ValueError(f"NumberOfFrames {number_of_frames} is not positive")
    try:
        slice_vector = [int(v) for v in as_list(ds.get("SliceVector"))]
    except (TypeError, ValueError):
        raise ValueError(f"SliceVector (0054,0080) {shown(ds.get('SliceVector'))} is not a list of integers") from None
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
        raise ValueError(f"SliceVector values must be distinct consecutive integers, got {shown(slice_vector)}")

    sbs = _slice_spacing(ds, number_of_frames)
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = (np.asarray(slice_vector, dtype=np.float64) - slice_vector[0]) * sbs
    frame_positions = position[None, :] + offsets[:, None] * normal[None, :]
    return NMFrameGeometry(orientation, (pixel_spacing[0], pixel_spacing[1]), sbs, tuple(slice_vector), frame_positions)


def stored_frames(ds: Dataset, number_of_frames: int) -> np.ndarray:
    """Stored pixel values as ``(F, rows, cols)`` (dtype as stored, sign honoured).

    Raises
    ------
    ValueError
        No pixel data, more than one sample per pixel, BitsAllocated not in
        :data:`BITS_ALLOCATED`, more than :data:`MAX_VOXELS` samples declared, or
        native pixel data shorter than ``rows * cols * frames`` samples (all checked
        before decoding).
    """
    if "PixelData" not in ds:
        raise ValueError("image has no PixelData")
    if integer_attribute(ds, "SamplesPerPixel", default=1) != 1:
        raise ValueError("only single-sample (grey-scale) images are supported")
    rows, cols = integer_attribute(ds, "Rows"), integer_attribute(ds, "Columns")
    if rows < 1 or cols < 1 or number_of_frames < 1:
        raise ValueError(f"declared matrix {rows}x{cols} with {number_of_frames} frames is empty")
    if rows * cols * number_of_frames > MAX_VOXELS:
        raise ValueError(f"{rows}x{cols}x{number_of_frames} samples declared: more than {MAX_VOXELS}")
    bits_allocated = integer_attribute(ds, "BitsAllocated")
    if bits_allocated not in BITS_ALLOCATED:
        raise ValueError(f"BitsAllocated {bits_allocated} is not supported (one of {BITS_ALLOCATED})")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        bytes_per_sample = bits_allocated // 8
        expected = rows * cols * number_of_frames * bytes_per_sample
        if not isinstance(ds.PixelData, bytes) or len(ds.PixelData) < expected:
            raise ValueError(
                f"pixel data is {len(ds.PixelData or b'')} bytes, shorter than rows*cols*frames "
                f"= {rows}*{cols}*{number_of_frames} samples ({expected} bytes)"
            )
    return np.asarray(ds.pixel_array).reshape(number_of_frames, rows, cols)


def value_mapping(ds: Dataset) -> tuple[float, float]:
    """``(slope, intercept)``: top-level Rescale, else the first RealWorldValueMapping item, else identity."""
    if ds.get("RescaleSlope") not in (None, "") or ds.get("RescaleIntercept") not in (None, ""):
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        (slope_value,) = finite_floats(slope, "RescaleSlope", 1) if slope not in (None, "") else (1.0,)
        (intercept_value,) = finite_floats(intercept, "RescaleIntercept", 1) if intercept not in (None, "") else (0.0,)
        return slope_value, intercept_value
    mappings = ds.get("RealWorldValueMappingSequence")
    if mappings:
        item = mappings[0]
        if item.get("RealWorldValueSlope") is None:
            raise ValueError("RealWorldValueMappingSequence[0] uses a LUT; only linear mappings are supported")
        (slope_value,) = finite_floats(item.RealWorldValueSlope, "RealWorldValueSlope", 1)
        (intercept_value,) = finite_floats(item.get("RealWorldValueIntercept") or 0.0, "RealWorldValueIntercept", 1)
        return slope_value, intercept_value
    return 1.0, 0.0


def to_real_world(frames: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to float32 real-world values; ValueError if any is not a finite float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        values = (frames.astype(np.float64) * slope + intercept).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"rescaled pixel values overflow float32 (slope {slope:g}, intercept {intercept:g})")
    return values


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
    InvalidSeriesError
        Anything else that prevents the conversion: a declared volume outside
        :func:`check_declared_shape`, missing or inconsistent geometry (see
        :func:`nm_frame_geometry`), unsupported or short pixel data (see
        :func:`stored_frames`), a non-finite rescale. The message starts with
        ``NM instance <SOP Instance UID>:``.
    """
    with problems_in(f"NM instance {instance_label(ds)}"):
        return _read_nm_multiframe(ds)


def _read_nm_multiframe(ds: Dataset) -> NMVolume:
    check_recon_tomo(ds)
    check_declared_shape(
        integer_attribute(ds, "Columns"), integer_attribute(ds, "Rows"), integer_attribute(ds, "NumberOfFrames", 1)
    )
    geometry = nm_frame_geometry(ds)
    number_of_frames = len(geometry.slice_vector)
    order = np.argsort(np.asarray(geometry.slice_vector), kind="stable")
    frames = stored_frames(ds, number_of_frames)
    slope, intercept = value_mapping(ds)
    data = to_real_world(frames[order], slope, intercept).transpose(2, 1, 0)
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
    # Tolerances allow positions written with two decimals and cosines with six (ordinary vendor
    # rounding: up to ~0.04 mm between gaps of an oblique stack); real shifts and gaps are larger.
    in_plane = (sorted_positions - sorted_positions[0]) - np.outer(distances[order] - distances[order][0], normal)
    if np.max(np.abs(in_plane)) > 0.1:
        raise ValueError("slices are shifted in plane: not one stack")
    if np.max(gaps) - np.min(gaps) > max(0.05, 0.01 * float(np.median(gaps))):
        raise ValueError(f"uneven slice spacing ({np.min(gaps):.4g} to {np.max(gaps):.4g} mm)")
    step = (sorted_positions[-1] - sorted_positions[0]) / (len(order) - 1)
    return order, step


def check_series_member(ds: Dataset, first: Dataset, matrix: tuple[int, int]) -> None:
    """``ValueError`` unless ``ds`` is of ``first``'s series and has its ``(rows, columns)`` matrix."""
    if ds.get("SeriesInstanceUID") != first.get("SeriesInstanceUID"):
        raise ValueError("datasets belong to more than one series")
    ds_matrix = (integer_attribute(ds, "Rows"), integer_attribute(ds, "Columns"))
    if ds_matrix != matrix:
        raise ValueError(
            f"inconsistent matrix: {ds_matrix[0]}x{ds_matrix[1]} vs {matrix[0]}x{matrix[1]} (rows x columns)"
        )


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
    InvalidSeriesError
        Empty input, multi-frame files, mixed series, inconsistent orientation,
        pixel spacing or matrix, a stack that is not evenly spaced, a declared volume
        outside :func:`check_declared_shape`, or a file that
        :func:`read_nm_multiframe` would refuse. The message names the instance
        (``NM instance <uid>:``) or the series (``series <uid>:``).
    """
    if not datasets:
        raise InvalidSeriesError("no datasets given")
    with problems_in(f"series {series_label(datasets[0])}"):
        return _read_nm_series(datasets)


def _read_nm_series(datasets: Sequence[Dataset]) -> NMVolume:
    first = datasets[0]
    matrix = (integer_attribute(first, "Rows"), integer_attribute(first, "Columns"))
    check_declared_shape(matrix[1], matrix[0], len(datasets))
    geometries: list[NMFrameGeometry] = []
    for ds in datasets:
        with problems_in(f"NM instance {instance_label(ds)}"):
            check_recon_tomo(ds)
            if integer_attribute(ds, "NumberOfFrames", default=1) != 1:
                raise ValueError("read_nm_series takes one-frame files; use read_nm_multiframe for multi-frame NM")
            check_series_member(ds, first, matrix)
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
        with problems_in(f"NM instance {instance_label(ds)}"):
            slope, intercept = value_mapping(ds)
            slices.append(to_real_world(stored_frames(ds, 1)[0], slope, intercept))
    data = np.stack(slices).transpose(2, 1, 0)
    affine = ras_affine(
        reference.row_cosine, reference.column_cosine, reference.pixel_spacing, step, positions[order[0]]
    )
    references = tuple(SliceReference(str(datasets[i].SOPInstanceUID), 1) for i in order)
    return NMVolume(make_nifti(data, affine), references)
