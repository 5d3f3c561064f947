"""The second, independent phantom family ("basic") that trained the shipped model."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.phantom import write_dataset
from training.phantom_basic import generate_basic_case


def test_deterministic_and_plausible() -> None:
    a, b = generate_basic_case(1, 3), generate_basic_case(1, 3)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.mask, b.mask) and a.params == b.params
    assert not np.array_equal(generate_basic_case(2, 3).mask, a.mask)
    spacing = np.abs(np.diag(a.affine)[:3])
    assert a.volume.shape[0] in (64, 128) and 56 <= a.volume.shape[2] <= 128
    assert 400 <= a.volume.shape[0] * spacing[0] <= 550
    assert 40 <= a.params["myocardium_ml"] <= 250
    assert a.volume[a.mask > 0].mean() > 2 * a.volume[a.mask == 0].mean()


def test_written_as_a_family(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, 2, seed=9, family="basic", progress=False)
    assert [r["family"] for r in rows] == ["basic", "basic"]
    image = nib.load(tmp_path / "NIfTI" / f"{rows[0]['file_base']}.nii.gz")
    assert np.allclose(image.affine, generate_basic_case(9, 0).affine)
    with pytest.raises(ValueError, match="family"):
        write_dataset(tmp_path, 1, seed=9, family="other", progress=False)
