"""The heart of a phantom: random LV shape and perfusion, and painting atria, RV, blood pool and myocardium.

Uptake is relative to normal myocardium (1.0). Arrays are ``(I, J, K)`` float32 in RAS
voxel order on the grid of a :class:`~training.phantom_grid.Canvas`; coordinates are
FOV-centred mm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from training.phantom_anatomy import (
    TERRITORIES,
    Ellipsoid,
    LeftVentricle,
    UptakePattern,
    myocardial_uptake,
    random_rotation,
)
from training.phantom_grid import Canvas

if TYPE_CHECKING:
    from training.phantom import PhantomSettings


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A draw whose logarithm is uniform on ``[log lo, log hi]``."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def myocardium_ml(lv: LeftVentricle, step_mm: float = 2.0) -> float:
    """Volume (mL) of the LV myocardium, counted on a ``step_mm`` lattice."""
    lo, hi = lv.bounds(step_mm)
    x, y, z = (np.arange(a, b, step_mm, dtype=np.float32) for a, b in zip(lo, hi, strict=True))
    inside = lv.myocardium(x[:, None, None], y[None, :, None], z[None, None, :])
    return float(inside.sum()) * step_mm**3 / 1000.0


def _draw_lv_shape(rng: np.random.Generator, wall_mm: tuple[float, float]) -> tuple[LeftVentricle, dict[str, object]]:
    length = rng.uniform(70.0, 100.0)
    base_t = rng.uniform(0.05, 0.35)
    wall = rng.uniform(*wall_mm)
    wall_mod = rng.uniform(0.0, 0.15)
    radius = float(np.clip(length * rng.uniform(0.35, 0.45), 25.0, 42.0))
    min_r = wall * (1 + wall_mod) + 11.0
    azimuth, elevation, roll = 45.0 + rng.uniform(-20, 20), -25.0 + rng.uniform(-20, 18), rng.uniform(-15, 15)
    lv = LeftVentricle.oriented(
        np.zeros(3),
        azimuth,
        elevation,
        roll,
        semi_axis=length / (1 + base_t),
        base_t=base_t,
        r_ant=max(radius * rng.uniform(0.9, 1.1), min_r),
        r_lat=max(radius * rng.uniform(0.9, 1.1), min_r),
        wall=wall,
        apex_wall=wall * rng.uniform(0.55, 1.0),
        exponent=rng.uniform(1.7, 2.6),
        bend=(rng.uniform(-6, 6), rng.uniform(-6, 6)),
        lobe=rng.uniform(0.0, 0.06),
        lobe_phase=rng.uniform(-np.pi, np.pi),
        wall_mod=wall_mod,
        wall_phase=rng.uniform(-np.pi, np.pi),
        valve_tilt=(rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25)),
    )
    params = {
        "lv_length_mm": round(length, 1),
        "lv_radius_mm": round(radius, 1),
        "wall_mm": round(wall, 2),
        "apex_wall_mm": round(lv.apex_wall, 2),
        "lv_azimuth_deg": round(azimuth, 1),
        "lv_elevation_deg": round(elevation, 1),
    }
    return lv, params


def draw_lv(
    rng: np.random.Generator,
    wall_mm: tuple[float, float] = (8.0, 12.0),
    volume_ml: tuple[float, float] = (60.0, 250.0),
) -> tuple[LeftVentricle, dict[str, object]]:
    """An LV centred at the origin: long axis 70-100 mm, wall ``wall_mm`` (8-12 mm), tilted left, anterior and inferior
    by 45 +- 20 and 25 (-20..+18) degrees, with mild irregularity; redrawn (a few times at most) until its
    myocardial volume lies in ``volume_ml``."""
    for _ in range(20):
        lv, params = _draw_lv_shape(rng, wall_mm)
        if volume_ml[0] <= myocardium_ml(lv) <= volume_ml[1]:
            break
    return lv, params


def draw_perfusion(rng: np.random.Generator, s: PhantomSettings) -> tuple[list[UptakePattern], dict[str, object]]:
    """Perfusion defects in coronary territories (none, one or two), apical thinning and attenuation patterns."""
    patterns: list[UptakePattern] = []
    severity = {name: 0.0 for name in TERRITORIES}
    if rng.random() < s.p_defect:
        count = 2 if rng.random() < s.p_second_defect else 1
        for name in (str(n) for n in rng.choice(list(TERRITORIES), size=count, replace=False)):
            centre, half = TERRITORIES[name]
            sev = rng.uniform(*s.defect_severity)
            lo = rng.uniform(0.0, 0.5)
            hi = 1.0 if name == "LAD" or rng.random() < 0.5 else rng.uniform(0.6, 0.95)
            cap = rng.uniform(0.7, 0.9) if name == "LAD" and rng.random() < 0.7 else 2.0
            patterns.append(
                UptakePattern(
                    name,
                    centre + rng.uniform(-15, 15),
                    half * rng.uniform(0.5, 1.1),
                    rng.uniform(15, 35),
                    sev,
                    (lo, hi),
                    rng.uniform(0.1, 0.25),
                    cap,
                )
            )
            severity[name] = round(float(sev), 3)
    apical = rng.random() < s.p_apical_thinning
    if apical:
        patterns.append(UptakePattern("apical", 0.0, 200.0, 10.0, rng.uniform(0.1, 0.3), (rng.uniform(0.75, 0.9), 1)))
    artefact = "none"
    if rng.random() < s.p_attenuation_pattern:
        artefact = "inferior" if rng.random() < 0.6 else "anterior"
        centre = 180.0 if artefact == "inferior" else 0.0
        patterns.append(
            UptakePattern(
                artefact,
                centre + rng.uniform(-20, 20),
                rng.uniform(35, 60),
                rng.uniform(20, 40),
                rng.uniform(0.1, 0.3),
                (0.0, rng.uniform(0.6, 1.0)),
            )
        )
    defects = [n for n in TERRITORIES if severity[n] > 0]
    params: dict[str, object] = {
        "defects": "+".join(defects) or "none",
        "n_defects": len(defects),
        "defect_severity": max(severity.values()),
    }
    params.update({f"defect_{n.lower()}": severity[n] for n in TERRITORIES})
    params.update({"apical_thinning": apical, "attenuation_pattern": artefact})
    return patterns, params


def paint_heart(
    rng: np.random.Generator,
    canvas: Canvas,
    lv: LeftVentricle,
    patterns: list[UptakePattern],
    activity: np.ndarray,
    extracardiac: np.ndarray,
) -> tuple[np.ndarray, dict[str, object]]:
    """Paint the atria and RV (blood pool, faint thin wall), the LV blood pool and the myocardium.

    ``activity`` and ``extracardiac`` ``(I, J, K)`` float32 are painted in place (the heart
    clears ``extracardiac``). Thin structures are supersampled so that 6-7 mm voxels do not
    alias them. Returns the myocardium mask ``(I, J, K)`` uint8 (sub-voxel fraction >= 0.5)
    and the heart's parameters.
    """
    h = canvas.voxel_mm
    blood = loguniform(rng, 0.04, 0.2)
    for offset in (0.0, -rng.uniform(25, 45)):
        atrium = Ellipsoid(
            lv.centre
            + lv.axis * (lv.s_base - rng.uniform(15, 30))
            + lv.lateral * offset
            - lv.anterior * rng.uniform(0, 12),
            random_rotation(rng, 30),
            rng.uniform(17, 28, 3),
        )
        canvas.paint(
            [(activity, blood), (extracardiac, 0.0)], atrium.bounds(), lambda x, y, z, e=atrium: e.fraction(x, y, z, h)
        )

    factor = int(np.clip(np.ceil(max(canvas.grid.spacing) / 1.6), 2, 5))
    # a 4-7 mm wall at 0.25-0.6 of the LV uptake shows at ~10-30% of the LV after blurring
    rv_uptake = rng.uniform(0.25, 0.6) if rng.random() > 0.1 else rng.uniform(0.6, 0.9)
    rv_wall = rng.uniform(4.0, 7.0)
    septal = -lv.lateral
    rv = Ellipsoid(
        lv.centre
        + septal * lv.r_lat * rng.uniform(0.45, 0.75)
        - lv.axis * lv.semi_axis * rng.uniform(0.0, 0.2)
        + lv.anterior * rng.uniform(-5, 10),
        np.stack([lv.axis, lv.anterior, septal]) @ random_rotation(rng, 10).T,
        np.array(
            [
                lv.semi_axis * rng.uniform(0.8, 1.0),
                max(lv.r_ant, lv.r_lat) * rng.uniform(1.1, 1.4),
                lv.r_lat * rng.uniform(0.8, 1.1),
            ]
        ),
    )
    rv_cavity = Ellipsoid(rv.centre, rv.axes, rv.radii - rv_wall)
    rv_base = lv.s_base - rng.uniform(0, 15)

    def rv_part(wall: bool):
        def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            keep = ~lv.enclosed(x, y, z) & (lv.local(x, y, z)[0] >= rv_base)
            in_cavity = rv_cavity.radius(x, y, z) <= 1.0
            return keep & (rv.radius(x, y, z) <= 1.0) & ~in_cavity if wall else keep & in_cavity

        return inside

    for wall, value in ((True, rv_uptake), (False, blood)):
        frac = canvas.supersample(rv_part(wall), rv.bounds(h), factor)
        if frac is not None:
            canvas.paint([(activity, value), (extracardiac, 0.0)], rv.bounds(h), frac)

    box = lv.bounds(h)
    cup = canvas.supersample(lv.cup, box, factor)
    myo = canvas.supersample(lv.myocardium, box, factor)
    if cup is None or myo is None:
        raise ValueError("the left ventricle lies outside the grid")
    ripple = [(rng.uniform(0, 0.05), int(rng.integers(1, 4)), rng.uniform(0, 2 * np.pi)) for _ in range(2)]
    canvas.paint([(activity, blood), (extracardiac, 0.0)], box, cup)
    canvas.paint(
        [(activity, lambda x, y, z: myocardial_uptake(lv, x, y, z, patterns, ripple)), (extracardiac, 0.0)], box, myo
    )
    mask = canvas.place((myo >= 0.5).astype(np.uint8), box, np.uint8)
    params = {
        "lv_axis_x": round(float(lv.axis[0]), 3),
        "lv_axis_y": round(float(lv.axis[1]), 3),
        "lv_axis_z": round(float(lv.axis[2]), 3),
        "blood_uptake": round(blood, 3),
        "rv_uptake": round(rv_uptake, 3),
        "rv_wall_mm": round(rv_wall, 2),
        "supersampling": factor,
    }
    return mask, params
