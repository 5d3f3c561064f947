"""Encode a myocardium mask as a DICOM Segmentation (BINARY) with highdicom, and read it back.

highdicom knows nothing of NM's DetectorInformationSequence, so NM sources are
given to it as metadata-only copies (no pixel data, UIDs unchanged) carrying the
geometry as functional groups: a shared PlaneOrientationSequence and
PixelMeasuresSequence (with ``|SpacingBetweenSlices|``) and one computed
PlanePositionSequence per frame, file order. The SEG then references the real NM
instance and frame numbers. highdicom accepts a single multi-frame source only, so
for one-slice-per-file NM the first file is the source, the others
``further_source_images``, and the per-frame source references, which highdicom
cannot match across several multi-frame instances, are added here by position.

Masks are on the converted source grid, NIfTI voxel order ``(i, j, k)`` =
(column, row, slice); ``references[k]`` (from :mod:`node.convert`) maps slice ``k``
to its source instance and frame.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from node.nm_reader import NM_IMAGE_STORAGE, SliceReference, nm_frame_geometry

logger = logging.getLogger(__name__)

SEGMENT_LABEL = "Left ventricle myocardium"
RESEARCH_MARKING = "RESEARCH USE ONLY - NOT FOR CLINICAL DIAGNOSIS"
_LO_MAX = 64
_PIXEL_DATA_TAG = 0x7FE00010
_POSITION_TOLERANCE_MM = 1e-3


def with_research_marking(text: str) -> str:
    """``text`` carrying :data:`RESEARCH_MARKING` whole at its end, shortened to fit a 64-character LO."""
    text = text.strip()
    at = text.lower().find(RESEARCH_MARKING.lower())
    if at >= 0:
        if len(text) <= _LO_MAX:
            return text
        text = (text[:at] + text[at + len(RESEARCH_MARKING) :]).strip(" -")  # put back below, in full
    if not text:
        return RESEARCH_MARKING
    room = _LO_MAX - len(RESEARCH_MARKING) - 3
    return f"{text[:room].rstrip()} - {RESEARCH_MARKING}"


def _shallow_copy(ds: Dataset, without: int | None = None) -> Dataset:
    """A new dataset sharing ``ds``'s elements (all but the tag ``without``) and its file meta.

    Assigning an existing keyword of the copy would write into the shared element: replace
    elements instead (``del copy.X`` first).
    """
    copy = Dataset({tag: element for tag, element in ds.items() if tag != without})
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def nm_source_metadata(ds: Dataset) -> Dataset:
    """Metadata-only copy of an NM instance with its geometry as functional groups.

    Parameters
    ----------
    ds
        NM Image Storage dataset (pixel data optional; it is not copied).

    Returns
    -------
    pydicom.Dataset
        Same UIDs and attributes (elements shared, not copied) without PixelData, plus
        SharedFunctionalGroupsSequence (PlaneOrientation from the detector IOP,
        PixelMeasures with ``|SpacingBetweenSlices|``) and PerFrameFunctionalGroupsSequence
        (one PlanePosition per frame, file order).
    """
    geometry = nm_frame_geometry(ds)
    copy = _shallow_copy(ds, without=_PIXEL_DATA_TAG)
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(ds.DetectorInformationSequence[0].ImageOrientationPatient)
    measures = Dataset()
    measures.PixelSpacing = list(ds.PixelSpacing)
    spacing = abs(geometry.spacing_between_slices)
    if spacing > 0:
        measures.SpacingBetweenSlices = format_number_as_ds(spacing)
        measures.SliceThickness = ds.get("SliceThickness") or measures.SpacingBetweenSlices
    elif ds.get("SliceThickness") not in (None, ""):
        measures.SliceThickness = ds.SliceThickness
    shared = Dataset()
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    copy.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position in geometry.frame_positions:
        plane = Dataset()
        plane.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
        item = Dataset()
        item.PlanePositionSequence = [plane]
        per_frame.append(item)
    copy.PerFrameFunctionalGroupsSequence = per_frame
    return copy


# Type 2 attributes of the Patient and General Study modules that highdicom copies from the
# source and cannot do without: an empty value is valid DICOM, an absent one stops the SEG.
_TYPE2_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def complete_source(ds: Dataset) -> Dataset:
    """A shallow copy of a source instance with what a SEG must copy from it present.

    Missing Type 2 patient/study attributes become empty, a PatientSex other than M, F or O
    becomes empty, and a source without a Frame of Reference (optional in the NM Image IOD)
    gets one derived from its study and series UIDs (the same for every instance of the
    series, and for every re-run). Elements are shared, not copied.
    """
    copy = _shallow_copy(ds)
    for keyword in _TYPE2_COPIED:
        if keyword not in copy:
            setattr(copy, keyword, None)
    sex = str(copy.get("PatientSex") or "").strip().upper()
    del copy.PatientSex  # a new element: the source's own stays as it was
    copy.PatientSex = sex if sex in ("M", "F", "O") else None
    if not copy.get("FrameOfReferenceUID"):
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        copy.FrameOfReferenceUID = generate_uid(entropy_srcs=[study, series, "frame of reference"])
    return copy


def _segment_description(algorithm_name: str, algorithm_version: str) -> hd.seg.SegmentDescription:
    """Segment 1: left-ventricle myocardium, found automatically by the named AI model."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.LeftVentricleMyocardium,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _planes(mask: np.ndarray, references: Sequence[SliceReference], rows: int, columns: int) -> np.ndarray:
    """``(K, rows, cols)`` uint8 planes in slice order from a ``(cols, rows, K)`` mask."""
    mask = np.asarray(mask)
    if mask.shape != (columns, rows, len(references)):
        raise ValueError(
            f"mask shape {mask.shape} does not match the source grid (columns, rows, slices) "
            f"= ({columns}, {rows}, {len(references)})"
        )
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(f"mask must be binary (0/1 or bool), found values {values[:5]}")
    return np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0))


