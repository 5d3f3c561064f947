"""NM reader: exact geometry and values for every storage form, clear errors otherwise."""

from __future__ import annotations

import logging
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from node.convert import is_reconstructed_emission
from node.dicom_values import MAX_VOXELS
from node.errors import InvalidSeriesError, UnsupportedSeriesError
from node.nm_reader import read_nm_multiframe, read_nm_series
from node.nm_writer import nifti_to_nm, nifti_to_nm_series

IDENTITY = {"patient_name": "Phantom^Reader", "patient_id": "READER01"}


def _flip_k(affine: np.ndarray, n_slices: int) -> np.ndarray:
    """Affine of the same volume with its slice axis reversed."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, n_slices - 1
    return affine @ flip


def _tolerance(ds) -> float:
    slope = float(ds.get("RescaleSlope") or ds.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    return slope / 2 + 1e-5


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_multiframe_round_trip_positive_spacing(kind, nm_phantom, dicom_reencode):
    image, _ = nm_phantom(kind)
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    assert float(ds.SpacingBetweenSlices) > 0

    volume = read_nm_multiframe(ds)

    assert volume.image.shape == image.shape
    assert volume.image.get_data_dtype() == np.float32
    np.testing.assert_allclose(volume.image.get_fdata(), image.get_fdata(), atol=_tolerance(ds))
    np.testing.assert_allclose(volume.image.affine, image.affine, atol=1e-4)
    assert volume.frame_order == tuple(range(1, image.shape[2] + 1))
    assert {ref.sop_instance_uid for ref in volume.references} == {ds.SOPInstanceUID}


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_multiframe_negative_spacing_keeps_world_geometry(kind, nm_phantom, dicom_reencode):
    image, _ = nm_phantom(kind)
    n_slices = image.shape[2]
    ds = dicom_reencode(nifti_to_nm(image, negative_spacing=True, **IDENTITY))
    assert float(ds.SpacingBetweenSlices) < 0

    volume = read_nm_multiframe(ds)

    # Frames run along -n: slice k read is slice K-1-k written, at the same place in space.
    np.testing.assert_allclose(volume.image.get_fdata()[:, :, ::-1], image.get_fdata(), atol=_tolerance(ds))
    np.testing.assert_allclose(volume.image.affine, _flip_k(image.affine, n_slices), atol=1e-4)
    assert volume.frame_order == tuple(range(1, n_slices + 1))


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_frames_are_ordered_by_slice_vector(kind, nm_phantom, dicom_reencode, shuffle_nm_frames):
    image, _ = nm_phantom(kind)
    ds, permutation = shuffle_nm_frames(dicom_reencode(nifti_to_nm(image, **IDENTITY)), 7)

    volume = read_nm_multiframe(ds)

    np.testing.assert_allclose(volume.image.get_fdata(), image.get_fdata(), atol=_tolerance(ds))
    np.testing.assert_allclose(volume.image.affine, image.affine, atol=1e-4)
    expected_frames = tuple(int(np.flatnonzero(permutation == k)[0]) + 1 for k in range(image.shape[2]))
    assert volume.frame_order == expected_frames


def test_real_world_value_mapping_is_applied(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, value_mapping="real_world", **IDENTITY))
    assert "RescaleSlope" not in ds and "RealWorldValueMappingSequence" in ds

    volume = read_nm_multiframe(ds)

    np.testing.assert_allclose(volume.image.get_fdata(), image.get_fdata(), atol=_tolerance(ds))


def test_top_level_rescale_takes_precedence_over_real_world_mapping(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, value_mapping="real_world", **IDENTITY))
    slope = float(ds.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    ds.RescaleSlope, ds.RescaleIntercept = slope * 2, 0

    volume = read_nm_multiframe(ds)

    np.testing.assert_allclose(volume.image.get_fdata(), 2 * image.get_fdata(), atol=2 * _tolerance(ds))


def test_signed_pixels_ge_style(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    shifted = image.__class__(image.get_fdata().astype(np.float32) - 50.0, image.affine)
    ds = dicom_reencode(nifti_to_nm(shifted, signed_pixels=True, negative_spacing=True, modality="OT", **IDENTITY))
    assert ds.PixelRepresentation == 1 and ds.Modality == "OT"

    volume = read_nm_multiframe(ds)

    assert volume.image.get_fdata().min() < -40
    np.testing.assert_allclose(volume.image.get_fdata()[:, :, ::-1], shifted.get_fdata(), atol=_tolerance(ds))


def test_missing_spacing_between_slices_falls_back_to_slice_thickness(nm_phantom, dicom_reencode, caplog):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    del ds.SpacingBetweenSlices

    with caplog.at_level(logging.WARNING, logger="node.nm_reader"):
        volume = read_nm_multiframe(ds)

    assert "SliceThickness" in caplog.text
    np.testing.assert_allclose(volume.image.affine, image.affine, atol=1e-4)


def _drop_detector(ds):
    del ds.DetectorInformationSequence


def _drop_detector_position(ds):
    del ds.DetectorInformationSequence[0].ImagePositionPatient


def _drop_pixel_spacing(ds):
    del ds.PixelSpacing


def _truncate_pixels(ds):
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _wrong_frame_count(ds):
    ds.NumberOfFrames = int(ds.NumberOfFrames) - 1


def _drop_slice_vector(ds):
    del ds.SliceVector


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_detector, "DetectorInformationSequence"),
        (_drop_detector_position, "ImagePositionPatient"),
        (_drop_pixel_spacing, "PixelSpacing"),
        (_truncate_pixels, "shorter than rows\\*cols\\*frames"),
        (_wrong_frame_count, "NumberOfFrames .* inconsistent with SliceVector"),
        (_drop_slice_vector, "no SliceVector"),
    ],
)
def test_malformed_multiframe_raises_clear_value_error(damage, message, nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    damage(ds)
    with pytest.raises(InvalidSeriesError, match=f"^NM instance {ds.SOPInstanceUID}: .*{message}"):
        read_nm_multiframe(ds)


def _one_voxel(ds):
    ds.Rows = ds.Columns = ds.NumberOfFrames = 1
    ds.SliceVector = [1]
    ds.PixelData = ds.PixelData[:2]


def _nan_orientation(ds):
    ds.DetectorInformationSequence[0].ImageOrientationPatient = [float("nan"), 0, 0, 0, 1, 0]


def _zero_slice_spacing(ds):
    ds.SpacingBetweenSlices = 0


def _negative_pixel_spacing(ds):
    ds.PixelSpacing = [-4.5, 4.0]


def _twelve_bits_allocated(ds):
    ds.BitsAllocated = 12


def _slice_vector_with_gaps(ds):
    ds.SliceVector = [2 * v for v in ds.SliceVector]


def _infinite_rescale(ds):
    ds.RescaleSlope = "1e308"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_one_voxel, "declared volume 1x1x1 .* too small"),
        (_nan_orientation, "ImageOrientationPatient .* not finite"),
        (_zero_slice_spacing, "slice spacing of 0 mm"),
        (_negative_pixel_spacing, "PixelSpacing .* must be positive"),
        (_twelve_bits_allocated, "BitsAllocated 12 is not supported"),
        (_slice_vector_with_gaps, "SliceVector values must be distinct consecutive integers"),
        (_infinite_rescale, "overflow float32"),
    ],
)
def test_implausible_multiframe_raises_invalid_series_error(damage, message, nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    damage(ds)
    with pytest.raises(InvalidSeriesError, match=f"^NM instance {ds.SOPInstanceUID}: .*{message}"):
        read_nm_multiframe(dicom_reencode(ds))


def test_huge_declared_volume_is_refused_before_any_pixel_is_read(nm_phantom, dicom_reencode):
    """1024x1024x1024 declared with a few kB of pixels: refused by size, nothing large allocated."""
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    ds.Rows = ds.Columns = ds.NumberOfFrames = 1024
    ds.SliceVector = list(range(1, 1025))
    ds = dicom_reencode(ds)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidSeriesError, match=f"1024x1024x1024 .* larger than the {MAX_VOXELS} voxels"):
            read_nm_multiframe(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


@pytest.mark.parametrize("image_type", ["RECON GATED TOMO", "TOMO", "STATIC", None])
def test_gated_and_projection_images_are_unsupported(image_type, nm_phantom, dicom_reencode):
    """The reader refuses what the node's series check refuses, a missing value 3 included."""
    image, _ = nm_phantom("axial")
    ds = dicom_reencode(nifti_to_nm(image, **IDENTITY))
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if image_type is None else ["ORIGINAL", "PRIMARY", image_type, "EMISSION"]
    assert is_reconstructed_emission(ds)[0] is False
    message = "no value 3" if image_type is None else "gated" if "GATED" in image_type else image_type
    with pytest.raises(UnsupportedSeriesError, match=message):
        read_nm_multiframe(ds)


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_one_slice_per_file_round_trip_any_file_order(kind, nm_phantom, dicom_reencode):
    image, _ = nm_phantom(kind)
    files = [dicom_reencode(ds) for ds in nifti_to_nm_series(image, **IDENTITY)]
    shuffled = [files[i] for i in np.random.default_rng(3).permutation(len(files))]

    volume = read_nm_series(shuffled)

    np.testing.assert_allclose(volume.image.get_fdata(), image.get_fdata(), atol=_tolerance(files[0]))
    np.testing.assert_allclose(volume.image.affine, image.affine, atol=1e-4)
    assert [ref.sop_instance_uid for ref in volume.references] == [ds.SOPInstanceUID for ds in files]
    assert volume.frame_order == (1,) * len(files)


