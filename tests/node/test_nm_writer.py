"""NM writer: camera-like RECON TOMO files that dciodvfy accepts, with the geometry where cameras put it."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from node.nm_writer import (
    Radiopharmaceutical,
    dataset_to_bytes,
    nifti_to_nm,
    nifti_to_nm_series,
    nifti_to_pet_like_series,
    quantise,
    stack_geometry,
)

IDENTITY = {"patient_name": "Phantom^Writer", "patient_id": "WRITER01"}
# The NM IOD has no Modality LUT: top-level Rescale* make the file a "Standard Extended SOP Class".
KNOWN_RESCALE_WARNINGS = ("Rescale Intercept", "Rescale Slope", "Standard Extended SOP Class")


def _only_known_warnings(warnings: list[str]) -> bool:
    return all(any(known in line for known in KNOWN_RESCALE_WARNINGS) for line in warnings)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("axial", {}),
        ("axial", {"negative_spacing": True}),
        ("oblique", {}),
        ("oblique", {"negative_spacing": True}),
        ("axial", {"signed_pixels": True, "radiopharmaceutical": Radiopharmaceutical.SESTAMIBI}),
        ("axial", {"value_mapping": "real_world"}),
    ],
)
def test_multiframe_passes_dciodvfy(kind, options, nm_phantom, dciodvfy):
    image, _ = nm_phantom(kind)
    errors, warnings = dciodvfy(dataset_to_bytes(nifti_to_nm(image, **options, **IDENTITY)))
    assert errors == []
    assert _only_known_warnings(warnings), warnings
    if options.get("value_mapping") == "real_world":
        assert warnings == []


def test_multiframe_is_a_camera_like_recon_tomo(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, series_number=7, **IDENTITY))
    n_slices = image.shape[2]

    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.20"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    assert ds.Modality == "NM" and ds.SeriesNumber == 7
    assert ds.FrameIncrementPointer == 0x00540080
    assert int(ds.NumberOfFrames) == n_slices == int(ds.NumberOfSlices)
    assert list(ds.SliceVector) == list(range(1, n_slices + 1))
    assert (ds.Rows, ds.Columns) == (image.shape[1], image.shape[0])
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 0)
    assert ds.pixel_array.dtype == np.uint16
    for forbidden in ("EnergyWindowVector", "DetectorVector", "RotationVector", "ImagePositionPatient"):
        assert forbidden not in ds
    agent = ds.RadiopharmaceuticalInformationSequence[0]
    assert agent.RadiopharmaceuticalCodeSequence[0].CodeValue == "424118002"
    assert agent.RadiopharmaceuticalCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert agent.RadionuclideCodeSequence[0].CodingSchemeDesignator == "SCT"


def test_axial_geometry_is_written_in_lps_on_the_detector(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")  # affine diag(-4, -4.5, 5): i -> patient left, j -> posterior
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    detector = ds.DetectorInformationSequence[0]

    np.testing.assert_allclose([float(v) for v in detector.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-9)
    origin_ras = image.affine[:3, 3]
    np.testing.assert_allclose(
        [float(v) for v in detector.ImagePositionPatient], [-origin_ras[0], -origin_ras[1], origin_ras[2]], atol=1e-6
    )
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [4.5, 4.0])  # (row spacing, column spacing)
    assert float(ds.SpacingBetweenSlices) == pytest.approx(5.0)
    frame = ds.pixel_array[3].astype(float)  # frame f = slice k = f as (rows, columns) = data[:, :, k].T
    frame = frame * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(frame, image.get_fdata()[:, :, 3].T, atol=float(ds.RescaleSlope))


def test_negative_spacing_starts_at_the_far_end(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, negative_spacing=True, **IDENTITY))
    last_slice_ras = image.affine @ [0, 0, image.shape[2] - 1, 1]
    detector_position = [float(v) for v in ds.DetectorInformationSequence[0].ImagePositionPatient]
    np.testing.assert_allclose(
        detector_position, [-last_slice_ras[0], -last_slice_ras[1], last_slice_ras[2]], atol=1e-6
    )
    assert float(ds.SpacingBetweenSlices) == pytest.approx(-5.0)


def test_one_slice_per_file(nm_phantom, dicom_reencode, dciodvfy):
    image, _ = nm_phantom("oblique")
    files = nifti_to_nm_series(image, **IDENTITY)

    assert len(files) == image.shape[2]
    assert len({ds.SOPInstanceUID for ds in files}) == len(files)
    assert len({ds.SeriesInstanceUID for ds in files}) == 1
    positions = []
    for ds in (dicom_reencode(ds) for ds in files):
        assert int(ds.NumberOfFrames) == 1 and int(ds.NumberOfSlices) == 1
        assert int(ds.SliceVector) == 1
        positions.append([float(v) for v in ds.DetectorInformationSequence[0].ImagePositionPatient])
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    np.testing.assert_allclose(steps, 5.0, atol=1e-6)
    for ds in (files[0], files[len(files) // 2], files[-1]):
        errors, warnings = dciodvfy(dataset_to_bytes(ds))
        assert errors == []
        assert _only_known_warnings(warnings), warnings


@pytest.mark.parametrize("modality", ["PT", "NM"])
def test_pet_like_series_passes_dciodvfy(modality, nm_phantom, dicom_reencode, dciodvfy):
    image, _ = nm_phantom("oblique")
    files = nifti_to_pet_like_series(image, modality=modality, **IDENTITY)
    first = dicom_reencode(files[0])
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128" and first.Modality == modality
    assert "ImagePositionPatient" in first and "DetectorInformationSequence" not in first
    assert float(first.RescaleIntercept) == 0.0
    for ds in (files[0], files[-1]):
        errors, warnings = dciodvfy(dataset_to_bytes(ds))
        assert errors == []
        assert warnings == []


def test_sheared_affine_is_refused(nm_phantom):
    image, _ = nm_phantom("axial")
    sheared = image.affine.copy()
    sheared[0, 2] = 2.0
    with pytest.raises(ValueError, match="sheared"):
        stack_geometry(sheared, image.shape[2])


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("offset", [0.0, -37.5])
def test_quantise_error_is_within_half_a_step(signed, offset):
    values = np.random.default_rng(1).gamma(2.0, 40.0, size=(9, 8, 7)) + offset
    stored, slope, intercept = quantise(values, signed=signed)
    assert stored.dtype == (np.int16 if signed else np.uint16)
    assert np.max(np.abs(stored * slope + intercept - values)) <= slope / 2 + 1e-9
    assert slope < (values.max() - min(values.min(), 0)) / 30000


def test_quantise_constant_volume():
    stored, slope, intercept = quantise(np.full((2, 2, 2), 7.0))
    np.testing.assert_allclose(stored * slope + intercept, 7.0, atol=slope / 2)
