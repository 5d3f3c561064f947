"""The synthetic MPI-SPECT phantom generator: determinism, anatomy, camera grids, counts and the dataset layout."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from training.phantom import PhantomSettings, generate_case, write_dataset
from training.phantom_anatomy import TERRITORIES, LeftVentricle, UptakePattern, myocardial_uptake
from training.phantom_basic import BasicSettings, generate_basic_case
from training.phantom_grid import sample_grid
from training.phantom_render import render_case

SMALL = PhantomSettings(p_matrix_128=0.0)  # 64x64 grids: fast


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(image.dataobj), image.affine


def test_same_seed_and_index_give_identical_cases() -> None:
    a, b = generate_case(11, 3, SMALL), generate_case(11, 3, SMALL)
    assert a.base == b.base and a.patient_id == b.patient_id
    assert a.volume.tobytes() == b.volume.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert a.params == b.params


def test_different_seed_or_index_give_different_cases() -> None:
    ref = generate_case(11, 3, SMALL)
    for other in (generate_case(12, 3, SMALL), generate_case(11, 4, SMALL)):
        assert other.base != ref.base and other.patient_id != ref.patient_id
        assert {k: v for k, v in other.params.items() if k not in ("seed", "index")} != {
            k: v for k, v in ref.params.items() if k not in ("seed", "index")
        }
        if other.volume.shape == ref.volume.shape:
            assert not np.array_equal(other.volume, ref.volume)


def test_array_contracts() -> None:
    for index in range(3):
        case = generate_case(5, index, SMALL)
        assert case.volume.dtype == np.float32 and case.mask.dtype == np.uint8
        assert case.volume.shape == case.mask.shape
        assert case.volume.shape == (case.params["matrix"], case.params["matrix"], case.params["n_slices"])
        assert np.isfinite(case.volume).all() and case.volume.min() >= 0
        assert set(np.unique(case.mask)) == {0, 1}
        assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
        assert "".join(nib.aff2axcodes(case.affine)) == case.params["orientation"]


def test_camera_grids_stay_in_clinical_ranges() -> None:
    rng = np.random.default_rng(0)
    s = PhantomSettings()
    orders = set()
    for _ in range(400):
        grid = sample_grid(rng, s.p_matrix_128, s.p_slices_reversed, s.p_ras_order, s.axial_extent_mm, 0.15)
        n, n2, n_slices = grid.shape
        pixel, pixel2, slice_mm = grid.spacing
        assert n == n2 and n in (64, 128) and pixel == pixel2
        assert (6.0 <= pixel <= 7.0) if n == 64 else (3.2 <= pixel <= 4.8)
        assert 400.0 <= n * pixel <= 550.0
        assert 56 <= n_slices <= 128
        assert 0.8 * pixel <= slice_mm <= 1.2 * pixel
        assert 200.0 <= n_slices * slice_mm <= 600.0
        affine = grid.affine()
        assert np.allclose(np.abs(np.diag(affine)[:3]), grid.spacing)
        orders.add("".join(nib.aff2axcodes(affine)))
    assert orders == {"LPS", "LPI", "RAS"}


def test_voxel_order_changes_storage_only() -> None:
    lps = generate_case(2, 1, PhantomSettings(p_matrix_128=0.0, p_ras_order=0.0, p_slices_reversed=0.0))
    ras = generate_case(2, 1, PhantomSettings(p_matrix_128=0.0, p_ras_order=1.0))
    lpi = generate_case(2, 1, PhantomSettings(p_matrix_128=0.0, p_ras_order=0.0, p_slices_reversed=1.0))
    assert (lps.params["orientation"], ras.params["orientation"], lpi.params["orientation"]) == ("LPS", "RAS", "LPI")
    assert lps.affine[0, 0] < 0 and lps.affine[1, 1] < 0 and lps.affine[2, 2] > 0
    assert lpi.affine[2, 2] < 0
    ref_volume, ref_affine = _canonical(ras.volume, ras.affine)
    for case in (lps, lpi):
        volume, affine = _canonical(case.volume, case.affine)
        mask, _ = _canonical(case.mask, case.affine)
        assert np.allclose(affine, ref_affine)
        assert np.array_equal(volume, ref_volume)
        assert np.array_equal(mask, _canonical(ras.mask, ras.affine)[0])


def test_mask_lies_on_the_hot_wall_left_of_the_body_midline() -> None:
    checked = 0
    for index in range(6):
        case = generate_case(3, index, SMALL)
        volume, affine = _canonical(case.volume, case.affine)
        mask = _canonical(case.mask, case.affine)[0] > 0
        if not case.params["hot_extracardiac_adjacent"]:
            shell = ndimage.binary_dilation(mask, iterations=3) & ~mask
            assert volume[mask].mean() > 1.3 * volume[shell].mean()
            checked += 1
        body = volume > 0.05 * volume[mask].mean()
        x_world = affine[0, 0] * np.arange(volume.shape[0]) + affine[0, 3]
        heart_x = x_world[np.nonzero(mask)[0]].mean()
        body_x = x_world[np.nonzero(body)[0]].mean()
        assert heart_x < body_x  # patient's left is -x in RAS
    assert checked >= 3


def test_wall_thickness_and_myocardial_volume_are_plausible() -> None:
    for index in range(4):
        case = generate_case(4, index, SMALL)
        voxel_ml = float(np.prod(np.abs(np.diag(case.affine)[:3]))) / 1000.0
        volume_ml = case.mask.sum() * voxel_ml
        assert 60.0 <= volume_ml <= 250.0
        assert case.params["myocardium_ml"] == pytest.approx(volume_ml, abs=0.1)
        assert 8.0 <= case.params["wall_mm"] <= 12.0 and 70.0 <= case.params["lv_length_mm"] <= 100.0
        # the wall is 1-3 voxels thick at 6-7 mm: erosion by two voxels leaves (almost) nothing
        assert ndimage.binary_erosion(case.mask, iterations=2).sum() < 0.05 * case.mask.sum()
        assert 0.0005 < case.params["mask_fraction"] < 0.006


def test_long_axis_points_left_anterior_inferior_and_frame_is_orthonormal() -> None:
    for azimuth, elevation, roll in [(25, -45, -15), (45, -25, 0), (65, -7, 15)]:
        lv = LeftVentricle.oriented(
            np.zeros(3), azimuth, elevation, roll, semi_axis=60, r_ant=30, r_lat=30, wall=10, apex_wall=8, base_t=0.2
        )
        assert lv.axis[0] < 0 and lv.axis[1] > 0 and lv.axis[2] < 0
        frame = np.stack([lv.axis, lv.anterior, lv.lateral])
        assert np.allclose(frame @ frame.T, np.eye(3), atol=1e-9)
        assert lv.anterior[2] > 0  # the anterior wall faces up
        assert lv.lateral[0] < 0  # the lateral wall faces the patient's left


def test_defects_reduce_uptake_in_their_territory_only() -> None:
    lv = LeftVentricle.oriented(
        np.zeros(3), 45, -25, 0, semi_axis=60, r_ant=30, r_lat=30, wall=10, apex_wall=8, base_t=0.2
    )

    def uptake_at(angle: float, patterns: list[UptakePattern]) -> float:
        point, radial = lv.surface_point(angle, 0.5)
        inside = point - radial * 5.0  # mid-wall
        return float(myocardial_uptake(lv, *(np.array([v]) for v in inside), patterns, [])[0])

    for name, (centre, half) in TERRITORIES.items():
        defect = [UptakePattern(name, centre, half, 20.0, 0.7)]
        assert uptake_at(centre, defect) == pytest.approx(0.3, abs=0.02)
        assert uptake_at(centre + 180.0, defect) == pytest.approx(1.0, abs=1e-6)
        assert uptake_at(centre, []) == pytest.approx(1.0, abs=1e-6)


def test_count_scaling_and_poisson_noise() -> None:
    quiet = PhantomSettings(p_matrix_128=0.0, noise=False, p_postfilter=0.0, p_outside_counts=0.0)
    noisy = PhantomSettings(p_matrix_128=0.0, noise=True, p_postfilter=0.0, p_outside_counts=0.0)
    for index in range(3):
        case = generate_case(6, index, quiet)
        expected = case.volume.astype(np.float64) / case.params["unit_scale"]
        peak = float(expected[case.mask > 0].max())
        assert peak == pytest.approx(case.params["myo_peak_counts"], abs=0.06)
        assert 15.0 <= peak <= 400.0
        noisy_case = generate_case(6, index, noisy)
        assert noisy_case.params["unit_scale"] == case.params["unit_scale"]
        counts = noisy_case.volume.astype(np.float64) / noisy_case.params["unit_scale"]
        assert np.allclose(counts, np.round(counts), atol=1e-3)  # Poisson counts, up to the unit scale
        assert not np.array_equal(counts, expected)
        # the quiet volume is the expectation of the noisy one
        assert counts.sum() == pytest.approx(expected.sum(), rel=0.01)
        assert noisy_case.params["total_counts"] == pytest.approx(expected.sum(), rel=0.01)


def test_hot_adjacent_knob_puts_hot_organs_against_the_wall() -> None:
    hot = PhantomSettings(p_matrix_128=0.0, p_hot_adjacent=1.0)
    cold = PhantomSettings(p_matrix_128=0.0, p_hot_adjacent=0.0, extracardiac_scale=0.2)
    hot_rows = [generate_case(8, i, hot).params for i in range(4)]
    assert all(row["hot_adjacent_scenario"] in ("gut", "liver", "stomach") for row in hot_rows)
    assert sum(bool(row["hot_extracardiac_adjacent"]) for row in hot_rows) >= 3
    cold_rows = [generate_case(8, i, cold).params for i in range(2)]
    assert not any(row["hot_extracardiac_adjacent"] for row in cold_rows)
    assert all(row["hot_adjacent_scenario"] == "none" for row in cold_rows)


def test_write_dataset_layout_csv_and_nifti_round_trip(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path / "ds", 2, seed=21, settings=SMALL, start_index=5, progress=False)
    nifti = tmp_path / "ds" / "NIfTI"
    bases = [row["file_base"] for row in rows]
    assert bases == ["phantom_s21_0005", "phantom_s21_0006"]
    assert sorted(p.name for p in nifti.iterdir()) == sorted(f"{b}{s}.nii.gz" for b in bases for s in ("", "_mask"))
    with (tmp_path / "ds" / "demographics.csv").open(newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    promised = {
        "file_base",
        "patient_id",
        "defects",
        "defect_severity",
        "hot_extracardiac_adjacent",
        "liver_uptake",
        "gut_uptake_max",
        "total_counts",
        "myo_peak_counts",
        "matrix",
        "n_slices",
        "spacing_mm",
        "fwhm_mm",
        "orientation",
        "unit_scale",
    }
    assert promised <= set(table[0])
    assert [r["file_base"] for r in table] == bases
    assert len({r["patient_id"] for r in table}) == 2
    for row, written in zip(rows, table, strict=True):
        assert {k: str(v) for k, v in row.items()} == written
        case = generate_case(21, int(written["index"]), SMALL)
        volume = nib.load(nifti / f"{written['file_base']}.nii.gz")
        mask = nib.load(nifti / f"{written['file_base']}_mask.nii.gz")
        assert np.allclose(volume.affine, case.affine) and np.allclose(mask.affine, case.affine)
        assert "".join(nib.aff2axcodes(volume.affine)) == written["orientation"]
        assert np.array_equal(np.asarray(volume.dataobj), case.volume)
        assert mask.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(mask.dataobj), case.mask)


def test_render_looks_the_same_whatever_the_voxel_order(tmp_path: Path) -> None:
    lps = generate_case(2, 1, PhantomSettings(p_matrix_128=0.0, p_ras_order=0.0, p_slices_reversed=0.0))
    ras = generate_case(2, 1, PhantomSettings(p_matrix_128=0.0, p_ras_order=1.0))
    a = render_case(lps.volume, lps.mask, lps.affine, tmp_path / "lps.png", title="case")
    b = render_case(ras.volume, ras.mask, ras.affine, tmp_path / "ras.png", title="case")
    image_a, image_b = matplotlib.image.imread(a), matplotlib.image.imread(b)
    assert image_a.shape[0] > 100 and image_a.std() > 0.05
    assert np.array_equal(image_a, image_b)


@pytest.mark.parametrize("family", ["anatomical", "basic"])
def test_wall_range_changes_the_wall_and_nothing_else(family: str) -> None:
    """``wall_mm`` is one draw: fixing it leaves every other parameter of the case (and the grid) alone."""
    if family == "basic":
        default, thick = generate_basic_case(4, 1), generate_basic_case(4, 1, BasicSettings(wall_mm=(14.0, 14.0)))
    else:
        default, thick = generate_case(4, 1, SMALL), generate_case(4, 1, replace(SMALL, wall_mm=(14.0, 14.0)))
    assert thick.params["wall_mm"] == 14.0 and default.params["wall_mm"] < 12.0
    assert np.array_equal(default.affine, thick.affine) and default.volume.shape == thick.volume.shape
    changed = {k for k in default.params if default.params[k] != thick.params[k]}
    assert "wall_mm" in changed and changed <= {
        "wall_mm",
        "apex_wall_mm",
        "myocardium_ml",
        "mask_voxels",
        "mask_fraction",
        "total_counts",
        "adjacent_uptake_ratio",
        "unit_scale",
        "adjacent_image_ratio",
        "lv_radius_mm",
    }
    assert thick.mask.sum() > default.mask.sum()  # a thicker wall, more myocardium
    overlap = np.count_nonzero(thick.mask & default.mask) / default.mask.sum()
    assert overlap > 0.9  # around the same ventricle


def test_fixed_pixel_size_renders_the_same_case_on_a_finer_grid() -> None:
    """``pixel_mm`` changes the matrix, not the case: same field of view, anatomy and myocardial volume."""
    coarse = generate_case(4, 1, SMALL)
    fine = generate_case(4, 1, replace(SMALL, pixel_mm=3.0))
    zoom = coarse.params["spacing_mm"] / 3.0
    assert fine.params["spacing_mm"] == 3.0 and fine.volume.shape[0] == round(coarse.volume.shape[0] * zoom)
    fov_fine, fov_coarse = (np.asarray(c.volume.shape) * np.abs(np.diag(c.affine)[:3]) for c in (fine, coarse))
    assert np.allclose(fov_fine, fov_coarse, atol=3.0)
    for key in ("wall_mm", "lv_radius_mm", "lv_length_mm", "heart_x_mm", "fwhm_mm", "defects"):
        assert fine.params[key] == coarse.params[key]
    assert fine.params["myocardium_ml"] == pytest.approx(coarse.params["myocardium_ml"], rel=0.1)


def test_heart_placed_inside_the_body_even_when_every_box_test_fails() -> None:
    """A small chest: the loose bounding-box test rejects all 50 draws; the LV's real surface still lies inside."""
    from training.phantom_anatomy import Torso
    from training.phantom_heart import draw_lv
    from training.phantom_organs import _depth_at, _place_lv

    rng = np.random.default_rng(0)
    torso = Torso(0.0, 0.0, 160.0, 92.0, 2.5, 0.9, 0.0, 0.0)
    fov = np.array([420.0, 420.0, 400.0])
    angle, frac = np.meshgrid(np.arange(-180.0, 180.0, 5.0), np.linspace(0.0, 1.0, 30))
    fell_back = 0
    for _ in range(5):
        lv = _place_lv(rng, draw_lv(rng)[0], torso, fov)
        lo, hi = lv.bounds()
        fell_back += min(_depth_at(torso, lo[0], hi[1]), _depth_at(torso, hi[0], hi[1])) <= 15
        points, _ = lv.surface_points(angle.ravel(), frac.ravel())
        assert torso.depth(points[:, 0], points[:, 1], points[:, 2]).min() >= 15.0
        assert np.all(np.abs(points) <= fov / 2 - 30)
    assert fell_back == 5  # the fallback is what was tested
