"""Tests of seg.postprocess: each step alone on constructed masks, then the chain."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

from seg.postprocess import (
    Postprocessor,
    PostprocessSettings,
    binary_closing_ball,
    fill_holes_selective,
    keep_largest_component,
    median_filter,
    remove_small_objects,
    smooth,
    sphericity,
)

SHAPE = (40, 40, 36)


def _cube(lo: int, hi: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


def _cup(open_base: bool, tilted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal shell (LV myocardium-like) and its cavity; the base is cut open or left closed."""
    i, j, k = np.indices((48, 48, 44), dtype=np.float64)
    radius = np.sqrt(((i - 24) / 11) ** 2 + ((j - 24) / 11) ** 2 + ((k - 22) / 17) ** 2)
    wall = (radius <= 1.0) & (radius >= 0.72)
    cavity = radius < 0.72
    if open_base:
        plane = k + 0.4 * (i - 24) if tilted else k
        wall &= plane <= 30
    return wall, cavity


# --- remove_small_objects ---------------------------------------------------------


def test_remove_small_objects_drops_small_blob_keeps_large() -> None:
    mask = _cube(5, 15)
    mask[30:32, 30:32, 30:32] = True  # 8 voxels
    out = remove_small_objects(mask, min_size=9)
    assert out.dtype == bool and out.shape == mask.shape
    np.testing.assert_array_equal(out, _cube(5, 15))
    np.testing.assert_array_equal(remove_small_objects(mask, min_size=8), mask)


def test_remove_small_objects_uses_26_connectivity() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[10, 10, 10] = True
    mask[11, 11, 11] = True  # touches the first only at a corner
    np.testing.assert_array_equal(remove_small_objects(mask, 2), mask)
    assert not remove_small_objects(mask, 3).any()


def test_remove_small_objects_zero_disables_and_accepts_uint8() -> None:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3, 3, 3] = 1
    np.testing.assert_array_equal(remove_small_objects(mask, 0), mask.astype(bool))


def test_steps_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="3D"):
        remove_small_objects(np.ones((4, 4), dtype=bool), 2)
    with pytest.raises(TypeError, match="dtype"):
        keep_largest_component(np.ones((4, 4, 4), dtype=np.float32))


# --- keep_largest_component -------------------------------------------------------


def test_keep_largest_component() -> None:
    big, small = _cube(2, 12), _cube(20, 25)
    out = keep_largest_component(big | small)
    np.testing.assert_array_equal(out, big)


def test_keep_largest_component_empty_in_empty_out() -> None:
    out = keep_largest_component(np.zeros(SHAPE, dtype=np.uint8))
    assert out.shape == SHAPE and not out.any()


# --- fill_holes_selective ---------------------------------------------------------


def test_small_enclosed_hole_is_filled() -> None:
    solid = _cube(5, 20)
    holed = solid.copy()
    holed[11:13, 11:13, 11:13] = False
    np.testing.assert_array_equal(fill_holes_selective(holed, max_hole_size=200), solid)


def test_large_elongated_hole_is_kept_large_compact_hole_is_filled() -> None:
    solid = np.zeros(SHAPE, dtype=bool)
    solid[2:38, 10:20, 10:20] = True
    tunnel = solid.copy()
    tunnel[5:35, 15, 15] = False  # 30 voxels, a rod: sphericity well below 0.6
    np.testing.assert_array_equal(fill_holes_selective(tunnel, max_hole_size=10), tunnel)
    np.testing.assert_array_equal(fill_holes_selective(tunnel, max_hole_size=31), solid)
    box = solid.copy()
    box[15:21, 12:18, 12:18] = False  # 216 voxels, compact
    np.testing.assert_array_equal(fill_holes_selective(box, max_hole_size=10), solid)
    np.testing.assert_array_equal(fill_holes_selective(box, max_hole_size=10, min_compactness=None), box)


@pytest.mark.parametrize("tilted", [False, True])
def test_open_cup_cavity_is_never_filled(tilted: bool) -> None:
    wall, _ = _cup(open_base=True, tilted=tilted)
    out = fill_holes_selective(wall, max_hole_size=10**6, min_compactness=0.0)
    np.testing.assert_array_equal(out, wall)


def test_open_cup_touching_volume_edge_is_not_filled() -> None:
    wall, _ = _cup(open_base=True)
    cropped = wall[:, :, :31].copy()  # the rim lies on the last slice of the volume
    np.testing.assert_array_equal(fill_holes_selective(cropped, max_hole_size=10**6), cropped)


def test_closed_cup_cavity_size_and_compactness_rules() -> None:
    wall, cavity = _cup(open_base=False)
    assert cavity.sum() > 200
    # Compact (sphericity >= 0.6): the seed's rule fills it.
    np.testing.assert_array_equal(fill_holes_selective(wall, max_hole_size=200), wall | cavity)
    # Size only: too large to fill.
    np.testing.assert_array_equal(fill_holes_selective(wall, max_hole_size=200, min_compactness=None), wall)


def test_diagonal_leak_is_not_a_hole() -> None:
    solid = _cube(5, 20)
    shell = solid & ~_cube(7, 18)  # two-voxel-thick walls, cavity 7..17
    leaky = shell.copy()
    leaky[5, 12, 12] = False  # outer wall layer, open to the outside
    leaky[6, 13, 13] = False  # inner wall layer, open to the cavity; the two touch at a corner only
    np.testing.assert_array_equal(fill_holes_selective(shell, max_hole_size=10**6), solid)
    np.testing.assert_array_equal(fill_holes_selective(leaky, max_hole_size=10**6), leaky)


