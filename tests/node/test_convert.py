"""Series -> NIfTI dispatch and the decision which series the node processes."""

from __future__ import annotations

import numpy as np
import pytest

from node.convert import SeriesForm, is_reconstructed_emission, read_single_frame_series, series_to_nifti
from node.errors import UnsupportedSeriesError
from node.nm_writer import nifti_to_nm, nifti_to_nm_series, nifti_to_pet_like_series

IDENTITY = {"patient_name": "Phantom^Convert", "patient_id": "CONVERT01"}


def _written(form: str, image):
    if form == "nm":
        return [nifti_to_nm(image, **IDENTITY)]
    if form == "files":
        return nifti_to_nm_series(image, **IDENTITY)
    return nifti_to_pet_like_series(image, **IDENTITY)


@pytest.mark.parametrize(
    ("form", "expected"),
    [("nm", SeriesForm.NM_MULTIFRAME), ("files", SeriesForm.NM_SLICE_FILES), ("pet", SeriesForm.SINGLE_FRAME)],
)
@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_every_form_converts_to_the_same_volume(form, expected, kind, nm_phantom, dicom_reencode):
    image, _ = nm_phantom(kind)
    datasets = [dicom_reencode(ds) for ds in _written(form, image)][::-1]

    converted = series_to_nifti(datasets)

    assert converted.form is expected
    assert converted.image.shape == image.shape
    np.testing.assert_allclose(converted.image.affine, image.affine, atol=1e-4)
    slope = float(datasets[0].RescaleSlope)
    np.testing.assert_allclose(converted.image.get_fdata(), image.get_fdata(), atol=slope / 2 + 1e-5)
    assert len(converted.references) == image.shape[2]
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert {ref.sop_instance_uid for ref in converted.references} == uids
    if expected is SeriesForm.SINGLE_FRAME:
        assert all(ref.frame_number is None for ref in converted.references)
    else:
        assert all(ref.frame_number is not None for ref in converted.references)


def test_single_frame_reader_applies_each_files_rescale(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    datasets = [dicom_reencode(ds) for ds in nifti_to_pet_like_series(image, **IDENTITY)]
    datasets[5].RescaleSlope = float(datasets[5].RescaleSlope) * 3

    converted = read_single_frame_series(datasets)

    data = converted.image.get_fdata()
    np.testing.assert_allclose(data[:, :, 5], 3 * image.get_fdata()[:, :, 5], rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(data[:, :, 4], image.get_fdata()[:, :, 4], atol=1e-2)


def test_gated_series_is_unsupported(nm_phantom):
    image, _ = nm_phantom("axial")
    ds = nifti_to_nm(image, **IDENTITY)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON GATED TOMO", "EMISSION"]
    with pytest.raises(UnsupportedSeriesError, match="gated"):
        series_to_nifti([ds])


def test_two_reconstructions_in_one_series_are_unsupported(nm_phantom):
    image, _ = nm_phantom("axial")
    first = nifti_to_nm(image, **IDENTITY)
    second = nifti_to_nm(image, series_instance_uid=first.SeriesInstanceUID, **IDENTITY)
    with pytest.raises(UnsupportedSeriesError, match="single reconstruction"):
        series_to_nifti([first, second])


def test_mixed_sop_classes_are_rejected(nm_phantom):
    image, _ = nm_phantom("axial")
    with pytest.raises(ValueError, match="mixes"):
        series_to_nifti([nifti_to_nm(image, **IDENTITY), nifti_to_pet_like_series(image, **IDENTITY)[0]])


def test_images_without_any_geometry_are_unsupported(nm_phantom):
    image, _ = nm_phantom("axial")
    ds = nifti_to_pet_like_series(image, **IDENTITY)[0]
    del ds.ImagePositionPatient
    with pytest.raises(UnsupportedSeriesError, match="geometry"):
        series_to_nifti([ds])


def test_empty_series_is_a_value_error():
    with pytest.raises(ValueError, match="no datasets"):
        series_to_nifti([])


@pytest.fixture
def headers(nm_phantom):
    image, _ = nm_phantom("axial")
    small = image.slicer[:, :, :2]
    nm = nifti_to_nm(small, **IDENTITY)
    pet = nifti_to_pet_like_series(small, **IDENTITY)[0]
    pet_nm = nifti_to_pet_like_series(small, modality="NM", **IDENTITY)[0]
    return nm, pet, pet_nm


def _with_image_type(ds, value3: str):
    ds = ds.copy()
    ds.ImageType = ["ORIGINAL", "PRIMARY", value3, "EMISSION"]
    return ds


def test_nm_recon_tomo_is_processed_even_with_modality_ot(headers):
    nm, _, _ = headers
    assert is_reconstructed_emission(nm) == (True, "NM RECON TOMO reconstruction")
    ge_style = nm.copy()
    ge_style.Modality = "OT"
    assert is_reconstructed_emission(ge_style)[0] is True
    retired = nm.copy()
    retired.SOPClassUID = "1.2.840.10008.5.1.4.1.1.5"  # retired NM class: no SEG can reference it
    assert is_reconstructed_emission(retired, accept_pet_like=True)[0] is False


def test_gated_is_refused_with_its_reason(headers):
    nm, _, _ = headers
    assert is_reconstructed_emission(_with_image_type(nm, "RECON GATED TOMO")) == (False, "gated, not supported yet")


@pytest.mark.parametrize("value3", ["TOMO", "STATIC", "WHOLE BODY", "DYNAMIC", "GATED TOMO"])
def test_projections_and_planar_nm_are_refused(value3, headers):
    nm, _, _ = headers
    accepted, reason = is_reconstructed_emission(_with_image_type(nm, value3), accept_pet_like=True)
    assert not accepted
    assert reason


def test_pet_like_series_only_with_the_flag(headers):
    _, pet, pet_nm = headers
    assert is_reconstructed_emission(pet)[0] is False
    assert is_reconstructed_emission(pet, accept_pet_like=True)[0] is True
    assert is_reconstructed_emission(pet_nm, accept_pet_like=True)[0] is True


@pytest.mark.parametrize(
    ("modality", "sop_class"), [("CT", "1.2.840.10008.5.1.4.1.1.2"), ("MR", "1.2.840.10008.5.1.4.1.1.4")]
)
def test_ct_and_mr_are_refused(modality, sop_class, headers):
    _, pet, _ = headers
    other = pet.copy()
    other.Modality, other.SOPClassUID = modality, sop_class
    accepted, reason = is_reconstructed_emission(other, accept_pet_like=True)
    assert not accepted
    assert modality in reason
