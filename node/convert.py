"""Series -> NIfTI dispatch, and the decision which series the node processes.

Three forms of reconstructed emission tomography are read, each keeping a
reference from every slice ``k`` back to the instance (and frame) it came from,
so that a mask on the converted grid maps one-to-one onto source frames:

* NM Image Storage, one multi-frame instance (:func:`node.nm_reader.read_nm_multiframe`);
* NM Image Storage, one slice per file (:func:`node.nm_reader.read_nm_series`);
* single-frame series with top-level ImagePositionPatient/ImageOrientationPatient
  (PET Image Storage and the like; :func:`read_single_frame_series`).

:func:`series_to_nifti` raises only :class:`~node.errors.UnsupportedSeriesError`
(the series is skipped) or :class:`~node.errors.InvalidSeriesError` (the series
cannot be converted; the message names the problem and the series or instance).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom import Dataset

from node.dicom_values import (
    check_declared_shape,
    finite_floats,
    instance_label,
    integer_attribute,
    problems_in,
    series_label,
)
from node.errors import InvalidSeriesError, UnsupportedSeriesError
from node.nm_reader import (
    NM_IMAGE_STORAGE,
    SliceReference,
    check_orientation,
    check_recon_tomo,
    check_series_member,
    make_nifti,
    ras_affine,
    read_nm_multiframe,
    read_nm_series,
    sort_along_normal,
    stored_frames,
    to_real_world,
    value_mapping,
)

logger = logging.getLogger(__name__)

_NM_CLASSES = frozenset({NM_IMAGE_STORAGE})  # not the retired 1.2.840.10008.5.1.4.1.1.5: no SEG can reference it
_CT_MR_MODALITIES = frozenset({"CT", "MR"})
_EMISSION_MODALITIES = frozenset({"PT", "NM"})


class SeriesForm(enum.Enum):
    """How a converted series was stored."""

    NM_MULTIFRAME = "nm-multiframe"
    NM_SLICE_FILES = "nm-slice-files"
    SINGLE_FRAME = "single-frame"


@dataclass(frozen=True)
class ConvertedSeries:
    """A series as a NIfTI volume plus the source of each slice.

    Parameters
    ----------
    image
        float32, voxel order ``(i, j, k)`` = (column, row, slice), RAS+ affine,
        real-world values.
    references
        ``references[k]``: instance (and 1-based frame for NM) that slice ``k`` came from.
    form
        Storage form of the source series (decides how a SEG references it).
    """

    image: nib.Nifti1Image
    references: tuple[SliceReference, ...]
    form: SeriesForm


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType")
    values = [value] if isinstance(value, str) else list(value or [])
    return [str(v).strip().upper() for v in values]


def _is_nm(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) in _NM_CLASSES


def _has_plane_geometry(ds: Dataset) -> bool:
    return ds.get("ImagePositionPatient") not in (None, "") and ds.get("ImageOrientationPatient") not in (None, "")


def is_reconstructed_emission(ds: Dataset, *, accept_pet_like: bool = False) -> tuple[bool, str]:
    """Decide whether the node processes the series ``ds`` belongs to.

    Parameters
    ----------
    ds
        Any instance of the series (header only).
    accept_pet_like
        Process PT/NM-modality series stored in CT/PET-like single-frame classes.

    Returns
    -------
    tuple of (bool, str)
        Whether to process, and a short human-readable reason.
    """
    modality = str(ds.get("Modality", "")).upper()
    if _is_nm(ds):
        image_type = _image_type(ds)
        if len(image_type) < 3:
            return False, "NM image without ImageType value 3: cannot tell a reconstruction from projections"
        if image_type[2] == "RECON GATED TOMO" or "GATED" in image_type[2]:
            return False, "gated, not supported yet"
        if image_type[2] != "RECON TOMO":
            return False, f"NM {image_type[2]} images are projections or planar images, not a reconstruction"
        if len(image_type) > 3 and image_type[3] == "TRANSMISSION":
            return False, "NM transmission image (attenuation map), not emission"
        return True, "NM RECON TOMO reconstruction"
    if modality in _CT_MR_MODALITIES:
        return False, f"{modality} is not emission tomography"
    if modality in _EMISSION_MODALITIES and _has_plane_geometry(ds):
        if accept_pet_like:
            return True, f"{modality} single-frame emission series"
        return False, f"{modality} single-frame emission series (PET-like series are not accepted)"
    return False, f"unsupported SOP class {ds.get('SOPClassUID', '?')} with modality {modality or '?'}"


def read_single_frame_series(datasets: Sequence[Dataset]) -> ConvertedSeries:
    """Convert a series of single-frame images with top-level IPP/IOP into a NIfTI volume.

    Slices are sorted along the normal ``row x col``; the slice step comes from the
    positions (they must be evenly spaced). Each file's own rescale is applied.

    Parameters
    ----------
    datasets
        Single-frame images of one series (PET Image Storage, CT-like classes), any order.

    Returns
    -------
    ConvertedSeries
        float32 ``(columns, rows, files)`` image; ``references[k].frame_number`` is None.

    Raises
    ------
    UnsupportedSeriesError
        Multi-frame instances.
    InvalidSeriesError
        Missing or inconsistent geometry, mixed series, uneven spacing, a declared
        volume outside :func:`~node.dicom_values.check_declared_shape`, unsupported or
        short pixel data; the message names the series or instance.
    """
    if not datasets:
        raise InvalidSeriesError("no datasets given")
    with problems_in(f"series {series_label(datasets[0])}"):
        return _read_single_frame_series(datasets)


def _read_single_frame_series(datasets: Sequence[Dataset]) -> ConvertedSeries:
    first = datasets[0]
    matrix = (integer_attribute(first, "Rows"), integer_attribute(first, "Columns"))
    geometry: list[tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = []
    for ds in datasets:
        with problems_in(f"instance {instance_label(ds)}"):
            if integer_attribute(ds, "NumberOfFrames", default=1) != 1:
                raise UnsupportedSeriesError("multi-frame instances of this SOP class are not supported")
            if not _has_plane_geometry(ds):
                raise ValueError("no ImagePositionPatient/ImageOrientationPatient")
            check_series_member(ds, first, matrix)
            if ds.get("PixelSpacing") in (None, ""):
                raise ValueError("no PixelSpacing (0028,0030)")
            spacing = finite_floats(ds.PixelSpacing, "PixelSpacing (0028,0030)", 2)
            if min(spacing) <= 0:
                raise ValueError(f"PixelSpacing (0028,0030) {list(spacing)} must be positive")
            orientation = finite_floats(ds.ImageOrientationPatient, "ImageOrientationPatient", 6)
            position = finite_floats(ds.ImagePositionPatient, "ImagePositionPatient", 3)
            if geometry:
                if not np.allclose(orientation, geometry[0][0], atol=1e-4):
                    raise ValueError("inconsistent ImageOrientationPatient across the series")
                if not np.allclose(spacing, geometry[0][1], rtol=1e-4):
                    raise ValueError("inconsistent PixelSpacing across the series")
            geometry.append((orientation, spacing, position))
    check_declared_shape(matrix[1], matrix[0], len(datasets))
    orientation = np.asarray(geometry[0][0], dtype=np.float64)
    check_orientation(orientation)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    positions = np.asarray([g[2] for g in geometry], dtype=np.float64)
    order, step = sort_along_normal(positions, row_cosine, column_cosine)
    slices = []
    for index in order:
        ds = datasets[index]
        with problems_in(f"instance {instance_label(ds)}"):
            slope, intercept = value_mapping(ds)
            slices.append(to_real_world(stored_frames(ds, 1)[0], slope, intercept))
    data = np.stack(slices).transpose(2, 1, 0)
    affine = ras_affine(row_cosine, column_cosine, geometry[0][1], step, positions[order[0]])
    references = tuple(SliceReference(str(datasets[i].SOPInstanceUID), None) for i in order)
    return ConvertedSeries(make_nifti(data, affine), references, SeriesForm.SINGLE_FRAME)


def series_to_nifti(datasets: Sequence[Dataset]) -> ConvertedSeries:
    """Convert one complete series into a NIfTI volume with per-slice source references.

    Parameters
    ----------
    datasets
        All instances of one series, with pixel data, any order.

    Returns
    -------
    ConvertedSeries
        See :class:`ConvertedSeries`.

    Raises
    ------
    UnsupportedSeriesError
        Gated or non-reconstructed NM, several multi-frame NM instances in one series,
        or instances with neither NM detector geometry nor top-level plane geometry.
    InvalidSeriesError
        Malformed or inconsistent input (see the readers); the message names the
        problem and the series or instance.
    """
    if not datasets:
        raise InvalidSeriesError("no datasets given")
    with problems_in(f"series {series_label(datasets[0])}"):
        return _series_to_nifti(datasets)


def _series_to_nifti(datasets: Sequence[Dataset]) -> ConvertedSeries:
    nm = [ds for ds in datasets if _is_nm(ds)]
    if nm:
        if len(nm) != len(datasets):
            raise ValueError("series mixes NM Image Storage with other SOP classes")
        for ds in nm:
            check_recon_tomo(ds)
        if len(nm) == 1:
            volume = read_nm_multiframe(nm[0])
            form = SeriesForm.NM_MULTIFRAME
        elif any(integer_attribute(ds, "NumberOfFrames", default=1) > 1 for ds in nm):
            raise UnsupportedSeriesError(
                f"series holds {len(nm)} NM instances, some multi-frame: expected a single reconstruction"
            )
        else:
            volume = read_nm_series(nm)
            form = SeriesForm.NM_SLICE_FILES
        logger.info("converted %s series: %s voxels", form.value, volume.image.shape)
        return ConvertedSeries(volume.image, volume.references, form)
    if all(_has_plane_geometry(ds) for ds in datasets):
        converted = read_single_frame_series(datasets)
        logger.info("converted single-frame series: %s voxels", converted.image.shape)
        return converted
    raise UnsupportedSeriesError("instances carry neither NM detector geometry nor ImagePositionPatient")
