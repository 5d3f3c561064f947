"""evaluate and predict on a dataset with broken cases: the good ones are done, each bad one is named."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.cli import main as spect_train
from training.dataset import CaseLoadError, load_mask
from training.phantom import PhantomSettings, write_dataset

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "unet3d_weights.pth"
FAST = ["--weights", str(SHIPPED), "--orientation_search", "false", "--set", "model.precision=bf16", "-q"]


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good phantoms (``good``, ``nomask`` without its mask) and five bad cases."""
    root = tmp_path_factory.mktemp("broken")
    write_dataset(root, 2, seed=9, settings=PhantomSettings(p_matrix_128=0.0), progress=False)
    nifti = root / "NIfTI"
    (first, second) = sorted(p for p in nifti.glob("*.nii.gz") if not p.name.endswith("_mask.nii.gz"))
    image, other = nib.load(first), nib.load(second)
    volume, mask = np.asarray(image.dataobj), np.asarray(nib.load(str(first).replace(".nii", "_mask.nii")).dataobj)
    _save(np.asarray(other.dataobj), other.affine, nifti / "nomask.nii.gz")
    for path in nifti.glob("phantom_*"):
        path.unlink()
    _save(volume, image.affine, nifti / "good.nii.gz")
    _save(mask, image.affine, nifti / "good_mask.nii.gz")
    _save(volume, image.affine, nifti / "shape.nii.gz")
    _save(mask[:, :, :-2], image.affine, nifti / "shape_mask.nii.gz")
    flipped = image.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    _save(volume, image.affine, nifti / "flipped.nii.gz")
    _save(mask, flipped, nifti / "flipped_mask.nii.gz")
    holed = volume.astype(np.float32)
    holed[0, 0, 0] = np.nan
    _save(holed, image.affine, nifti / "nan.nii.gz")
    _save(mask, image.affine, nifti / "nan_mask.nii.gz")
    whole = (nifti / "good.nii.gz").read_bytes()
    (nifti / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    _save(mask, image.affine, nifti / "cut_mask.nii.gz")
    _save(np.stack([volume] * 3, axis=-1), image.affine, nifti / "dynamic.nii.gz")  # frames, not a volume
    _save(mask, image.affine, nifti / "dynamic_mask.nii.gz")
    return root


@pytest.mark.slow
def test_evaluate_keeps_the_good_cases_and_names_each_bad_one(
    broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = spect_train(["evaluate", "--data_root", str(broken), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert status == 1  # done, but not everything
    with (tmp_path / "metrics.csv").open() as handle:
        rows = {row["file_base"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"good", "shape", "flipped", "nan", "cut", "dynamic"}  # nomask has no truth to evaluate
    assert float(rows["good"]["dice_pp"]) > 0.8 and rows["good"]["error"] == ""
    assert "shape_mask.nii.gz: mask shape" in rows["shape"]["error"] and rows["shape"]["dice_pp"] == ""
    assert "flipped_mask.nii.gz: mask affine differs" in rows["flipped"]["error"]
    assert "nan.nii.gz: 1 voxel(s) are NaN" in rows["nan"]["error"]
    assert "cut.nii.gz: cannot read NIfTI" in rows["cut"]["error"]
    assert "dynamic.nii.gz: expected a 3D volume, found shape" in rows["dynamic"]["error"]
    assert "5 case(s) could not be used" in err and "shape_mask.nii.gz" in err


@pytest.mark.slow
def test_predict_takes_cases_without_a_mask_and_goes_past_bad_ones(
    broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert spect_train(["predict", "--data_root", str(broken), "--out", str(tmp_path), *FAST]) == 1
    written = sorted(p.name for p in (tmp_path / "masks_test").iterdir())
    assert written == ["good_pred_pp.nii.gz", "nomask_pred_pp.nii.gz"]
    err = capsys.readouterr().err
    assert "nan.nii.gz" in err and "cut.nii.gz: cannot read NIfTI" in err
    only = tmp_path / "only"
    assert spect_train(["predict", "--data_root", str(broken), "--out", str(only), "--only_masked", *FAST]) == 1
    assert sorted(p.name for p in (only / "masks_test").iterdir()) == ["good_pred_pp.nii.gz"]


def test_masks_of_any_label_value_and_partial_volume_fractions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1, 1, 1] = 255
    _save(labels, volume.affine, tmp_path / "m255.nii.gz")
    assert load_mask(tmp_path / "m255.nii.gz", volume).sum() == 1
    labels[2, 2, 2] = 2
    _save(labels, volume.affine, tmp_path / "two.nii.gz")
    with caplog.at_level(logging.WARNING):
        assert load_mask(tmp_path / "two.nii.gz", volume).sum() == 2
    assert "labels [2, 255]; every non-zero label counts" in caplog.text
    fractions = np.zeros((4, 4, 4), np.float32)
    fractions[1, 1, 1:3] = (0.7, 0.3)
    _save(fractions, volume.affine, tmp_path / "soft.nii.gz")
    assert load_mask(tmp_path / "soft.nii.gz", volume).sum() == 1  # cut at 0.5
    shifted = volume.affine.copy()
    shifted[0, 3] += 1.0
    _save(labels, shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(CaseLoadError, match=r"shifted\.nii\.gz: mask affine differs"):
        load_mask(tmp_path / "shifted.nii.gz", volume)


def test_a_wrong_split_file_and_an_unwritable_output_are_named(
    broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "split.json"
    split.write_text('{"train": ["x"], "val": ["y"], "test": ["z1", "z2"], "seed": 1}')
    args = ["predict", "--data_root", str(broken), "--split", "test", "--split_file", str(split), *FAST]
    assert spect_train(args) == 2
    assert "split.json: 2 of its 2 test case(s) (all) are not under" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert spect_train(["predict", "--data_root", str(broken), "--out", str(blocker / "out"), *FAST]) == 2
    assert "file/out" in capsys.readouterr().err