def test_positions_and_cosines_rounded_by_the_vendor_are_one_stack(nm_phantom, dicom_reencode):
    oblique, _ = nm_phantom("oblique")
    affine = oblique.affine.copy()
    affine[:3, 2] *= 2.0273 / np.linalg.norm(affine[:3, 2])  # a slice step that does not round evenly
    image = nib.Nifti1Image(np.asarray(oblique.dataobj), affine)
    files = [dicom_reencode(ds) for ds in nifti_to_nm_series(image, **IDENTITY)]
    for ds in files:  # positions written with two decimals, cosines with six
        detector = ds.DetectorInformationSequence[0]
        detector.ImagePositionPatient = [round(float(v), 2) for v in detector.ImagePositionPatient]
        detector.ImageOrientationPatient = [round(float(v), 6) for v in detector.ImageOrientationPatient]

    volume = read_nm_series(files)

    np.testing.assert_allclose(volume.image.affine, image.affine, atol=0.02)


def _tilt_one(files):
    files[3].DetectorInformationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _rescale_pixels_of_one(files):
    files[3].PixelSpacing = [5.0, 5.0]


def _resize_one(files):
    files[3].Rows = int(files[3].Rows) - 1


def _duplicate_position(files):
    files[3].DetectorInformationSequence[0].ImagePositionPatient = (
        files[4].DetectorInformationSequence[0].ImagePositionPatient
    )


def _drop_middle_slice(files):
    del files[10]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_tilt_one, "ImageOrientationPatient"),
        (_rescale_pixels_of_one, "PixelSpacing"),
        (_resize_one, "matrix"),
        (_duplicate_position, "same position"),
        (_drop_middle_slice, "uneven slice spacing"),
    ],
)
def test_inconsistent_slice_files_raise_clear_value_error(damage, message, nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    files = [dicom_reencode(ds) for ds in nifti_to_nm_series(image, **IDENTITY)]
    damage(files)
    with pytest.raises(InvalidSeriesError, match=message) as raised:
        read_nm_series(files)
    assert str(files[0].SeriesInstanceUID) in str(raised.value) or any(
        str(ds.SOPInstanceUID) in str(raised.value) for ds in files
    )


def test_series_of_too_few_slices_is_refused(nm_phantom, dicom_reencode):
    image, _ = nm_phantom("axial")
    files = [dicom_reencode(ds) for ds in nifti_to_nm_series(image, **IDENTITY)][:3]
    with pytest.raises(InvalidSeriesError, match=f"^series {files[0].SeriesInstanceUID}: declared volume 32x28x3"):
        read_nm_series(files)
