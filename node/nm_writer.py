"""Write NIfTI volumes as DICOM the way SPECT cameras do (test fixtures, demo data).

``nifti_to_nm`` writes one NM Image Storage multi-frame RECON TOMO instance with the
geometry in ``DetectorInformationSequence`` and frames indexed by ``SliceVector``;
``nifti_to_nm_series`` writes one NM file per slice; ``nifti_to_pet_like_series``
writes a PET Image Storage series with top-level position/orientation. All three
pass ``dciodvfy`` without errors. Volumes are NIfTI images, voxel order
``(i, j, k)`` = (column, row, slice), RAS+ affine; direction cosines are used as is
(oblique allowed, shear refused).
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Required, TypedDict, Unpack

import nibabel as nib
import numpy as np
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from node.nm_reader import NM_IMAGE_STORAGE, SLICE_VECTOR_TAG

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
_TC99M_WINDOW_KEV = (126.45, 154.55)


class Radiopharmaceutical(enum.Enum):
    """Tc-99m perfusion tracers: (SCT code value, code meaning, free-text name)."""

    TETROFOSMIN = ("424118002", "Technetium Tc^99m^ tetrofosmin", "Tc-99m tetrofosmin")
    SESTAMIBI = ("424299003", "Technetium Tc^99m^ sestamibi", "Tc-99m sestamibi")


@dataclass(frozen=True)
class SeriesHeader:
    """Patient, study and series identity shared by every file of a written series."""

    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    series_number: int
    series_description: str
    study_description: str
    manufacturer: str
    acquisition_datetime: datetime
    radiopharmaceutical: Radiopharmaceutical


@dataclass(frozen=True)
class StackGeometry:
    """LPS geometry of a NIfTI volume laid out as DICOM frames.

    ``slice_order[f]`` is the NIfTI slice ``k`` written as frame/file ``f``; frame
    ``f`` lies at ``first_position + f * spacing * normal``.
    """

    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    spacing: float
    first_position: np.ndarray
    slice_order: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    def position(self, frame: int) -> np.ndarray:
        """``(3,)`` LPS position of the first pixel of frame ``frame`` (0-based, write order)."""
        return self.first_position + frame * self.spacing * self.normal


def _ds(value: float) -> str:
    """A float as a DS string (<= 16 characters, tiny values flushed to 0)."""
    return format_number_as_ds(0.0 if abs(value) < 1e-12 else float(value))


def stack_geometry(affine: np.ndarray, n_slices: int, *, negative_spacing: bool = False) -> StackGeometry:
    """Derive the DICOM frame geometry of a NIfTI affine.

    Parameters
    ----------
    affine
        ``(4, 4)`` RAS+ affine of a ``(columns, rows, slices)`` volume.
    n_slices
        Number of slices ``K``.
    negative_spacing
        Write frames along ``-n`` (negative SpacingBetweenSlices, GE style) instead of ``+n``.

    Raises
    ------
    ValueError
        The affine is sheared (in-plane axes not orthogonal, or slice axis not along the normal).
    """
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    column_step, row_step, slice_step = affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2]
    d_col, d_row = float(np.linalg.norm(column_step)), float(np.linalg.norm(row_step))
    row_cosine, column_cosine = column_step / d_col, row_step / d_row
    if abs(float(row_cosine @ column_cosine)) > 1e-4:
        raise ValueError("affine in-plane axes are not orthogonal: cannot be written as DICOM")
    normal = np.cross(row_cosine, column_cosine)
    spacing = float(slice_step @ normal)
    if np.linalg.norm(slice_step - spacing * normal) > 1e-4 * max(abs(spacing), 1.0):
        raise ValueError("affine slice axis is not along the slice normal (sheared): cannot be written as DICOM")
    order = np.arange(n_slices)
    if (spacing < 0) != negative_spacing:
        order = order[::-1]
        spacing = -spacing
    first = affine_lps[:3, 3] + order[0] * slice_step
    orientation = tuple(float(v) for v in (*row_cosine, *column_cosine))
    return StackGeometry(orientation, (d_row, d_col), spacing, first, order.copy())


def quantise(
    data: np.ndarray, *, signed: bool = False, zero_intercept: bool = False
) -> tuple[np.ndarray, float, float]:
    """Map real values onto 16-bit stored values.

    Parameters
    ----------
    data
        Any-shape float array.
    signed
        Store int16 (values symmetric around 0, intercept 0) instead of uint16.
    zero_intercept
        Force intercept 0 (PET requires it); negative values then need ``signed``.

    Returns
    -------
    tuple
        ``(stored, slope, intercept)``: stored has ``data``'s shape, dtype ``<u2`` or
        ``<i2``; ``data ~= stored * slope + intercept`` within ``slope / 2``; slope and
        intercept are exactly representable as DS strings.
    """
    values = np.asarray(data, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if signed:
        intercept, top, dtype = 0.0, 32767.0, np.dtype("<i2")
        extent = max(abs(low), abs(high))
    else:
        if low < 0 and zero_intercept:
            raise ValueError("negative values need signed pixels when the intercept must be 0")
        intercept = 0.0 if (low >= 0 or zero_intercept) else float(_ds(low))
        top, dtype = 65535.0, np.dtype("<u2")
        extent = high - intercept
    slope = float(_ds(extent / top)) if extent > 0 else 1.0
    while extent / slope > top:  # DS rounding may shrink the slope below extent/top
        slope = float(_ds(slope * (1 + 1e-9)))
    stored = np.rint((values - intercept) / slope)
    info = np.iinfo(dtype)
    return np.clip(stored, info.min, info.max).astype(dtype), slope, intercept


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


class SeriesIdentity(TypedDict, total=False):
    """Keyword arguments naming the patient, study and series of a written series.

    ``patient_name`` and ``patient_id`` are required; missing UIDs are generated,
    ``acquisition_datetime`` defaults to now. Other defaults: see :func:`_header`.
    """

    patient_name: Required[str]
    patient_id: Required[str]
    study_instance_uid: str | None
    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    series_number: int
    series_description: str
    study_description: str
    manufacturer: str
    acquisition_datetime: datetime | None
    radiopharmaceutical: Radiopharmaceutical


def _header(
    *,
    patient_name: str,
    patient_id: str,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "SPECT MPI RECON TOMO",
    study_description: str = "Myocardial perfusion SPECT",
    manufacturer: str = "spect-node",
    acquisition_datetime: datetime | None = None,
    radiopharmaceutical: Radiopharmaceutical = Radiopharmaceutical.TETROFOSMIN,
) -> SeriesHeader:
    return SeriesHeader(
        patient_name,
        patient_id,
        study_instance_uid or generate_uid(),
        series_instance_uid or generate_uid(),
        frame_of_reference_uid or generate_uid(),
        int(series_number),
        series_description,
        study_description,
        manufacturer,
        acquisition_datetime or datetime.now().replace(microsecond=0),
        radiopharmaceutical,
    )


def _base_dataset(header: SeriesHeader, sop_class_uid: str, modality: str, instance_number: int) -> Dataset:
    """Patient, study, series, equipment, frame of reference and SOP common modules."""
    sop_instance_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    date, time = header.acquisition_datetime.strftime("%Y%m%d"), header.acquisition_datetime.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = header.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "HEART"
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = header.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = header.series_number
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientOrientationCodeSequence = [_code("102538003", "SCT", "recumbent")]
    ds.PatientOrientationCodeSequence[0].PatientOrientationModifierCodeSequence = [_code("40199007", "SCT", "supine")]
    ds.PatientGantryRelationshipCodeSequence = [_code("102540008", "SCT", "headfirst")]
    return ds


def _radiopharmaceutical_item(header: SeriesHeader, *, pet: bool) -> Dataset:
    code_value, code_meaning, name = header.radiopharmaceutical.value
    item = Dataset()
    item.RadionuclideCodeSequence = [_code("44588005", "SCT", "Technetium^99m^")]
    item.Radiopharmaceutical = name
    item.RadiopharmaceuticalCodeSequence = [_code(code_value, "SCT", code_meaning)]
    if pet:
        item.RadiopharmaceuticalStartTime = header.acquisition_datetime.strftime("%H%M%S")
        item.RadionuclideTotalDose = "740000000"
        item.RadionuclideHalfLife = "21624"
    return item


def _set_pixels(ds: Dataset, frames: np.ndarray) -> None:
    """Image Pixel module for ``(F, rows, cols)`` 16-bit stored values."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if frames.dtype.kind == "i" else 0
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(frames).tobytes())


