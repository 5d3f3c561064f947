"""Analytic anatomy of the MPI-SPECT phantoms, in patient coordinates (RAS+, mm).

Every shape is evaluated on broadcastable coordinate arrays ``x, y, z`` (mm): for an
axis-aligned grid these are shaped ``(I, 1, 1)``, ``(1, J, 1)`` and ``(1, 1, K)``, and
the result has the broadcast shape ``(I, J, K)``. Nothing here draws random numbers
except :func:`random_rotation`; the random layout lives in ``training.phantom_organs``.

The left ventricle is a thick, slightly irregular ellipsoidal cup, open at the valve
plane, whose long axis points to the patient's left (-x), anterior (+y) and inferior
(-z). Its polar frame follows the short-axis convention of MPI: angle 0 is the
anterior wall, 90 the lateral wall, +-180 the inferior wall and -90 the septum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` (3,) scaled to length 1."""
    return np.asarray(v, dtype=float) / float(np.linalg.norm(v))


def smoothstep(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, a cubic ramp between (same shape as ``v``)."""
    t = np.clip((v - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def soft_fraction(depth: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Occupancy in [0, 1] of voxels of size ``voxel_mm`` whose centre lies ``depth`` mm inside a surface.

    ``depth`` is positive inside, negative outside; the result is float32 of the same shape.
    """
    return np.clip(depth / voxel_mm + 0.5, 0.0, 1.0).astype(np.float32)


def rotation(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` (rows: the rotated x, y, z axes) from angles about x, y, z (degrees)."""
    cx, cy, cz = np.cos(np.deg2rad(angles_deg))
    sx, sy, sz = np.sin(np.deg2rad(angles_deg))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (rz @ ry @ rx).T


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation ``(3, 3)`` within ``max_deg`` of the identity about each axis."""
    return rotation(rng.uniform(-max_deg, max_deg, 3))


def _project(x: np.ndarray, y: np.ndarray, z: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return (x - origin[0]) * direction[0] + (y - origin[1]) * direction[1] + (z - origin[2]) * direction[2]


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid: ``centre`` (3,), ``axes`` (3, 3) whose rows are its unit axes, semi-axes ``radii`` (3,) mm."""

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised radius: 1 on the surface, < 1 inside (broadcast shape)."""
        total = 0.0
        for row, r in zip(self.axes, self.radii, strict=True):
            total = total + (_project(x, y, z, self.centre, row) / r) ** 2
        return np.sqrt(total)

    def depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate distance (mm) inside the surface along the ray from the centre; negative outside."""
        r = self.radius(x, y, z)
        dist = np.sqrt((x - self.centre[0]) ** 2 + (y - self.centre[1]) ** 2 + (z - self.centre[2]) ** 2)
        return np.where(r > 1e-3, dist * (1.0 / np.maximum(r, 1e-3) - 1.0), float(self.radii.min()))

    def fraction(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, voxel_mm: float) -> np.ndarray:
        """Partial-volume occupancy in [0, 1], float32."""
        return soft_fraction(self.depth(x, y, z), voxel_mm)

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World bounding box ``(lo, hi)`` of the ellipsoid, grown by ``margin`` mm."""
        half = np.sqrt(((self.axes * self.radii[:, None]) ** 2).sum(axis=0)) + margin
        return self.centre - half, self.centre + half

    def radius_along(self, direction: np.ndarray) -> float:
        """Distance (mm) from the centre to the surface along ``direction``."""
        local = self.axes @ unit(direction)
        return float(1.0 / np.sqrt(((local / self.radii) ** 2).sum()))


@dataclass(frozen=True)
class Tube:
    """A bowel-like tube: the set of points within ``radius`` mm of the polyline ``points`` (n, 3)."""

    points: np.ndarray
    radius: float

    def distance(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Distance (mm) to the polyline (broadcast shape)."""
        best = None
        for a, b in zip(self.points[:-1], self.points[1:], strict=True):
            ab = b - a
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
            d2 = (px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2
            best = d2 if best is None else np.minimum(best, d2)
        return np.sqrt(best)

    def fraction(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, voxel_mm: float) -> np.ndarray:
        """Partial-volume occupancy in [0, 1], float32."""
        return soft_fraction(self.radius - self.distance(x, y, z), voxel_mm)

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World bounding box ``(lo, hi)``."""
        return self.points.min(axis=0) - self.radius - margin, self.points.max(axis=0) + self.radius + margin


@dataclass(frozen=True)
class Torso:
    """The body outline: a super-ellipse in each transaxial plane (mm), flatter at the back, tapering along z.

    ``half_width`` (x) and ``half_depth`` (y) apply at ``z_ref``; they scale by
    ``1 + taper * (z - z_ref)``. Behind ``centre_y`` the depth is ``back * half_depth``.
    """

    centre_x: float
    centre_y: float
    half_width: float
    half_depth: float
    exponent: float
    back: float
    taper: float
    z_ref: float

    def _scales(self, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grow = 1.0 + self.taper * (z - self.z_ref)
        depth = np.where(y < self.centre_y, self.half_depth * self.back, self.half_depth)
        return self.half_width * grow, depth * grow

    def radius(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Super-elliptic normalised radius (< 1 inside), broadcast shape."""
        a, b = self._scales(y, z)
        p = self.exponent
        return (np.abs((x - self.centre_x) / a) ** p + np.abs((y - self.centre_y) / b) ** p) ** (1.0 / p)

    def depth(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate depth (mm) below the skin; negative outside the body."""
        a, b = self._scales(y, z)
        return (1.0 - self.radius(x, y, z)) * np.minimum(a, b)

    def fraction(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, voxel_mm: float) -> np.ndarray:
        """Partial-volume occupancy in [0, 1], float32."""
        return soft_fraction(self.depth(x, y, z), voxel_mm)


@dataclass(frozen=True)
class Diaphragm:
    """The diaphragm as a height field ``z = height(x, y)`` (mm): a right dome over the liver, sloping down
    posteriorly and toward the flanks."""

    z0: float
    centre_x: float
    centre_y: float
    half_width: float
    dome_height: float
    dome_x: float
    dome_width: float
    slope_y: float
    droop: float

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """z (mm) of the diaphragm above ``(x, y)``."""
        dome = self.dome_height * np.exp(-(((x - self.dome_x) / self.dome_width) ** 2))
        flank = self.droop * ((x - self.centre_x) / self.half_width) ** 2
        return self.z0 + dome + self.slope_y * (y - self.centre_y) - flank

    def below(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, voxel_mm: float, gap: float = 0.0) -> np.ndarray:
        """Occupancy of the region at least ``gap`` mm below the diaphragm (float32, broadcast shape)."""
        return soft_fraction(self.height(x, y) - gap - z, voxel_mm)


@dataclass(frozen=True)
class LeftVentricle:
    """The LV myocardium: a truncated thick shell and its local frame.

    The outer surface is ``|s/A|^q + ((a/r_ant)^2 + (l/r_lat)^2) / m(theta)^2 = 1`` in the
    local coordinates ``s`` (along ``axis``, base -> apex, from ``centre``), ``a`` (along
    ``anterior``) and ``l`` (along ``lateral``), after bending the axis by ``bend`` (mm at
    the apex, quadratic in s). ``m(theta) = 1 + lobe * cos(theta - lobe_phase)`` makes the
    cross-section slightly egg-shaped. The cavity has the same form with the semi-axis
    ``A - apex_wall`` and radii reduced by ``wall * (1 + wall_mod * cos(theta - wall_phase))``.
    The valve plane keeps ``s >= -base_t * A + valve_tilt . (a, l)``.
    """

    centre: np.ndarray
    axis: np.ndarray
    anterior: np.ndarray
    lateral: np.ndarray
    semi_axis: float
    r_ant: float
    r_lat: float
    wall: float
    apex_wall: float
    base_t: float
    exponent: float = 2.0
    bend: tuple[float, float] = (0.0, 0.0)
    lobe: float = 0.0
    lobe_phase: float = 0.0
    wall_mod: float = 0.0
    wall_phase: float = 0.0
    valve_tilt: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def oriented(
        cls, centre: np.ndarray, azimuth_deg: float, elevation_deg: float, roll_deg: float, **shape: object
    ) -> LeftVentricle:
        """An LV whose long axis leaves the base toward the patient's left, turned ``azimuth_deg`` toward
        anterior and ``elevation_deg`` up (negative: inferior); ``roll_deg`` turns the frame about it."""
        az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
        axis = unit(np.array([-np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)]))
        up = np.array([0.0, 0.0, 1.0])
        anterior = unit(up - axis * (up @ axis))  # the anterior wall faces up and forward
        lateral = np.cross(anterior, axis)
        if lateral @ np.array([-1.0, -1.0, 0.0]) < 0:  # lateral wall: patient's left and posterior
            lateral = -lateral
        roll = np.deg2rad(roll_deg)
        anterior, lateral = (
            np.cos(roll) * anterior + np.sin(roll) * lateral,
            -np.sin(roll) * anterior + np.cos(roll) * lateral,
        )
        return cls(centre=np.asarray(centre, float), axis=axis, anterior=anterior, lateral=lateral, **shape)

    @property
    def s_base(self) -> float:
        """Position of the valve plane on the axis (mm from ``centre``)."""
        return -self.base_t * self.semi_axis

    @property
    def length(self) -> float:
        """Base-to-apex length of the outer surface (mm)."""
        return self.semi_axis - self.s_base

    def local(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> Coords:
        """``(s, a, l)`` in mm, the axis bend removed."""
        s = _project(x, y, z, self.centre, self.axis)
        t2 = (s / self.semi_axis) ** 2
        a = _project(x, y, z, self.centre, self.anterior) - self.bend[0] * t2
        lat = _project(x, y, z, self.centre, self.lateral) - self.bend[1] * t2
        return s, a, lat

    def _values(self, s: np.ndarray, a: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = np.arctan2(lat, a)
        m2 = (1.0 + self.lobe * np.cos(theta - self.lobe_phase)) ** 2
        q = self.exponent
        outer = np.abs(s / self.semi_axis) ** q + ((a / self.r_ant) ** 2 + (lat / self.r_lat) ** 2) / m2
        w = self.wall * (1.0 + self.wall_mod * np.cos(theta - self.wall_phase))
        inner_axis = self.semi_axis - self.apex_wall
        inner = np.abs(s / inner_axis) ** q + ((a / (self.r_ant - w)) ** 2 + (lat / (self.r_lat - w)) ** 2) / m2
        return outer, inner

    def _above_base(self, s: np.ndarray, a: np.ndarray, lat: np.ndarray) -> np.ndarray:
        return s >= self.s_base + self.valve_tilt[0] * a + self.valve_tilt[1] * lat

    def myocardium(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """bool: inside the outer surface, outside the cavity, on the apex side of the valve plane."""
        s, a, lat = self.local(x, y, z)
        outer, inner = self._values(s, a, lat)
        return (outer <= 1.0) & (inner > 1.0) & self._above_base(s, a, lat)

    def cup(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """bool: myocardium and cavity together (inside the outer surface, apex side of the valve plane)."""
        s, a, lat = self.local(x, y, z)
        outer, _ = self._values(s, a, lat)
        return (outer <= 1.0) & self._above_base(s, a, lat)

    def enclosed(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """bool: inside the outer surface, whatever the side of the valve plane."""
        s, a, lat = self.local(x, y, z)
        return self._values(s, a, lat)[0] <= 1.0

    def polar(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Angle about the axis (deg: 0 anterior, 90 lateral, +-180 inferior, -90 septal) and the axial
        fraction (0 at the valve plane, 1 at the apex), both float32 of the broadcast shape."""
        s, a, lat = self.local(x, y, z)
        angle = np.degrees(np.arctan2(lat, a)).astype(np.float32)
        frac = np.clip((s - self.s_base) / self.length, 0.0, 1.0).astype(np.float32)
        return angle, frac

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """World bounding box ``(lo, hi)`` of the cup, grown by ``margin`` mm."""
        grow = 1.0 + abs(self.lobe)
        ra = self.r_ant * grow + abs(self.bend[0])
        rl = self.r_lat * grow + abs(self.bend[1])
        tilt = abs(self.valve_tilt[0]) * ra + abs(self.valve_tilt[1]) * rl
        corners = np.array(
            [[s, a, lat] for s in (self.s_base - tilt, self.semi_axis) for a in (-ra, ra) for lat in (-rl, rl)]
        )
        world = self.centre + corners @ np.stack([self.axis, self.anterior, self.lateral])
        return world.min(axis=0) - margin, world.max(axis=0) + margin

    def surface_points(self, angle_deg: np.ndarray, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points ``(n, 3)`` on the outer surface at polar angles ``angle_deg`` and axial fractions ``frac``
        (``(n,)`` each), found by bisection along the radial directions, and those directions ``(n, 3)``."""
        s = (self.s_base + np.asarray(frac, float) * self.length)[:, None]
        theta = np.deg2rad(np.asarray(angle_deg, float))[:, None]
        radial = np.cos(theta) * self.anterior + np.sin(theta) * self.lateral
        bend = self.bend[0] * self.anterior + self.bend[1] * self.lateral
        axis_points = self.centre + s * self.axis + (s / self.semi_axis) ** 2 * bend
        lo = np.zeros((len(s), 1))
        hi = np.full((len(s), 1), 3.0 * max(self.r_ant, self.r_lat))
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            p = axis_points + mid * radial
            inside = self.enclosed(p[:, 0], p[:, 1], p[:, 2])[:, None]
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        return axis_points + lo * radial, radial

    def surface_point(self, angle_deg: float, frac: float) -> tuple[np.ndarray, np.ndarray]:
        """A point (3,) on the outer surface at polar ``angle_deg`` and axial ``frac``, and the outward
        radial direction (3,) there (world mm)."""
        points, radial = self.surface_points(np.array([angle_deg]), np.array([frac]))
        return points[0], radial[0]

    def lowest_point(self) -> np.ndarray:
        """The most inferior point (min z) of the outer surface of the cup (3,)."""
        angle, frac = np.meshgrid(np.arange(-180.0, 180.0, 10.0), np.linspace(0.0, 0.95, 16))
        points, _ = self.surface_points(angle.ravel(), frac.ravel())
        return points[np.argmin(points[:, 2])]


@dataclass(frozen=True)
class UptakePattern:
    """A smooth multiplicative reduction of myocardial uptake over part of the LV.

    The weight is an angular window (full within ``half_width_deg - edge_deg / 2`` of
    ``centre_deg``, a cubic taper over ``edge_deg``) times an axial window on
    ``frac_range`` (tapered over ``frac_edge``), or the whole circumference beyond
    ``apical_cap`` (axial fraction; > 1: no cap). Uptake is multiplied by ``1 - severity * weight``.
    """

    name: str
    centre_deg: float
    half_width_deg: float
    edge_deg: float
    severity: float
    frac_range: tuple[float, float] = (0.0, 1.0)
    frac_edge: float = 0.15
    apical_cap: float = 2.0

    def weight(self, angle: np.ndarray, frac: np.ndarray) -> np.ndarray:
        """Weight in [0, 1] for polar ``angle`` (deg) and axial ``frac`` arrays of one shape."""
        delta = np.abs((angle - self.centre_deg + 180.0) % 360.0 - 180.0)
        w_angle = smoothstep(self.half_width_deg + self.edge_deg / 2 - delta, 0.0, self.edge_deg)
        lo, hi = self.frac_range
        e = self.frac_edge / 2
        w_axial = smoothstep(frac, lo - e, lo + e) if lo > 0 else np.ones_like(frac)
        if hi < 1.0:
            w_axial = w_axial * (1.0 - smoothstep(frac, hi - e, hi + e))
        weight = w_angle * w_axial
        if self.apical_cap <= 1.0:
            weight = np.maximum(weight, smoothstep(frac, self.apical_cap - 0.08, self.apical_cap + 0.08))
        return weight


# Coronary territories: (centre angle, half-width) in degrees of the polar frame above.
TERRITORIES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"LAD": (-35.0, 70.0), "LCX": (105.0, 45.0), "RCA": (-150.0, 45.0)}
)


def myocardial_uptake(
    lv: LeftVentricle,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    patterns: list[UptakePattern],
    ripple: list[tuple[float, int, float]],
) -> np.ndarray:
    """Relative myocardial uptake (1 = normal), float32 of the broadcast shape.

    ``ripple`` adds mild normal heterogeneity: terms ``amplitude * cos(k * angle + phase)``
    (k harmonics of the polar angle); ``patterns`` (defects, thinning, attenuation) multiply.
    """
    angle, frac = lv.polar(x, y, z)
    uptake = np.ones(np.broadcast_shapes(angle.shape, frac.shape), dtype=np.float32)
    rad = np.deg2rad(angle)
    for amplitude, k, phase in ripple:
        uptake += np.float32(amplitude) * np.cos(k * rad + phase + 2.0 * frac).astype(np.float32)
    for pattern in patterns:
        uptake *= (1.0 - pattern.severity * pattern.weight(angle, frac)).astype(np.float32)
    return np.clip(uptake, 0.0, None)
