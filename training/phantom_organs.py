"""Random anatomy of one phantom case, painted onto its grid (relative uptake, before the camera).

Uptake is relative to normal myocardium (1.0). Painting order: body background (with
breasts or lowered arms sometimes), lungs, the soft tissue around the heart, abdominal
organs below the diaphragm (liver, gut loops, stomach, spleen, kidneys, gallbladder),
a low-frequency tissue texture, then the heart (``training.phantom_heart``); finally
non-attenuation-corrected cases lose counts with depth. Arrays are ``(I, J, K)``
float32 in RAS voxel order on the grid of the :class:`~training.phantom_grid.Canvas`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from training.phantom_anatomy import (
    Diaphragm,
    Ellipsoid,
    LeftVentricle,
    Torso,
    Tube,
    random_rotation,
    rotation,
    soft_fraction,
    unit,
)
from training.phantom_grid import Canvas
from training.phantom_heart import draw_lv, draw_perfusion, loguniform, paint_heart

if TYPE_CHECKING:
    from training.phantom import PhantomSettings

HOT_KINDS = ("gut", "liver", "stomach")


@dataclass
class Scene:
    """One case's activity before the camera, in RAS voxel order on the canvas grid.

    ``activity`` and ``extracardiac`` (the abdominal organs only) are float32 relative
    uptake ``(I, J, K)``; ``mask`` is uint8 0/1; ``lv`` the ventricle in FOV-centred mm;
    ``params`` flat CSV-friendly values.
    """

    activity: np.ndarray
    extracardiac: np.ndarray
    mask: np.ndarray
    lv: LeftVentricle
    params: dict[str, object]


def _depth_at(torso: Torso, x: float, y: float) -> float:
    """Depth (mm) below the skin of the transaxial point ``(x, y)`` at the torso's reference level."""
    return float(torso.depth(np.array(x), np.array(y), np.array(torso.z_ref)))


def _height(dia: Diaphragm, x: float, y: float) -> float:
    return float(dia.height(np.array(x), np.array(y)))


def _place_lv(rng: np.random.Generator, lv: LeftVentricle, torso: Torso, fov: np.ndarray) -> LeftVentricle:
    """The LV moved into the left anterior chest, anywhere along z with room around it.

    A draw is accepted when the LV's bounding box keeps 30 mm from the field of view's edges
    and its front corners lie 15 mm inside the body. The box is loose (a tilted LV's box is
    ~150 mm deep), so in small chests all 50 draws can fail. Then the first draw whose real
    outer surface (sampled every 15 degrees at 12 axial levels, so to within a millimetre or
    two) lies 15 mm inside the body and 30 mm inside the field of view is taken (a
    uniform draw from the places that pass that test), or, if none does, the one with the
    most room. Only that choice is new: the draws, and so every case accepted by the box
    test, are those of earlier versions.
    """
    angle, frac = np.meshgrid(np.arange(-180.0, 180.0, 15.0), np.linspace(0.0, 1.0, 12))
    surface, _ = lv.surface_points(angle.ravel(), frac.ravel())
    surface = surface - lv.centre
    best: tuple[float, np.ndarray] | None = None
    for _ in range(50):
        centre = np.array(
            [
                torso.centre_x - rng.uniform(10, 60),
                torso.centre_y + rng.uniform(-15, 45),
                rng.uniform(-0.22, 0.22) * fov[2],
            ]
        )
        lo, hi = lv.bounds()
        lo, hi = lo + centre, hi + centre
        in_body = min(_depth_at(torso, lo[0], hi[1]), _depth_at(torso, hi[0], hi[1])) > 15
        if np.all(lo > -fov / 2 + 30) and np.all(hi < fov / 2 - 30) and in_body:
            return replace(lv, centre=centre)
        points = surface + centre
        room = min(
            float(torso.depth(points[:, 0], points[:, 1], points[:, 2]).min()) - 15,
            float((fov / 2 - np.abs(points)).min()) - 30,
        )
        if best is None or (room > best[0] and best[0] < 0):  # keep the first with room >= 0
            best = (room, centre)
    assert best is not None
    return replace(lv, centre=best[1])