def _nm_dataset(
    header: SeriesHeader,
    frames: np.ndarray,
    geometry: StackGeometry,
    first_frame: int,
    slope: float,
    intercept: float,
    *,
    modality: str,
    value_mapping: Literal["rescale", "real_world"],
    instance_number: int,
) -> Dataset:
    """One NM RECON TOMO instance holding ``frames`` (write order), first at ``first_frame``."""
    ds = _base_dataset(header, NM_IMAGE_STORAGE, modality, instance_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.CountsAccumulated = None
    ds.SliceThickness = _ds(abs(geometry.spacing))
    ds.SpacingBetweenSlices = _ds(geometry.spacing)
    ds.ConvolutionKernel = "Butterworth"
    ds.NumberOfFrames = int(frames.shape[0])
    ds.FrameIncrementPointer = SLICE_VECTOR_TAG
    _set_pixels(ds, frames)
    ds.PixelSpacing = [_ds(geometry.pixel_spacing[0]), _ds(geometry.pixel_spacing[1])]
    if value_mapping == "rescale":
        ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
    else:
        mapping = Dataset()
        mapping.RealWorldValueFirstValueMapped = int(frames.min())
        mapping.RealWorldValueLastValueMapped = int(frames.max())
        mapping.RealWorldValueIntercept = float(_ds(intercept))
        mapping.RealWorldValueSlope = float(_ds(slope))
        mapping.LUTExplanation = "counts"
        mapping.LUTLabel = "COUNTS"
        mapping.MeasurementUnitsCodeSequence = [_code("{counts}", "UCUM", "Counts")]
        ds.RealWorldValueMappingSequence = [mapping]
    window = Dataset()
    window_range = Dataset()
    window_range.EnergyWindowLowerLimit, window_range.EnergyWindowUpperLimit = (_ds(v) for v in _TC99M_WINDOW_KEV)
    window.EnergyWindowRangeSequence = [window_range]
    window.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = [window]
    ds.NumberOfEnergyWindows = 1
    ds.RadiopharmaceuticalInformationSequence = [_radiopharmaceutical_item(header, pet=False)]
    detector = Dataset()
    detector.CollimatorGridName = "LEHR"
    detector.CollimatorType = "PARA"
    detector.ImagePositionPatient = [_ds(v) for v in geometry.position(first_frame)]
    detector.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.DetectorInformationSequence = [detector]
    ds.NumberOfDetectors = 1
    rotation = Dataset()
    rotation.StartAngle, rotation.AngularStep, rotation.ScanArc = "0", "3", "180"
    rotation.RotationDirection = "CC"
    rotation.NumberOfFramesInRotation = 60
    rotation.ActualFrameDuration = 25000
    rotation.TableTraverse = "0"
    ds.RotationInformationSequence = [rotation]
    ds.NumberOfRotations = 1
    ds.SliceVector = list(range(1, int(frames.shape[0]) + 1))
    ds.NumberOfSlices = int(frames.shape[0])
    ds.AcquisitionContextSequence = []
    return ds


def _volume_and_affine(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(i, j, k)`` data and the float64 RAS+ affine of a 3D image."""
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    return data, np.asarray(image.affine, dtype=np.float64)


def nifti_to_nm(
    image: nib.Nifti1Image,
    *,
    negative_spacing: bool = False,
    value_mapping: Literal["rescale", "real_world"] = "rescale",
    signed_pixels: bool = False,
    modality: str = "NM",
    **identity: Unpack[SeriesIdentity],
) -> Dataset:
    """Write a NIfTI volume as one NM Image Storage multi-frame RECON TOMO instance.

    Parameters
    ----------
    image
        3D volume, voxel order ``(i, j, k)`` = (column, row, slice), RAS+ affine.
    **identity
        Patient, study and series: see :class:`SeriesIdentity` (``patient_name`` and
        ``patient_id`` required; UIDs generated when missing).
    negative_spacing
        Store frames along ``-n`` with a negative SpacingBetweenSlices (GE style).
    value_mapping
        ``rescale`` (RescaleSlope/Intercept) or ``real_world`` (RealWorldValueMappingSequence).
    signed_pixels
        Store int16 instead of uint16.
    modality
        Modality value (``NM``; GE sometimes writes ``OT``).

    Returns
    -------
    pydicom.Dataset
        With ``file_meta`` (Explicit VR Little Endian); frame ``f`` holds slice
        ``stack_geometry(...).slice_order[f]`` as ``(rows, columns)`` = ``data[:, :, k].T``.
    """
    data, affine = _volume_and_affine(image)
    geometry = stack_geometry(affine, data.shape[2], negative_spacing=negative_spacing)
    stored, slope, intercept = quantise(data, signed=signed_pixels)
    frames = stored.transpose(2, 1, 0)[geometry.slice_order]
    header = _header(**identity)
    return _nm_dataset(
        header, frames, geometry, 0, slope, intercept, modality=modality, value_mapping=value_mapping, instance_number=1
    )


def nifti_to_nm_series(
    image: nib.Nifti1Image,
    *,
    value_mapping: Literal["rescale", "real_world"] = "rescale",
    **identity: Unpack[SeriesIdentity],
) -> list[Dataset]:
    """Write a NIfTI volume as NM RECON TOMO files of one frame each.

    Each file has its own DetectorInformationSequence position, NumberOfFrames 1,
    SliceVector [1] and NumberOfSlices 1; InstanceNumber increases along the slice
    normal. Parameters as :func:`nifti_to_nm`.

    Returns
    -------
    list of pydicom.Dataset
        One dataset per slice, in slice order ``k``.
    """
    data, affine = _volume_and_affine(image)
    geometry = stack_geometry(affine, data.shape[2])
    stored, slope, intercept = quantise(data)
    frames = stored.transpose(2, 1, 0)[geometry.slice_order]
    header = _header(**identity)
    by_slice: dict[int, Dataset] = {}
    for f, k in enumerate(geometry.slice_order):
        by_slice[int(k)] = _nm_dataset(
            header,
            frames[f : f + 1],
            geometry,
            f,
            slope,
            intercept,
            modality="NM",
            value_mapping=value_mapping,
            instance_number=f + 1,
        )
    return [by_slice[k] for k in range(data.shape[2])]


def nifti_to_pet_like_series(
    image: nib.Nifti1Image,
    *,
    modality: Literal["PT", "NM"] = "PT",
    **identity: Unpack[SeriesIdentity],
) -> list[Dataset]:
    """Write a NIfTI volume as a PET Image Storage series (top-level IPP/IOP, one slice per file).

    ``modality="NM"`` imitates SPECT exported through a PET class. Other parameters
    as :func:`nifti_to_nm`.

    Returns
    -------
    list of pydicom.Dataset
        One dataset per slice, in slice order ``k``; pixel rows x columns = ``data[:, :, k].T``.
    """
    data, affine = _volume_and_affine(image)
    geometry = stack_geometry(affine, data.shape[2])
    stored, slope, intercept = quantise(data, signed=bool(data.min() < 0), zero_intercept=True)
    header = _header(**identity)
    by_slice: dict[int, Dataset] = {}
    for f, k in enumerate(int(v) for v in geometry.slice_order):
        ds = _base_dataset(header, PET_IMAGE_STORAGE, modality, f + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.Units = "CNTS"
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.CorrectedImage = ["ATTN"]
        ds.DecayCorrection = "NONE"
        ds.CollimatorType = "NONE"
        ds.NumberOfSlices = int(data.shape[2])
        ds.RadiopharmaceuticalInformationSequence = [_radiopharmaceutical_item(header, pet=True)]
        ds.SliceThickness = _ds(abs(geometry.spacing))
        ds.ImagePositionPatient = [_ds(v) for v in geometry.position(f)]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.PixelSpacing = [_ds(geometry.pixel_spacing[0]), _ds(geometry.pixel_spacing[1])]
        ds.SliceLocation = _ds(float(geometry.position(f) @ geometry.normal))
        _set_pixels(ds, stored[:, :, k].T[None])
        ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
        ds.FrameReferenceTime = "0"
        ds.ImageIndex = f + 1
        ds.ActualFrameDuration = 900000
        by_slice[k] = ds
    return [by_slice[k] for k in range(data.shape[2])]


def dataset_to_bytes(ds: Dataset) -> bytes:
    """Encode a dataset as a DICOM Part 10 file (preamble + file meta)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
