"""On the one form dicom2nifti supports (CT/PET-like single-frame series), our reader agrees with it."""

from __future__ import annotations

from pathlib import Path

import dicom2nifti
import nibabel as nib
import numpy as np
import pydicom
from studies import spect_like_volume

from node.convert import series_to_nifti
from node.nm_writer import dataset_to_bytes, nifti_to_pet_like_series


def test_pet_like_series_matches_dicom2nifti(tmp_path: Path) -> None:
    files = nifti_to_pet_like_series(spect_like_volume("oblique"), modality="PT", patient_name="A^B", patient_id="D2N")
    folder = tmp_path / "series"
    folder.mkdir()
    for index, ds in enumerate(files):
        (folder / f"{index:03d}.dcm").write_bytes(dataset_to_bytes(ds))
    dicom2nifti.dicom_series_to_nifti(str(folder), str(tmp_path / "reference.nii.gz"), reorient_nifti=True)
    reference = nib.as_closest_canonical(nib.load(tmp_path / "reference.nii.gz"))
    ours = series_to_nifti([pydicom.dcmread(p) for p in sorted(folder.iterdir())]).image
    ours = nib.as_closest_canonical(ours)
    assert reference.shape == ours.shape
    assert np.allclose(reference.affine, ours.affine, atol=1e-3)
    assert np.allclose(reference.get_fdata(), ours.get_fdata(), atol=1e-3 * float(ours.get_fdata().max()))
