"""The "basic" phantom family: a simpler, independent MPI-SPECT generator, deterministic by seed.

It and the default ("anatomical") family of :mod:`training.phantom` are drawn
independently of each other; the shipped model was trained on both. (For one seed, case
``i`` of both families has the same matrix and nearly the same pixel size: their first
draws share a generator seeded ``[seed, i]``.)

Each case is built analytically in patient coordinates (RAS+, mm) and sampled on a
camera-like grid: 64x64 at 6.25-7 mm or 128x128 at 3.2-4.3 mm in-plane (40-55 cm field
of view), 56-128 slices, stored in LPS voxel order (as the node's NM reader produces),
sometimes with the slices reversed, sometimes in RAS order. The activity is the LV
myocardium (with perfusion defects), a faint right ventricle, blood pool, liver, gut
loops (sometimes hotter than the heart and against the inferior wall), stomach, lungs and
body background, blurred by a 12-16 mm FWHM Gaussian and Poisson-sampled at
clinical count levels. The mask is the myocardium before blurring, on the same grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.phantom import PhantomCase
from training.phantom_basic_anatomy import TERRITORIES, Ellipsoid, LeftVentricle, angular_weight, random_axes, unit

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class BasicSettings:
    """Probabilities and ranges of the phantom population (defaults: a wide realistic mix)."""

    p_matrix_128: float = 0.5
    wall_mm: tuple[float, float] = (8.0, 12.0)
    p_defect: float = 0.6
    p_second_defect: float = 0.3
    p_hot_adjacent: float = 0.3
    p_low_counts: float = 0.2
    p_stomach: float = 0.4
    p_slices_reversed: float = 0.2
    p_ras_order: float = 0.2
    fwhm_mm: tuple[float, float] = (12.0, 16.0)
    max_counts: tuple[float, float] = (60.0, 400.0)
    low_counts: tuple[float, float] = (20.0, 60.0)


def _grid(rng: np.random.Generator, settings: BasicSettings) -> tuple[tuple[int, int, int], np.ndarray, str]:
    """Matrix, RAS+ affine and orientation codes of a camera-like reconstruction grid."""
    if rng.random() < settings.p_matrix_128:
        n, spacing = 128, rng.uniform(3.2, 4.3)
    else:
        n, spacing = 64, rng.uniform(6.25, 7.0)
    n_slices = int(np.clip(round(rng.uniform(300.0, 480.0) / spacing), 56, 128))
    shape = (n, n, n_slices)
    roll = rng.random()
    if roll < settings.p_ras_order:
        signs, order = np.array([1.0, 1.0, 1.0]), "RAS"
    elif roll < settings.p_ras_order + settings.p_slices_reversed:
        signs, order = np.array([-1.0, -1.0, -1.0]), "LPI"
    else:
        signs, order = np.array([-1.0, -1.0, 1.0]), "LPS"
    extent = np.array(shape, dtype=float) * spacing
    centre_offset = rng.uniform(-20.0, 20.0, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * spacing)
    # world position of voxel 0 so that the grid centre sits near the body centre
    affine[:3, 3] = centre_offset - signs * (extent / 2 - spacing / 2)
    return shape, affine, order


def _world_points(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of every voxel centre, ``(N, 3)`` float32 in C order."""
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    idx = np.stack([g.ravel() for g in grids], axis=1)
    return idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _supersampled_fraction(
    shape: tuple[int, int, int], affine: np.ndarray, inside, bbox: tuple[np.ndarray, np.ndarray], factor: int = 3
) -> np.ndarray:
    """Fraction of each voxel (within the bounding box) for which ``inside(points)`` holds."""
    frac = np.zeros(shape, dtype=np.float32)
    inv = np.linalg.inv(affine)
    lo_w, hi_w = bbox
    cube = np.array([[a, b, c] for a in (lo_w[0], hi_w[0]) for b in (lo_w[1], hi_w[1]) for c in (lo_w[2], hi_w[2])])
    vox = cube @ inv[:3, :3].T + inv[:3, 3]
    lo = np.clip(np.floor(vox.min(axis=0)).astype(int) - 1, 0, np.array(shape) - 1)
    hi = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 2, 1, np.array(shape))
    sub_shape = tuple(int(h - lo_i) for h, lo_i in zip(hi, lo, strict=True))
    offsets = (np.arange(factor) + 0.5) / factor - 0.5
    total = np.zeros(sub_shape, dtype=np.float32)
    base = np.stack(np.meshgrid(*(np.arange(lo[a], hi[a], dtype=np.float32) for a in range(3)), indexing="ij"), -1)
    base = base.reshape(-1, 3)
    for dx in offsets:
        for dy in offsets:
            for dz in offsets:
                pts = (base + np.array([dx, dy, dz], dtype=np.float32)) @ affine[:3, :3].T + affine[:3, 3]
                total += inside(pts).reshape(sub_shape)
    frac[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = total / factor**3
    return frac


def generate_basic_case(seed: int, index: int, settings: BasicSettings = BasicSettings()) -> PhantomCase:
    """Generate case ``index`` of the population ``seed`` (bit-identical for the same pair)."""
    rng = np.random.default_rng([seed, index])
    shape, affine, order = _grid(rng, settings)
    points = _world_points(shape, affine)

    # body and lungs
    body_a, body_b = rng.uniform(140.0, 190.0), rng.uniform(95.0, 135.0)
    body_c = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15)])
    body = ((points[:, 0] - body_c[0]) / body_a) ** 2 + ((points[:, 1] - body_c[1]) / body_b) ** 2 <= 1.0
    # heart: in the left-anterior chest
    heart_centre = np.array(
        [body_c[0] - rng.uniform(5.0, 45.0), body_c[1] + rng.uniform(0.0, 45.0), rng.uniform(-60.0, 60.0)]
    )
    wall = rng.uniform(*settings.wall_mm)
    r_ant = rng.uniform(26.0, 36.0)
    lv = LeftVentricle.orient(
        heart_centre,
        azimuth_deg=rng.uniform(20.0, 70.0),
        elevation_deg=rng.uniform(-45.0, -10.0),
        length=rng.uniform(60.0, 90.0),
        r_ant=r_ant,
        r_lat=r_ant * rng.uniform(0.85, 1.15),
        wall=wall,
        apex_wall=wall * rng.uniform(0.6, 1.0),
        base_offset=-rng.uniform(0.0, 12.0),
    )
    activity = np.zeros(len(points), dtype=np.float32)
    background = rng.uniform(0.04, 0.14)
    activity[body] = background
    for side in (-1.0, 1.0):
        lung = Ellipsoid(
            np.array([body_c[0] + side * rng.uniform(55, 90), body_c[1] - rng.uniform(0, 25), heart_centre[2] + 50]),
            random_axes(rng, 10.0),
            np.array([rng.uniform(45, 65), rng.uniform(55, 80), rng.uniform(90, 130)]),
        )
        activity[lung.inside(points) & body] = background * rng.uniform(0.2, 0.5)

    # right ventricle (faint crescent on the septal side) and blood pools
    septal = -lv.lateral
    rv = Ellipsoid(
        lv.centre + septal * (lv.r_lat * rng.uniform(0.7, 1.0)) + lv.axis * lv.length * 0.15,
        np.stack([lv.axis, lv.anterior, septal]),
        np.array([lv.length * rng.uniform(0.75, 0.95), lv.r_ant * rng.uniform(1.0, 1.3), lv.r_lat * 0.8]),
    )
    rv_inner = Ellipsoid(rv.centre, rv.axes, rv.radii - rng.uniform(3.0, 5.0))
    outer_lv = lv.myocardium(points) | lv.cavity(points)
    rv_wall = rv.inside(points) & ~rv_inner.inside(points) & ~outer_lv
    rv_uptake = rng.uniform(0.1, 0.3)
    activity[rv_wall] = rv_uptake
    blood = rng.uniform(0.05, 0.15)
    activity[(rv_inner.inside(points) & ~outer_lv) | lv.cavity(points)] = blood

    # abdominal organs: liver on the right below the diaphragm, gut, sometimes stomach/spleen
    hot_adjacent = rng.random() < settings.p_hot_adjacent
    liver_uptake = rng.uniform(0.2, 0.8) if not hot_adjacent else rng.uniform(0.6, 1.6)
    liver_radii = np.array([rng.uniform(75, 110), rng.uniform(65, 95), rng.uniform(55, 85)])
    liver_top = heart_centre[2] - rng.uniform(10.0, 45.0) if not hot_adjacent else heart_centre[2] - rng.uniform(5, 25)
    liver = Ellipsoid(
        np.array([body_c[0] + rng.uniform(40, 90), body_c[1] + rng.uniform(-20, 20), liver_top - liver_radii[2]]),
        random_axes(rng, 15.0),
        liver_radii,
    )
    liver_mask = liver.inside(points) & body & ~outer_lv
    activity[liver_mask] = liver_uptake
    gut_uptake_max = 0.0
    n_gut = int(rng.integers(1, 5))
    for g in range(n_gut):
        hot = hot_adjacent and g == 0
        if hot:
            direction = unit(-lv.anterior + rng.normal(0, 0.2, 3))
            radii = rng.uniform(10.0, 22.0, 3)
            centre = lv.inferior_point() + direction * (radii.min() + rng.uniform(0.0, 6.0))
            uptake = rng.uniform(1.0, 2.0)
        else:
            radii = rng.uniform(8.0, 25.0, 3)
            centre = heart_centre + np.array([rng.uniform(-60, 60), rng.uniform(-30, 40), -rng.uniform(60, 130)])
            uptake = rng.uniform(0.2, 1.2)
        gut = Ellipsoid(centre, random_axes(rng, 90.0), radii)
        activity[gut.inside(points) & ~outer_lv] = uptake
        gut_uptake_max = max(gut_uptake_max, uptake)
    stomach = rng.random() < settings.p_stomach
    if stomach:
        organ = Ellipsoid(
            np.array(
                [
                    body_c[0] - rng.uniform(50, 100),
                    body_c[1] + rng.uniform(-30, 20),
                    heart_centre[2] - rng.uniform(50, 100),
                ]
            ),
            random_axes(rng, 30.0),
            rng.uniform(25.0, 55.0, 3),
        )
        activity[organ.inside(points) & body & ~outer_lv] = rng.uniform(0.15, 0.8)

    # myocardium: partial-volume fraction on a supersampled grid, perfusion and defects
    reach = lv.length + max(lv.r_ant, lv.r_lat) + 5.0
    bbox = (lv.centre - reach, lv.centre + reach)
    fraction = _supersampled_fraction(shape, affine, lv.myocardium, bbox)
    mask = (fraction >= 0.5).astype(np.uint8)
    angle, frac = lv.polar(points)
    uptake = 1.0 + 0.08 * np.sin(np.deg2rad(angle) * rng.integers(1, 4) + rng.uniform(0, 6.28)) * frac
    defects: list[str] = []
    severities: list[float] = []
    if rng.random() < settings.p_defect:
        names = list(TERRITORIES)
        chosen = [names[int(rng.integers(0, 3))]]
        if rng.random() < settings.p_second_defect:
            chosen.append(names[(names.index(chosen[0]) + int(rng.integers(1, 3))) % 3])
        for name in chosen:
            centre_angle, half_width = TERRITORIES[name]
            severity = rng.uniform(0.3, 0.9)
            extent_from_apex = rng.uniform(0.3, 1.0)
            weight = angular_weight(angle, centre_angle + rng.uniform(-15, 15), half_width * rng.uniform(0.5, 1.0))
            weight *= np.clip((frac - (1.0 - extent_from_apex)) / 0.15, 0.0, 1.0)
            uptake *= 1.0 - severity * weight
            defects.append(name)
            severities.append(round(float(severity), 3))
    flat_fraction = fraction.ravel()
    activity = activity * (1.0 - flat_fraction) + uptake.astype(np.float32) * flat_fraction

    # camera: blur, counts, Poisson noise, arbitrary reconstruction units
    activity = activity.reshape(shape)
    fwhm = rng.uniform(*settings.fwhm_mm)
    spacing = np.abs(np.diag(affine)[:3])
    blurred = ndimage.gaussian_filter(activity, sigma=fwhm * FWHM_TO_SIGMA / spacing, mode="constant")
    low = rng.random() < settings.p_low_counts
    max_counts = float(np.exp(rng.uniform(*np.log(settings.low_counts if low else settings.max_counts))))
    myo_peak = float(blurred[mask > 0].max()) if mask.any() else float(blurred.max())
    counts = rng.poisson(np.clip(blurred, 0, None) * (max_counts / max(myo_peak, 1e-6)))
    unit_scale = float(10.0 ** rng.uniform(-1.0, 2.0))
    volume = (counts * unit_scale).astype(np.float32)

    base = f"phantom_s{seed}_{index:04d}"
    params: dict[str, object] = {
        "family": "basic",
        "seed": seed,
        "index": index,
        "matrix": shape[0],
        "n_slices": shape[2],
        "spacing_mm": round(float(spacing[0]), 3),
        "orientation": order,
        "fwhm_mm": round(fwhm, 2),
        "max_counts": round(max_counts, 1),
        "low_counts": low,
        "unit_scale": round(unit_scale, 4),
        "wall_mm": round(wall, 2),
        "lv_length_mm": round(float(lv.length - lv.base_offset), 1),
        "defects": "+".join(defects) or "none",
        "defect_severity": max(severities) if severities else 0.0,
        "severe_defect": bool(severities and max(severities) >= 0.7),
        "hot_extracardiac_adjacent": hot_adjacent,
        "liver_uptake": round(liver_uptake, 3),
        "gut_uptake_max": round(gut_uptake_max, 3),
        "stomach": stomach,
        "rv_uptake": round(rv_uptake, 3),
        "myocardium_ml": round(float(mask.sum() * np.prod(spacing) / 1000.0), 1),
    }
    return PhantomCase(base, f"PH{seed:04d}{index:05d}", volume, mask, affine, params)