def _gut_loop(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float, n_points: int, down: float
) -> Tube:
    points = [start]
    d = unit(direction)
    for _ in range(n_points - 1):
        points.append(points[-1] + d * rng.uniform(1.5, 3.0) * radius)
        d = unit(d + rng.normal(0.0, 0.7, 3) + np.array([0.0, 0.0, -down]))
    return Tube(np.array(points), radius)


def _place_against(organ: Ellipsoid, point: np.ndarray, outward: np.ndarray, gap: float) -> Ellipsoid:
    """``organ`` moved so that its surface lies ``gap`` mm from ``point`` along ``outward``."""
    return Ellipsoid(point + outward * (gap + organ.radius_along(-outward)), organ.axes, organ.radii)


def _paint_body(rng: np.random.Generator, canvas: Canvas, torso: Torso, lv: LeftVentricle, bg: float) -> np.ndarray:
    """Body background (float32 ``(I, J, K)``): the torso, sometimes breasts, sometimes arms down."""
    h = canvas.voxel_mm
    activity = bg * torso.fraction(*canvas.full(), h)
    parts = []
    if rng.random() < 0.3:
        for side in (1.0, -1.0):
            centre = [
                torso.centre_x + side * torso.half_width * rng.uniform(0.3, 0.6),
                torso.centre_y + torso.half_depth * rng.uniform(0.75, 0.95),
                lv.centre[2] + rng.uniform(-40, 30),
            ]
            parts.append(Ellipsoid(np.array(centre), random_rotation(rng, 15), rng.uniform([45, 30, 45], [75, 60, 70])))
    if rng.random() < 0.08:
        for side in (1.0, -1.0):
            r = rng.uniform(40, 55)
            centre = [torso.centre_x + side * (torso.half_width + rng.uniform(10, 40) + r), torso.centre_y, 0.0]
            parts.append(Ellipsoid(np.array(centre), random_rotation(rng, 8), np.array([r, r * 1.1, 600.0])))
    for part in parts:
        canvas.paint(
            [(activity, bg * rng.uniform(0.6, 1.2))],
            part.bounds(),
            lambda x, y, z, e=part: e.fraction(x, y, z, h) * (1.0 - torso.fraction(x, y, z, h)),
        )
    return activity


def _paint_chest(
    rng: np.random.Generator,
    canvas: Canvas,
    torso: Torso,
    dia: Diaphragm,
    lv: LeftVentricle,
    activity: np.ndarray,
    bg: float,
) -> float:
    """Lungs above the diaphragm, off the mediastinum and chest wall, then soft tissue around the heart.
    Returns the lung uptake."""
    h = canvas.voxel_mm
    lung_uptake = bg * (rng.uniform(0.15, 0.7) if rng.random() > 0.1 else rng.uniform(0.7, 1.2))
    mediastinum, chest_wall = rng.uniform(15, 35), rng.uniform(12, 35)
    for side in (1.0, -1.0):
        rz = rng.uniform(110, 170)
        lx = torso.centre_x + side * torso.half_width * rng.uniform(0.4, 0.55)
        centre = [lx, torso.centre_y - torso.half_depth * rng.uniform(0.0, 0.15), _height(dia, lx, torso.centre_y)]
        radii = [torso.half_width * rng.uniform(0.38, 0.5), torso.half_depth * rng.uniform(0.7, 0.9), rz]
        lung = Ellipsoid(np.array(centre) + [0, 0, rz * 0.75], random_rotation(rng, 8.0), np.array(radii))

        def fraction(x, y, z, lung=lung, side=side):
            return (
                lung.fraction(x, y, z, h)
                * soft_fraction(z - dia.height(x, y), h)
                * soft_fraction(side * (x - torso.centre_x) - mediastinum, h)
                * soft_fraction(torso.depth(x, y, z) - chest_wall, h)
            )

        canvas.paint([(activity, lung_uptake)], lung.bounds(), fraction)
    margin = rng.uniform(3, 12)
    bed = Ellipsoid(
        lv.centre + lv.axis * (lv.semi_axis - lv.length / 2 - 8) - lv.lateral * 12,
        np.stack([lv.axis, lv.anterior, lv.lateral]),
        np.array([lv.length / 2 + margin + 14, lv.r_ant + margin + 8, lv.r_lat + margin + 22]),
    )
    canvas.paint(
        [(activity, bg * rng.uniform(0.7, 1.1))],
        bed.bounds(),
        lambda x, y, z: bed.fraction(x, y, z, h) * soft_fraction(torso.depth(x, y, z), h),
    )
    return lung_uptake


