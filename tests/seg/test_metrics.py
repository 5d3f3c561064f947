"""Tests of seg.metrics: analytic cases, a brute-force reference, symmetry, empty masks, spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from seg.metrics import (
    SegmentationMetrics,
    compute_metrics,
    dice,
    directed_surface_distances,
    hausdorff95,
    iou,
    mean_surface_distance,
    summarize,
    surface,
)

SPACING = (2.0, 1.0, 1.5)


def _cube(shape: tuple[int, int, int], lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


def _physical_sphere(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """A ball of ``radius_mm`` in physical space (an ellipsoid in voxel indices), centred."""
    index = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2
    squared = sum(((index[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return squared <= radius_mm**2


def _blobs(seed: int, shape: tuple[int, int, int] = (24, 22, 20)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return field > np.quantile(field, 0.7)


def test_offset_cubes_dice_and_iou_exact() -> None:
    a = _cube((30, 30, 30), 5, 15)
    b = np.roll(a, 3, axis=0)  # overlap 7 x 10 x 10
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    assert iou(a, b) == pytest.approx(700 / 1300)
    assert dice(a.astype(np.uint8), b.astype(np.uint8)) == dice(a, b)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_hd95_is_shift_in_mm(axis: int) -> None:
    # The faces perpendicular to the shift (a third of the surface) lie exactly k voxels
    # from the other cube's surface; no voxel is farther. So HD95 = k * spacing[axis].
    a = _cube((40, 40, 40), 10, 22)
    k = 2
    b = np.roll(a, k, axis=axis)
    assert hausdorff95(a, b, SPACING) == pytest.approx(k * SPACING[axis])
    a_to_b, b_to_a = directed_surface_distances(a, b, SPACING)
    assert a_to_b.max() == pytest.approx(k * SPACING[axis])
    assert b_to_a.max() == pytest.approx(k * SPACING[axis])


@pytest.mark.parametrize(("axis", "k"), [(0, 2), (1, 3), (2, 2)])
def test_shifted_sphere_distances_near_shift_in_mm(axis: int, k: int) -> None:
    # Translation maps one surface onto the other, so no distance exceeds d = k * spacing.
    # For a sphere shifted by d the surface distance is about d |cos(theta)|, uniform on
    # [0, d] over the surface (Archimedes): P95 ~ 0.95 d and the mean ~ d / 2.
    spacing = (1.0, 1.5, 2.0)
    sphere = _physical_sphere((48, 40, 32), spacing, radius_mm=18.0)
    shifted = np.roll(sphere, k, axis=axis)
    d = k * spacing[axis]
    metrics = compute_metrics(sphere, shifted, spacing)
    assert 0.9 * d <= metrics.hd95_mm <= d + 1e-9
    assert 0.35 * d <= metrics.msd_mm <= 0.65 * d


def test_spacing_is_used() -> None:
    a = _blobs(1)
    b = np.roll(a, 2, axis=1)
    iso = compute_metrics(a, b, (1.0, 1.0, 1.0))
    doubled = compute_metrics(a, b, (2.0, 2.0, 2.0))
    assert doubled.hd95_mm == pytest.approx(2 * iso.hd95_mm)
    assert doubled.msd_mm == pytest.approx(2 * iso.msd_mm)
    assert doubled.dice == iso.dice
    stretched_j = compute_metrics(a, b, (1.0, 3.0, 1.0))
    stretched_i = compute_metrics(a, b, (3.0, 1.0, 1.0))
    assert stretched_j.hd95_mm > stretched_i.hd95_mm


def test_distances_match_brute_force() -> None:
    a, b = _blobs(2), _blobs(5)
    a_to_b, b_to_a = directed_surface_distances(a, b, SPACING)
    pa = np.argwhere(surface(a)) * np.asarray(SPACING)
    pb = np.argwhere(surface(b)) * np.asarray(SPACING)
    pairwise = cdist(pa, pb)
    np.testing.assert_allclose(np.sort(a_to_b), np.sort(pairwise.min(axis=1)), atol=1e-9)
    np.testing.assert_allclose(np.sort(b_to_a), np.sort(pairwise.min(axis=0)), atol=1e-9)
    expected_hd95 = max(np.percentile(pairwise.min(axis=1), 95), np.percentile(pairwise.min(axis=0), 95))
    assert hausdorff95(a, b, SPACING) == pytest.approx(expected_hd95)
    expected_msd = np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)]).mean()
    assert mean_surface_distance(a, b, SPACING) == pytest.approx(expected_msd)


def test_surface_uses_six_neighbourhood_and_volume_edge() -> None:
    cube = _cube((9, 9, 9), 2, 7)
    shell = surface(cube)
    assert shell.sum() == 5**3 - 3**3
    full = np.ones((4, 4, 4), dtype=bool)
    assert surface(full).sum() == 4**3 - 2**3  # the volume edge is a boundary


def test_symmetry() -> None:
    a, b = _blobs(3), _blobs(4)
    ab, ba = compute_metrics(a, b, SPACING), compute_metrics(b, a, SPACING)
    assert ab.dice == pytest.approx(ba.dice)
    assert ab.iou == pytest.approx(ba.iou)
    assert ab.hd95_mm == pytest.approx(ba.hd95_mm)
    assert ab.msd_mm == pytest.approx(ba.msd_mm)


def test_identical_masks() -> None:
    a = _blobs(6)
    metrics = compute_metrics(a, a.astype(np.uint8), SPACING)
    assert metrics == SegmentationMetrics(dice=1.0, iou=1.0, hd95_mm=0.0, msd_mm=0.0)


def test_compute_metrics_agrees_with_single_functions() -> None:
    a, b = _blobs(7), _blobs(8)
    metrics = compute_metrics(a, b, SPACING)
    assert metrics.dice == dice(a, b)
    assert metrics.iou == iou(a, b)
    assert metrics.hd95_mm == hausdorff95(a, b, SPACING)
    assert metrics.msd_mm == mean_surface_distance(a, b, SPACING)


def test_crop_and_volume_edge_do_not_change_distances() -> None:
    a = _cube((20, 20, 20), 0, 12)  # touches the volume edge
    b = _cube((20, 20, 20), 3, 16)
    padded = compute_metrics(np.pad(a, 5), np.pad(b, 5), SPACING)
    assert compute_metrics(a, b, SPACING) == padded


def test_empty_cases() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    full = _cube((8, 8, 8), 2, 6)
    assert compute_metrics(empty, empty, SPACING) == SegmentationMetrics(1.0, 1.0, 0.0, 0.0)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert hausdorff95(empty, empty, SPACING) == 0.0 and mean_surface_distance(empty, empty, SPACING) == 0.0
    for pred, truth in ((empty, full), (full, empty)):
        metrics = compute_metrics(pred, truth, SPACING)
        assert metrics.dice == 0.0 and metrics.iou == 0.0
        assert metrics.hd95_mm == math.inf and metrics.msd_mm == math.inf
        assert hausdorff95(pred, truth, SPACING) == math.inf
        assert mean_surface_distance(pred, truth, SPACING) == math.inf


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        compute_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), SPACING)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*\(3, 4, 4\)"):
        dice(np.zeros((4, 4, 4), bool), np.zeros((3, 4, 4), bool))


def test_invalid_spacing_and_dtype() -> None:
    a = _cube((8, 8, 8), 2, 6)
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(a, a, (1.0, 1.0))
    with pytest.raises(TypeError, match="dtype"):
        dice(a.astype(np.float32), a)


def test_summarize_excludes_and_counts_nonfinite() -> None:
    stats = summarize([1.0, 2.0, 4.0, math.inf, math.nan])
    assert stats["n"] == 3 and stats["n_nonfinite"] == 2
    assert stats["mean"] == pytest.approx(7 / 3)
    assert stats["median"] == 2.0
    assert stats["std"] == pytest.approx(np.std([1.0, 2.0, 4.0]))
    nothing = summarize([math.inf])
    assert nothing["n"] == 0 and nothing["n_nonfinite"] == 1 and math.isnan(nothing["mean"])
    assert summarize([])["n"] == 0