@dataclass(frozen=True)
class _HighdicomInputs:
    """What one storage form hands to ``hd.seg.Segmentation``.

    ``pixel_array`` is ``(planes, rows, cols)`` uint8 matching ``source_images``
    frames (or ``plane_positions`` when given).
    """

    source_images: list[Dataset]
    pixel_array: np.ndarray
    further_source_images: list[Dataset] = field(default_factory=list)
    plane_positions: list[hd.PlanePositionSequence] | None = None


def _multiframe_inputs(source: Dataset, planes: np.ndarray, references: Sequence[SliceReference]) -> _HighdicomInputs:
    """One NM instance: frames in file order, geometry as functional groups."""
    frames = np.zeros((int(source.get("NumberOfFrames") or 1), *planes.shape[1:]), dtype=np.uint8)
    for k, ref in enumerate(references):
        frames[int(ref.frame_number or 1) - 1] = planes[k]
    return _HighdicomInputs([nm_source_metadata(source)], frames)


def _slice_file_inputs(sources_by_slice: Sequence[Dataset], planes: np.ndarray) -> _HighdicomInputs:
    """One-slice NM files: first file as source, the others further sources, explicit positions."""
    copies = [nm_source_metadata(ds) for ds in sources_by_slice]
    points = [
        [float(v) for v in copy.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
        for copy in copies
    ]
    if len(points) > 1:  # the stack's own step, whatever the headers say (the reader places slices by position)
        step = format_number_as_ds(_stack_step(points))
        for copy in copies:
            measures = copy.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            measures.SpacingBetweenSlices = step
            if "SliceThickness" not in measures:
                measures.SliceThickness = step
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, point) for point in points]
    return _HighdicomInputs(copies[:1], planes, copies[1:], positions)


def _stack_step(points: Sequence[Sequence[float]]) -> float:
    """Median distance between consecutive slice positions (mm), the slices in stack order."""
    return float(np.median(np.linalg.norm(np.diff(np.asarray(points, dtype=float), axis=0), axis=1)))


def _add_frame_references(seg: hd.seg.Segmentation, sources: Sequence[Dataset]) -> None:
    """Fill each frame's empty DerivationImageSequence with the one-frame NM file at its position."""
    positions = np.stack([nm_frame_geometry(src).frame_positions[0] for src in sources])
    derivation = hd.sr.CodedConcept.from_code(codes.cid7203.SegmentationImageDerivation)
    purpose = hd.sr.CodedConcept.from_code(codes.cid7202.SourceImageForImageProcessingOperation)
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        distances = np.linalg.norm(positions - position, axis=1)
        index = int(np.argmin(distances))
        if distances[index] > _POSITION_TOLERANCE_MM:
            raise ValueError(f"SEG frame at {position} matches no source file")
        source = Dataset()
        source.ReferencedSOPClassUID = sources[index].SOPClassUID
        source.ReferencedSOPInstanceUID = sources[index].SOPInstanceUID
        source.ReferencedFrameNumber = 1
        source.PurposeOfReferenceCodeSequence = [purpose]
        source.SpatialLocationsPreserved = "YES"
        derived = Dataset()
        derived.DerivationCodeSequence = [derivation]
        derived.SourceImageSequence = [source]
        item.DerivationImageSequence = [derived]