def _paint_abdomen(
    rng: np.random.Generator,
    canvas: Canvas,
    torso: Torso,
    dia: Diaphragm,
    lv: LeftVentricle,
    hot_kind: str,
    s: PhantomSettings,
    activity: np.ndarray,
    extra: np.ndarray,
) -> dict[str, object]:
    """Liver, gallbladder, spleen, kidneys, stomach and gut loops below the diaphragm; in the hot-adjacent
    scenario one of them (``hot_kind``) abuts the inferior or inferolateral LV wall. Paints both layers."""
    h = canvas.voxel_mm
    cx, cy, a, b = torso.centre_x, torso.centre_y, torso.half_width, torso.half_depth

    def paint(organ: Ellipsoid | Tube, value: float, clip: bool = True) -> None:
        def fraction(x, y, z):
            f = organ.fraction(x, y, z, h) * soft_fraction(torso.depth(x, y, z) - 5.0, h)
            return f * dia.below(x, y, z, h) if clip else f

        canvas.paint([(activity, value), (extra, value)], organ.bounds(), fraction)

    def under(x: float, y: float, drop: float) -> np.ndarray:
        return np.array([x, y, _height(dia, x, y) - drop])

    scale = s.extracardiac_scale
    liver = scale * (rng.uniform(0.9, 1.6) if hot_kind == "liver" else loguniform(rng, 0.15, 1.4))
    radii = np.array([a * rng.uniform(0.45, 0.65), b * rng.uniform(0.6, 0.85), rng.uniform(60, 100)])
    # the right lobe's lower edge slopes up toward the patient's left
    axes = rotation(np.array([rng.uniform(-8, 8), rng.uniform(10, 35), rng.uniform(-10, 10)]))
    centre = under(cx + a * rng.uniform(0.25, 0.45), cy + b * rng.uniform(-0.2, 0.15), 0.0)
    right_lobe = Ellipsoid(centre - [0, 0, radii[2] * rng.uniform(0.6, 0.95)], axes, radii)
    paint(right_lobe, liver)
    left_lobe = None
    if rng.random() < 0.85 or hot_kind == "liver":
        radii = np.array([rng.uniform(35, 65), rng.uniform(25, 45), rng.uniform(18, 32)])
        centre = under(
            cx + a * rng.uniform(-0.2, 0.1), cy + b * rng.uniform(0.1, 0.5), radii[2] * rng.uniform(0.1, 0.6)
        )
        left_lobe = Ellipsoid(centre, random_rotation(rng, 20), radii)
    gallbladder = rng.random() < s.p_gallbladder
    if gallbladder:
        centre = under(cx + a * rng.uniform(0.1, 0.35), cy + b * rng.uniform(0.1, 0.4), rng.uniform(40, 90))
        paint(
            Ellipsoid(centre, random_rotation(rng, 30), rng.uniform([12, 12, 25], [20, 20, 45])),
            scale * rng.uniform(0.5, 2.5),
        )
    spleen = rng.random() < s.p_spleen
    if spleen:
        centre = under(cx - a * rng.uniform(0.5, 0.7), cy - b * rng.uniform(0.2, 0.5), rng.uniform(30, 70))
        paint(
            Ellipsoid(centre, random_rotation(rng, 25), rng.uniform([25, 35, 45], [40, 55, 70])),
            scale * rng.uniform(0.1, 0.5),
        )
    kidneys = rng.random() < s.p_kidneys
    if kidneys:
        uptake = scale * rng.uniform(0.1, 0.7)
        for side in (1.0, -1.0):
            centre = under(
                cx + side * a * rng.uniform(0.3, 0.45), cy - b * rng.uniform(0.35, 0.55), rng.uniform(80, 150)
            )
            paint(Ellipsoid(centre, random_rotation(rng, 20), rng.uniform([22, 22, 45], [32, 32, 60])), uptake)
    stomach = rng.random() < s.p_stomach or hot_kind == "stomach"
    stomach_organ = None
    if stomach:
        centre = under(cx - a * rng.uniform(0.25, 0.5), cy + b * rng.uniform(-0.2, 0.3), rng.uniform(20, 60))
        stomach_organ = Ellipsoid(centre, random_rotation(rng, 30), rng.uniform([30, 25, 40], [55, 45, 70]))
    stomach_uptake = scale * (rng.uniform(*s.hot_uptake) if hot_kind == "stomach" else loguniform(rng, 0.1, 0.9))
    n_gut = int(rng.integers(0, 7))
    gut_max = 0.0
    for _ in range(n_gut):
        start = under(cx + a * rng.uniform(-0.6, 0.6), cy + b * rng.uniform(-0.2, 0.6), rng.uniform(30, 170))
        uptake = scale * loguniform(rng, 0.1, 1.8)
        gut_max = max(gut_max, uptake)
        paint(_gut_loop(rng, start, rng.normal(0, 1, 3), rng.uniform(6, 14), int(rng.integers(3, 8)), 0.2), uptake)

    hot_uptake = 0.0
    if hot_kind != "none":
        angle = rng.uniform(110, 170) if hot_kind == "stomach" else rng.uniform(150, 210)
        point, outward = lv.surface_point(angle, rng.uniform(0.25, 0.8))
        touch = rng.uniform(0.0, 5.0)
        if hot_kind == "gut":
            hot_uptake = scale * rng.uniform(*s.hot_uptake)
            radius = rng.uniform(8, 16)
            along = unit(lv.axis * rng.choice([-1.0, 1.0]) + rng.normal(0, 0.3, 3))
            along = unit(along - outward * (along @ outward))
            start = point + outward * (radius + touch)
            paint(_gut_loop(rng, start, along, radius, int(rng.integers(3, 7)), 0.6), hot_uptake, clip=False)
            gut_max = max(gut_max, hot_uptake)
        elif hot_kind == "liver":
            left_lobe = _place_against(left_lobe, point, outward, touch)
            hot_uptake = liver
            # liver tissue joins the displaced left lobe to the right lobe
            bridge = Tube(np.stack([left_lobe.centre, right_lobe.centre]), 0.8 * float(left_lobe.radii.min()))
            paint(bridge, liver, clip=False)
        else:
            stomach_organ = _place_against(stomach_organ, point, outward, touch)
            hot_uptake = stomach_uptake
    if left_lobe is not None:
        paint(left_lobe, liver * rng.uniform(0.9, 1.1), clip=hot_kind != "liver")
    if stomach_organ is not None:
        paint(stomach_organ, stomach_uptake, clip=hot_kind != "stomach")
        content = Ellipsoid(stomach_organ.centre, stomach_organ.axes, stomach_organ.radii - rng.uniform(5, 12))
        paint(content, stomach_uptake * rng.uniform(0.0, 0.8), clip=hot_kind != "stomach")
    return {
        "liver_uptake": round(liver, 3),
        "liver_left_lobe": left_lobe is not None,
        "gallbladder": gallbladder,
        "spleen": spleen,
        "kidneys": kidneys,
        "stomach": stomach,
        "stomach_uptake": round(stomach_uptake, 3) if stomach else 0.0,
        "gut_loops": n_gut + (hot_kind == "gut"),
        "gut_uptake_max": round(gut_max, 3),
        "hot_adjacent_scenario": hot_kind,
        "hot_uptake": round(hot_uptake, 3),
    }


