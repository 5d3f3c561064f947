"""Header checks: the 48 voxel orders, their composition, the voxel-size rule, and the shipped model
recovering phantoms whose header lies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seg.metrics import dice
from seg.pose import NOMINAL_HEART_MM, canonical_poses, compose, confidence, heart_size_mm, plausible_spacing
from seg.predictor import Predictor
from seg.preprocess import GridMap, Orientation, voxel_spacing
from training.phantom_basic import generate_basic_case

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "unet3d_weights.pth"


def test_the_48_poses_are_distinct_and_start_with_the_identity() -> None:
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    arrays = [Orientation(p).apply(x) for p in canonical_poses()]
    assert np.array_equal(arrays[0], x)
    assert len({(a.shape, a.tobytes()) for a in arrays}) == 48


@pytest.mark.parametrize("pose_index", [0, 5, 17, 47])
def test_compose_applies_header_then_pose_and_inverts(pose_index: int) -> None:
    header = Orientation.to_canonical(np.array([[0, 0, 3.0, 0], [-2.0, 0, 0, 0], [0, -4.0, 0, 0], [0, 0, 0, 1]]))
    pose = canonical_poses()[pose_index]
    x = np.random.default_rng(pose_index).random((2, 3, 4))
    both = compose(header, pose)
    assert np.array_equal(both.apply(x), Orientation(pose).apply(header.apply(x)))
    assert np.array_equal(both.invert(both.apply(x)), x)
    assert both.apply_spacing((2.0, 4.0, 3.0)) == Orientation(pose).apply_spacing(header.apply_spacing((2.0, 4.0, 3.0)))


def test_spacing_kept_when_plausible_and_rescaled_to_a_nominal_heart_otherwise() -> None:
    assert plausible_spacing((6.5, 6.5, 6.5), 85.0) == ((6.5, 6.5, 6.5), False)
    assert plausible_spacing((1.0, 1.0, 1.0), 0.0) == ((1.0, 1.0, 1.0), False)  # nothing found: no evidence
    spacing, rescaled = plausible_spacing((1.0, 1.0, 2.0), 14.0)
    factor = NOMINAL_HEART_MM / 14.0
    assert rescaled and spacing == pytest.approx((factor, factor, 2 * factor))


def test_heart_size_is_the_largest_bounding_box_side_in_mm() -> None:
    grid = GridMap.full_fov((64, 64, 56), (32, 32, 28))  # one model voxel = 2 input voxels
    mask = np.zeros((32, 32, 28), dtype=bool)
    mask[10:15, 10:12, 5:6] = True
    assert heart_size_mm(np.argwhere(mask), grid, (3.0, 3.0, 3.0)) == pytest.approx(5 * 2 * 3.0)
    assert heart_size_mm(np.argwhere(np.zeros_like(mask)), grid, (3.0, 3.0, 3.0)) == 0.0


def test_confidence_is_the_mean_probability_of_called_voxels() -> None:
    assert confidence(np.array([0.2, 0.6, 1.0])) == pytest.approx(0.8)
    assert confidence(np.array([0.1, 0.4])) == 0.0


@pytest.fixture(scope="module")
def phantom():
    """A held-out-style phantom on a 64x64 matrix with the generator's true header."""
    case = generate_basic_case(2, 1)
    return case.volume, case.mask.astype(bool), case.affine


@pytest.fixture(scope="module")
def trusting() -> Predictor:
    return Predictor.from_file(SHIPPED, device="cpu", precision="bf16")


@pytest.fixture(scope="module")
def searching() -> Predictor:
    return Predictor.from_file(SHIPPED, device="cpu", precision="bf16", orientation_search=True)


def _as_ras(volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, pose_index: int):
    """The case turned by one of the 48 poses, in a header that claims RAS order."""
    header = Orientation.to_canonical(affine)
    turned = compose(header, canonical_poses()[pose_index])
    spacing = turned.apply_spacing(voxel_spacing(affine))
    return np.ascontiguousarray(turned.apply(volume)), turned.apply(mask), np.diag([*spacing, 1.0])


def test_shipped_model_keeps_a_right_header(phantom, trusting: Predictor, searching: Predictor) -> None:
    volume, mask, affine = phantom
    searched = searching.predict_array(volume, affine)
    assert searched.geometry == ""
    assert np.array_equal(searched.mask, trusting.predict_array(volume, affine).mask)
    assert dice(searched.mask, mask) > 0.9


def test_shipped_model_recovers_a_reordered_and_mirrored_header(
    phantom, trusting: Predictor, searching: Predictor
) -> None:
    volume, mask, affine = _as_ras(*phantom, 12)  # y and z swapped, x reversed
    assert dice(trusting.predict_array(volume, affine).mask, mask) < 0.5  # a turned heart is read badly
    searched = searching.predict_array(volume, affine)
    assert searched.mask.shape == volume.shape
    assert dice(searched.mask, mask) > 0.85
    assert "voxel axes read as" in searched.geometry and "not RAS as the header says" in searched.geometry


def test_shipped_model_rescales_an_identity_affine(phantom, trusting: Predictor) -> None:
    volume, mask, affine = _as_ras(*phantom, 0)
    unchecked = Predictor.from_file(SHIPPED, device="cpu", precision="bf16", check_spacing=False)
    assert dice(unchecked.predict_array(volume, np.eye(4)).mask, mask) < 0.5
    checked = trusting.predict_array(volume, np.eye(4))
    assert dice(checked.mask, mask) > 0.85
    assert checked.geometry.startswith("header voxel size 1.00x1.00x1.00 mm makes the heart")