def build_seg(
    source_datasets: Sequence[Dataset],
    mask_on_source_grid: np.ndarray,
    *,
    converted_series_refs: Sequence[SliceReference],
    series_number: int,
    series_description: str,
    content_description: str,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str,
    manufacturer_model_name: str = "spect-node",
    software_versions: str | None = None,
    device_serial_number: str = "0",
    content_label: str = "LV_MYOCARDIUM",
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG of the left-ventricular myocardium on the source frames.

    Parameters
    ----------
    source_datasets
        The instances of the source series (pixel data not needed): one NM multi-frame
        instance, the NM one-slice files, or the single-frame (PET-like) images.
    mask_on_source_grid
        ``(columns, rows, K)`` bool or 0/1 array in the converted NIfTI's voxel order.
    converted_series_refs
        ``references`` of the :class:`node.convert.ConvertedSeries`: slice ``k`` ->
        (SOP Instance UID, frame number).
    series_number, series_description, content_description
        SEG series identity; both descriptions get :data:`RESEARCH_MARKING`.
    algorithm_name, algorithm_version
        Model identification (AI algorithm family DCM 123110).
    manufacturer, manufacturer_model_name, software_versions, device_serial_number
        Equipment module of the SEG (software versions default to the algorithm version).
    sop_instance_uid, series_instance_uid
        Fixed by the caller so that re-sends repeat the same instance; generated if None.

    Returns
    -------
    highdicom.seg.Segmentation
        Same patient, study and frame of reference as the source; empty frames omitted.

    Raises
    ------
    ValueError
        Mask shape or values not matching the source, references naming unknown
        instances, or sources of mixed kinds.
    """
    if not source_datasets:
        raise ValueError("no source datasets given")
    if not source_datasets[0].get("FrameOfReferenceUID"):
        logger.warning(
            "series %s has no Frame of Reference UID: the SEG gets one derived from it",
            source_datasets[0].get("SeriesInstanceUID"),
        )
    source_datasets = [complete_source(ds) for ds in source_datasets]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    missing = {ref.sop_instance_uid for ref in converted_series_refs} - by_uid.keys()
    if missing:
        raise ValueError(f"references name instances not among the source datasets: {sorted(missing)[:3]}")
    first = by_uid[converted_series_refs[0].sop_instance_uid]
    planes = _planes(mask_on_source_grid, converted_series_refs, int(first.Rows), int(first.Columns))
    is_nm = [str(ds.SOPClassUID) == NM_IMAGE_STORAGE for ds in source_datasets]
    if any(is_nm) and not all(is_nm):
        raise ValueError("source datasets mix NM and other SOP classes")

    uids = {ref.sop_instance_uid for ref in converted_series_refs}
    if all(is_nm) and len(uids) == 1:
        inputs = _multiframe_inputs(first, planes, converted_series_refs)
    elif all(is_nm):
        inputs = _slice_file_inputs([by_uid[ref.sop_instance_uid] for ref in converted_series_refs], planes)
    else:
        inputs = _HighdicomInputs([by_uid[ref.sop_instance_uid] for ref in converted_series_refs], planes)

    seg = hd.seg.Segmentation(
        source_images=inputs.source_images,
        pixel_array=inputs.pixel_array,
        further_source_images=inputs.further_source_images or None,
        plane_positions=inputs.plane_positions,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(algorithm_name, algorithm_version)],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=int(instance_number),
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions or algorithm_version,
        device_serial_number=device_serial_number,
        content_description=with_research_marking(content_description),
        content_label=content_label,
        series_description=with_research_marking(series_description),
        omit_empty_frames=True,
    )
    if inputs.further_source_images:
        _add_frame_references(seg, [*inputs.source_images, *inputs.further_source_images])
    if not all(is_nm) and len(inputs.source_images) > 1:
        # highdicom copies the images' SpacingBetweenSlices; the reader placed them by position
        points = [[float(v) for v in ds.ImagePositionPatient] for ds in inputs.source_images]
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures.SpacingBetweenSlices = format_number_as_ds(_stack_step(points))
    logger.info("SEG %s: %d frames", seg.SOPInstanceUID, int(seg.NumberOfFrames))
    return seg


def read_seg_mask(seg_dataset: Dataset | bytes, references: Sequence[SliceReference]) -> np.ndarray:
    """Read segment 1 of a SEG back onto the converted source grid.

    Parameters
    ----------
    seg_dataset
        The SEG as a dataset (e.g. a :class:`highdicom.seg.Segmentation`) or Part 10 bytes.
    references
        The converted series' slice references (slice ``k`` -> instance, frame).

    Returns
    -------
    numpy.ndarray
        bool ``(columns, rows, K)`` in NIfTI voxel order; frames the SEG omitted are empty.
    """
    if isinstance(seg_dataset, bytes):
        seg = hd.seg.segread(io.BytesIO(seg_dataset))
    else:
        seg = hd.seg.Segmentation.from_dataset(seg_dataset)
    options = {"segment_numbers": [1], "assert_missing_frames_are_empty": True, "dtype": np.uint8}
    uids = [ref.sop_instance_uid for ref in references]
    if all(ref.frame_number is None for ref in references):
        planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, **options)
    elif len(set(uids)) == 1:
        frames = [int(ref.frame_number or 1) for ref in references]
        planes = seg.get_pixels_by_source_frame(source_sop_instance_uid=uids[0], source_frame_numbers=frames, **options)
    else:
        planes = np.concatenate(
            [
                seg.get_pixels_by_source_frame(
                    source_sop_instance_uid=ref.sop_instance_uid,
                    source_frame_numbers=[int(ref.frame_number or 1)],
                    **options,
                )
                for ref in references
            ]
        )
    return planes[..., 0].transpose(2, 1, 0).astype(bool)