def _texture(rng: np.random.Generator, canvas: Canvas, amplitude: float) -> np.ndarray:
    """A smooth multiplicative field ``(I, J, K)`` float32 around 1: four random plane waves, 8-25 cm long."""
    x, y, z = canvas.full()
    texture = np.ones(canvas.shape, dtype=np.float32)
    for _ in range(4):
        k = unit(rng.normal(0, 1, 3)) * 2 * np.pi / rng.uniform(80, 250)
        wave = (np.float32(k[0]) * x + np.float32(k[1]) * y) + np.float32(k[2]) * z
        texture += np.float32(amplitude / 2) * np.cos(wave + np.float32(rng.uniform(0, 2 * np.pi)))
    return texture


def build_scene(rng: np.random.Generator, canvas: Canvas, s: PhantomSettings) -> Scene:
    """Draw and paint one case's anatomy on ``canvas`` (every random draw comes from ``rng``)."""
    torso = Torso(
        rng.uniform(-30, 30),
        rng.uniform(-35, 20),
        rng.uniform(150, 200),
        rng.uniform(100, 140),
        rng.uniform(2.0, 3.0),
        rng.uniform(0.8, 1.0),
        rng.uniform(-6e-4, 6e-4),
        0.0,
    )
    lv, params = draw_lv(rng, s.wall_mm)
    lv = _place_lv(rng, lv, torso, canvas.grid.fov_mm)
    patterns, perfusion = draw_perfusion(rng, s)
    hot_kind = str(rng.choice(HOT_KINDS, p=[0.45, 0.35, 0.2])) if rng.random() < s.p_hot_adjacent else "none"

    # the diaphragm passes ``gap`` mm below the lowest point of the LV, its right dome higher
    low = lv.lowest_point()
    gap = rng.uniform(0.0, 4.0) if hot_kind != "none" else rng.uniform(2.0, 20.0)
    dia = Diaphragm(
        0.0,
        torso.centre_x,
        torso.centre_y,
        torso.half_width,
        rng.uniform(10, 40),
        torso.centre_x + rng.uniform(0.3, 0.55) * torso.half_width,
        rng.uniform(0.3, 0.5) * torso.half_width,
        rng.uniform(0.05, 0.4),
        rng.uniform(10, 40),
    )
    dia = replace(dia, z0=low[2] - gap - _height(dia, low[0], low[1]))

    bg = loguniform(rng, 0.03, 0.15)
    activity = _paint_body(rng, canvas, torso, lv, bg)
    extra = np.zeros(canvas.shape, dtype=np.float32)
    lung_uptake = _paint_chest(rng, canvas, torso, dia, lv, activity, bg)
    organs = _paint_abdomen(rng, canvas, torso, dia, lv, hot_kind, s, activity, extra)
    amplitude = rng.uniform(0.0, 0.25)
    texture = _texture(rng, canvas, amplitude)
    activity *= texture
    extra *= texture
    mask, heart = paint_heart(rng, canvas, lv, patterns, activity, extra)

    mu = 0.0 if rng.random() < s.p_attenuation_corrected else rng.uniform(0.002, 0.007)
    if mu > 0:
        attenuation = np.exp(-np.float32(mu) * np.clip(torso.depth(*canvas.full()), 0.0, None)).astype(np.float32)
        activity *= attenuation
        extra *= attenuation
    params.update(perfusion)
    params.update(heart)
    params.update(
        {
            "heart_x_mm": round(float(lv.centre[0] - torso.centre_x), 1),
            "heart_y_mm": round(float(lv.centre[1] - torso.centre_y), 1),
            "body_width_mm": round(2 * torso.half_width, 1),
            "body_depth_mm": round(2 * torso.half_depth, 1),
            "background_uptake": round(bg, 4),
            "lung_uptake": round(lung_uptake, 4),
            "diaphragm_gap_mm": round(gap, 1),
            **organs,
            "texture_amplitude": round(amplitude, 3),
            "attenuation_mu_per_mm": round(mu, 4),
        }
    )
    return Scene(activity, extra, mask, lv, params)