def test_fill_holes_zero_disables() -> None:
    holed = _cube(5, 20)
    holed[12, 12, 12] = False
    np.testing.assert_array_equal(fill_holes_selective(holed, max_hole_size=0), holed)


def test_sphericity_orders_shapes() -> None:
    i, j, k = np.indices((30, 30, 30))
    ball = (i - 15) ** 2 + (j - 15) ** 2 + (k - 15) ** 2 <= 10**2
    rod = np.zeros((30, 30, 30), dtype=bool)
    rod[2:28, 14:16, 14:16] = True
    assert 0.85 < sphericity(ball) <= 1.0
    assert sphericity(rod) < 0.6
    assert sphericity(np.zeros((3, 3, 3), dtype=bool)) == 0.0


# --- binary_closing_ball ----------------------------------------------------------


def test_closing_bridges_one_voxel_gap() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[5:15, 5:15, 5:15] = True
    mask[16:26, 5:15, 5:15] = True  # gap at i = 15
    assert ndimage.label(mask)[1] == 2
    out = binary_closing_ball(mask, radius=1)
    assert out[15, 6:14, 6:14].all()
    assert ndimage.label(out)[1] == 1
    assert not (out & ~ndimage.binary_dilation(mask)).any()  # nothing added outside the gap's reach


def test_closing_does_not_erode_the_volume_edge() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:10, :, :] = True
    np.testing.assert_array_equal(binary_closing_ball(mask, radius=2), mask)
    np.testing.assert_array_equal(binary_closing_ball(mask, radius=0), mask)


# --- median_filter ----------------------------------------------------------------


def test_median_removes_isolated_voxels_keeps_cube() -> None:
    cube = _cube(10, 20)
    noisy = cube.copy()
    noisy[[2, 30, 33], [2, 5, 30], [2, 20, 3]] = True
    out = median_filter(noisy, 3)
    np.testing.assert_array_equal(out, cube & median_filter(cube, 3))
    assert out[11:19, 11:19, 11:19].all()
    assert not out[2, 2, 2] and not out[30, 5, 20]


def test_median_equals_scipy_median_on_random_mask() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((20, 18, 16)) < 0.4
    for size in (3, 5):
        expected = ndimage.median_filter(mask.astype(np.uint8), size=size, mode="nearest") > 0
        np.testing.assert_array_equal(median_filter(mask, size), expected)


def test_median_size_rules() -> None:
    mask = _cube(10, 20)
    np.testing.assert_array_equal(median_filter(mask, 1), mask)
    with pytest.raises(ValueError, match="odd"):
        median_filter(mask, 4)


# --- smooth -----------------------------------------------------------------------


def test_smooth_range_shape_and_sigma_zero() -> None:
    mask = _cube(10, 20)
    soft = smooth(mask, 1.0)
    assert soft.dtype == np.float32 and soft.shape == mask.shape
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    assert soft[15, 15, 15] > 0.99 and soft[0, 0, 0] < 0.01
    assert 0.0 < soft[10, 15, 15] < 1.0  # the edge is softened
    plain = smooth(mask.astype(np.uint8), 0.0)
    assert plain.dtype == np.float32
    np.testing.assert_array_equal(plain, mask.astype(np.float32))
    with pytest.raises(ValueError):
        smooth(mask, -1.0)


# --- the chain ----------------------------------------------------------------------


def _noisy_cup() -> tuple[np.ndarray, np.ndarray]:
    wall, _ = _cup(open_base=True)
    noisy = wall.copy()
    noisy[1:3, 1:3, 1:3] = True  # a small blob
    noisy[40:46, 2:8, 2:8] = True  # a larger separate blob (216 voxels)
    return wall, noisy


def test_chain_disabled_is_identity() -> None:
    _, noisy = _noisy_cup()
    out = Postprocessor(PostprocessSettings(enable=False))(noisy.astype(np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, noisy.astype(np.float32))


def test_default_chain_cleans_blobs_and_keeps_open_cup() -> None:
    wall, noisy = _noisy_cup()
    processor = Postprocessor(PostprocessSettings())
    soft = processor(noisy)
    assert soft.dtype == np.float32 and soft.shape == noisy.shape
    np.testing.assert_array_equal(soft, wall.astype(np.float32))
    binary = processor.binary(noisy)
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, wall.astype(np.uint8))


def test_seed_chain_runs_and_logs_each_step(caplog: pytest.LogCaptureFixture) -> None:
    wall, noisy = _noisy_cup()
    settings = PostprocessSettings.seed_chain()
    assert (settings.closing_structure_radius, settings.median_filter_size, settings.smoothing_sigma) == (1, 3, 0.3)
    with caplog.at_level(logging.DEBUG, logger="seg.postprocess"):
        soft = Postprocessor(settings)(noisy)
    assert soft.dtype == np.float32 and soft.shape == noisy.shape
    assert 0.0 <= soft.min() and soft.max() <= 1.0
    binary = soft >= settings.threshold
    assert not binary[40:46, 2:8, 2:8].any() and not binary[1:3, 1:3, 1:3].any()
    dice = 2 * np.count_nonzero(binary & wall) / (binary.sum() + wall.sum())
    assert dice > 0.8
    text = caplog.text
    for step in (
        "remove_small_objects",
        "keep_largest_component",
        "fill_holes_selective",
        "binary_closing_ball",
        "median_filter",
    ):
        assert step in text


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="median_filter_size"):
        PostprocessSettings(median_filter_size=2)
    with pytest.raises(ValueError, match="threshold"):
        PostprocessSettings(threshold=1.0)
    with pytest.raises(ValueError, match="min_comp_voxels"):
        PostprocessSettings(min_comp_voxels=-1)
