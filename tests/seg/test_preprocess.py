"""Preprocessing: orientation, resampling (labels by nearest neighbour), normalisation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from seg.preprocess import (
    Orientation,
    PreprocessSettings,
    from_model_grid,
    labels_to_model_grid,
    normalize_intensity,
    resample_labels,
    resample_linear,
    to_model_grid,
)


def _shell(shape: tuple[int, int, int], centre, radius: float, wall: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return ((r <= radius) & (r > radius - wall)).astype(np.uint8)


LPS_AFFINE = np.array([[-6.4, 0, 0, 200.0], [0, -6.4, 0, 180.0], [0, 0, 6.4, -150.0], [0, 0, 0, 1]])


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


@pytest.mark.parametrize(
    "affine",
    [
        LPS_AFFINE,
        np.diag([3.5, 3.5, -3.5, 1.0]),  # negative slice direction
        np.array([[0, 0, 4.0, 0], [-4.0, 0, 0, 0], [0, -4.0, 0, 0], [0, 0, 0, 1]]),  # permuted axes
    ],
)
def test_orientation_matches_nibabel_and_inverts(affine: np.ndarray) -> None:
    data = np.random.default_rng(1).random((7, 8, 9))
    orientation = Orientation.to_canonical(affine)
    canonical = orientation.apply(data)
    expected = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert np.array_equal(canonical, expected.get_fdata())
    assert np.array_equal(orientation.invert(canonical), data)


def test_labels_are_resampled_by_nearest_neighbour_without_dilation() -> None:
    mask = _shell((64, 64, 56), (32, 30, 28), 14, 2)
    for shape in [(128, 128, 112), (32, 32, 28), (50, 71, 40)]:
        resampled = resample_labels(mask, shape)
        assert resampled.dtype == mask.dtype
        assert set(np.unique(resampled)) <= {0, 1}
        scale = np.prod(np.array(shape) / np.array(mask.shape))
        # nearest neighbour keeps the structure's volume; the seed's linear zoom + > 0 grows it
        assert resampled.sum() == pytest.approx(mask.sum() * scale, rel=0.08)
        seed_way = ndimage.zoom(mask.astype(float), np.array(shape) / np.array(mask.shape), order=1) > 0
        assert seed_way.sum() > resampled.sum() * 1.15


def test_linear_resampling_preserves_field_of_view() -> None:
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4)).copy()
    up = resample_linear(ramp, (20, 4, 4))
    # voxel centres aligned: the mean and the end values are preserved
    assert up.mean() == pytest.approx(ramp.mean(), abs=1e-5)
    assert up[0, 0, 0] == pytest.approx(0.0) and up[-1, 0, 0] == pytest.approx(9.0)
    assert np.all(np.diff(up[:, 0, 0]) >= 0)


def test_normalisation_methods() -> None:
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:8, 5:8, 5:8] = 100.0  # heart
    volume[15:20, 15:20, 15:20] = 1000.0  # hot liver: 125 voxels, 1.6% of the volume
    minmax = normalize_intensity(volume, "minmax")
    robust = normalize_intensity(volume, "percentile", 0.0, 95.0)
    assert minmax.max() == 1.0 and minmax[6, 6, 6] == pytest.approx(0.1)
    assert robust.min() >= 0 and robust.max() <= 1
    assert np.all(normalize_intensity(np.full((4, 4, 4), 7.0), "minmax") == 0)
    assert np.all(normalize_intensity(np.full((4, 4, 4), 7.0), "percentile") == 0)
    sparse = np.zeros((40, 40, 40), np.float32)
    sparse[10:13, 10:13, 10:13] = 50.0  # activity in 0.04% of the voxels: the 99.9th percentile is 0
    scaled = normalize_intensity(sparse, "percentile")
    assert scaled.max() == 1.0 and scaled[11, 11, 11] == 1.0 and scaled[0, 0, 0] == 0.0
    with pytest.raises(ValueError):
        normalize_intensity(volume, "zscore")  # type: ignore[arg-type]


@pytest.mark.parametrize("flip_k", [False, True])
def test_model_grid_round_trip_lands_on_the_same_voxels(flip_k: bool) -> None:
    """A perfect network (probability = the resampled truth) must give back the input's mask."""
    shape = (128, 128, 90)
    mask = _shell(shape, (60, 70, 45), 22, 4)
    affine = np.diag([-3.6, -3.6, 3.6, 1.0])
    if flip_k:
        affine[2, 2] = -3.6
    settings = PreprocessSettings(target_shape=(64, 64, 56))
    model_input, orientation = to_model_grid(mask.astype(np.float32), affine, settings)
    assert model_input.shape == (64, 64, 56)
    label = labels_to_model_grid(mask, affine, settings)
    soft = resample_linear(orientation.apply(mask.astype(np.float32)), (64, 64, 56))
    back = from_model_grid(soft, shape, orientation)
    assert back.shape == shape
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.95
    # the canonical model-grid label is the same whichever way the file stored k
    assert label.shape == (64, 64, 56)


def test_canonical_grid_is_independent_of_storage_order() -> None:
    mask = _shell((40, 44, 36), (18, 24, 15), 10, 3).astype(np.float32)
    settings = PreprocessSettings(target_shape=(32, 32, 28), normalization="none")
    a, _ = to_model_grid(mask, np.diag([-4.0, -4.0, 4.0, 1.0]), settings)
    flipped_affine = np.diag([-4.0, -4.0, -4.0, 1.0])
    b, _ = to_model_grid(mask[:, :, ::-1], flipped_affine, settings)
    assert np.allclose(a, b)
