"""SEG builder: a dciodvfy-clean BINARY SEG on the real source frames, read back exactly."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from node.convert import series_to_nifti
from node.nm_reader import nm_frame_geometry
from node.nm_writer import dataset_to_bytes, nifti_to_nm, nifti_to_nm_series, nifti_to_pet_like_series
from node.seg_encode import RESEARCH_MARKING, build_seg, read_seg_mask, with_research_marking

IDENTITY = {"patient_name": "Phantom^Seg", "patient_id": "SEG01"}
SEG_OPTIONS = {
    "series_number": 901,
    "series_description": "LV myocardium",
    "content_description": "LV myocardium (U-Net)",
    "algorithm_name": "spect-node 3D U-Net",
    "algorithm_version": "0.1.0+test",
    "manufacturer": "spect-node",
}

FORMS = [
    pytest.param(("nm", "axial", {}), id="nm-axial"),
    pytest.param(("nm", "axial", {"negative_spacing": True}), id="nm-axial-negative-sbs"),
    pytest.param(("nm", "oblique", {}), id="nm-oblique"),
    pytest.param(("nm", "oblique", {"negative_spacing": True}), id="nm-oblique-negative-sbs"),
    pytest.param(("nm-shuffled", "oblique", {}), id="nm-oblique-shuffled-slice-vector"),
    pytest.param(("files", "axial", {}), id="nm-slice-files-axial"),
    pytest.param(("files", "oblique", {}), id="nm-slice-files-oblique"),
    pytest.param(("pet", "oblique", {"modality": "PT"}), id="pet-like-PT-oblique"),
    pytest.param(("pet", "axial", {"modality": "NM"}), id="pet-like-NM-axial"),
]

NM_AXIAL = [p for p in FORMS if p.id == "nm-axial"]
SLICE_FILES_AXIAL = [p for p in FORMS if p.id == "nm-slice-files-axial"]


def _write(form: str, image, options: dict) -> list[Dataset]:
    if form.startswith("nm"):
        return [nifti_to_nm(image, **options, **IDENTITY)]
    if form == "files":
        return nifti_to_nm_series(image, **options, **IDENTITY)
    return nifti_to_pet_like_series(image, **options, **IDENTITY)


def _source_frame_position(source: Dataset, frame_number: int | None) -> np.ndarray:
    if "DetectorInformationSequence" in source:
        return nm_frame_geometry(source).frame_positions[int(frame_number) - 1]
    return np.array([float(v) for v in source.ImagePositionPatient])


@pytest.fixture
def converted(request, nm_phantom, dicom_reencode, shuffle_nm_frames):
    form, kind, options = request.param
    image, mask = nm_phantom(kind)
    sources = [dicom_reencode(ds) for ds in _write(form, image, options)]
    if form == "nm-shuffled":
        sources = [shuffle_nm_frames(sources[0], 11)[0]]
    series = series_to_nifti(sources)
    # The converted grid may run the other way (negative spacing): threshold the shell back out.
    mask_on_grid = series.image.get_fdata() > 60
    assert mask_on_grid.sum() == mask.sum()
    return sources, series, mask_on_grid


@pytest.mark.parametrize("converted", FORMS, indirect=True)
def test_seg_is_valid_and_reads_back_exactly(converted, dciodvfy):
    sources, series, mask = converted
    sop_instance_uid, series_instance_uid = generate_uid(), generate_uid()

    seg = build_seg(
        sources,
        mask,
        converted_series_refs=series.references,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        **SEG_OPTIONS,
    )
    data = dataset_to_bytes(seg)

    errors, warnings = dciodvfy(data)
    assert errors == []
    assert warnings == []
    back = read_seg_mask(data, series.references)
    assert back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_array_equal(
        read_seg_mask(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)), series.references), mask
    )

    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.SOPInstanceUID == sop_instance_uid and ds.SeriesInstanceUID == series_instance_uid
    assert ds.SeriesNumber == 901
    for text in (ds.SeriesDescription, ds.ContentDescription):
        assert RESEARCH_MARKING in text and len(text) <= 64
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        assert ds[keyword].value == sources[0][keyword].value
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "Left ventricle myocardium"
    assert (
        segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
        segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator,
    ) == ("91723000", "SCT")
    assert (
        segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
    ) == ("49848007", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (
        algorithm.AlgorithmFamilyCodeSequence[0].CodeValue,
        algorithm.AlgorithmFamilyCodeSequence[0].CodingSchemeDesignator,
    ) == ("123110", "DCM")
    assert algorithm.AlgorithmName == SEG_OPTIONS["algorithm_name"]
    assert algorithm.AlgorithmVersion == SEG_OPTIONS["algorithm_version"]

    # Empty slices are omitted, and every frame points at the source frame at its own position.
    assert int(ds.NumberOfFrames) == int(np.count_nonzero(mask.any(axis=(0, 1))))
    by_uid = {source.SOPInstanceUID: source for source in sources}
    for item in ds.PerFrameFunctionalGroupsSequence:
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        source = by_uid[reference.ReferencedSOPInstanceUID]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        frame_number = reference.get("ReferencedFrameNumber")
        assert (frame_number is None) == ("DetectorInformationSequence" not in source)
        seg_position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(seg_position, _source_frame_position(source, frame_number), atol=1e-3)


@pytest.mark.parametrize("converted", NM_AXIAL, indirect=True)
def test_rebuilding_repeats_the_given_uids_and_content(converted):
    sources, series, mask = converted
    uids = {"sop_instance_uid": generate_uid(), "series_instance_uid": generate_uid()}
    first = build_seg(sources, mask, converted_series_refs=series.references, **uids, **SEG_OPTIONS)
    second = build_seg(sources, mask, converted_series_refs=series.references, **uids, **SEG_OPTIONS)
    assert first.SOPInstanceUID == second.SOPInstanceUID == uids["sop_instance_uid"]
    assert first.PixelData == second.PixelData


@pytest.mark.parametrize("converted", NM_AXIAL, indirect=True)
def test_empty_mask_reads_back_empty(converted):
    sources, series, mask = converted
    seg = build_seg(sources, np.zeros_like(mask), converted_series_refs=series.references, **SEG_OPTIONS)
    assert not read_seg_mask(dataset_to_bytes(seg), series.references).any()


@pytest.mark.parametrize("converted", NM_AXIAL, indirect=True)
def test_mask_not_on_the_source_grid_is_refused(converted):
    sources, series, mask = converted
    with pytest.raises(ValueError, match="does not match the source grid"):
        build_seg(sources, mask.transpose(1, 0, 2), converted_series_refs=series.references, **SEG_OPTIONS)
    with pytest.raises(ValueError, match="binary"):
        build_seg(sources, mask * 2, converted_series_refs=series.references, **SEG_OPTIONS)


@pytest.mark.parametrize("converted", SLICE_FILES_AXIAL, indirect=True)
def test_references_to_unknown_instances_are_refused(converted):
    sources, series, mask = converted
    with pytest.raises(ValueError, match="not among the source datasets"):
        build_seg(sources[1:], mask, converted_series_refs=series.references, **SEG_OPTIONS)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "LV myocardium",
        "x" * 80,
        f"LV myocardium - {RESEARCH_MARKING.lower()}",
        f"Automated LV myocardium segmentation v2 {RESEARCH_MARKING}",  # 86 characters, marking last
    ],
)
def test_research_marking_always_present_and_fits_lo(text):
    marked = with_research_marking(text)
    assert RESEARCH_MARKING.lower() in marked.lower()
    assert len(marked) <= 64
    assert marked.isascii()


def test_completing_a_source_leaves_the_callers_dataset_alone():
    (source,) = _write("nm", _tiny_image(), {})
    source.PatientSex = "U"  # not a SEG value: the copy's is emptied
    build_seg(
        [source],
        np.zeros((16, 16, 10), dtype=bool),
        converted_series_refs=series_to_nifti([source]).references,
        **SEG_OPTIONS,
    )
    assert source.PatientSex == "U"


def _tiny_image() -> nib.Nifti1Image:
    """16x16 pixels of 3 mm, 10 slices 4 mm apart."""
    return nib.Nifti1Image(np.random.default_rng(1).random((16, 16, 10)).astype(np.float32), np.diag([3, 3, 4, 1.0]))


@pytest.mark.parametrize("form", ["files", "pet"])
def test_seg_states_the_slice_spacing_of_its_frames_not_the_headers(form, dciodvfy):
    """Slices 4 mm apart whose headers claim 5 mm: the reader places them by position, and
    the SEG must say 4 mm, or highdicom (and viewers) cannot stack its frames."""
    sources = _write(form, _tiny_image(), {})
    for ds in sources:
        ds.SpacingBetweenSlices = "5"
    series = series_to_nifti(sources)
    mask = np.zeros(series.image.shape, dtype=bool)
    mask[3:6, 3:6, 2:8] = True
    data = dataset_to_bytes(build_seg(sources, mask, converted_series_refs=series.references, **SEG_OPTIONS))
    assert dciodvfy(data)[0] == []
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(data))
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices) == 4.0
    assert seg.get_volume().spacing == pytest.approx((4.0, 3.0, 3.0))
    np.testing.assert_array_equal(read_seg_mask(data, series.references), mask)


def _strip_identity(sources: list[Dataset]) -> None:
    """What old or anonymised NM reconstructions lack: the frame of reference, Type 2 identity, a valid sex."""
    for ds in sources:
        for keyword in ("FrameOfReferenceUID", "StudyID", "AccessionNumber", "PatientBirthDate", "StudyTime"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PatientSex = "U"


def _strip_slice_measures(sources: list[Dataset]) -> None:
    for ds in sources:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            if keyword in ds:
                delattr(ds, keyword)


@pytest.mark.parametrize(
    ("converted", "damage"),
    [
        pytest.param(NM_AXIAL[0].values[0], _strip_identity, id="nm-no-frame-of-reference-no-type-2"),
        pytest.param(SLICE_FILES_AXIAL[0].values[0], _strip_identity, id="slice-files-no-frame-of-reference"),
        pytest.param(SLICE_FILES_AXIAL[0].values[0], _strip_slice_measures, id="slice-files-no-spacing-no-thickness"),
    ],
    indirect=["converted"],
)
def test_sources_missing_optional_attributes_still_give_a_valid_seg(converted, damage, dciodvfy):
    sources, series, mask = converted
    damage(sources)
    build = {"converted_series_refs": series.references, "sop_instance_uid": generate_uid(), **SEG_OPTIONS}
    data = dataset_to_bytes(build_seg(sources, mask, **build))
    errors, warnings = dciodvfy(data)
    assert errors == [] and all("needed to build DICOMDIR" in w for w in warnings)  # the empty Study ID/Time
    np.testing.assert_array_equal(read_seg_mask(data, series.references), mask)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    again = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dataset_to_bytes(build_seg(sources, mask, **build))))
    assert ds.FrameOfReferenceUID == again.FrameOfReferenceUID  # derived, the same on every run
    if damage is _strip_identity:
        assert ds.PatientID == sources[0].PatientID and not ds.PatientSex and not ds.StudyID
