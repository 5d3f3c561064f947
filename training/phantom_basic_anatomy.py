"""Analytic anatomy of the MPI-SPECT phantoms, in patient coordinates (RAS+, mm).

Every shape is a function of world points ``(N, 3)`` returning a per-point value,
so a case can be sampled on any camera grid. The left ventricle is a thick
ellipsoidal cup, open at the valve plane, whose long axis points to the patient's
left, anterior and inferior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1."""
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with its own axes (rows of ``axes`` are unit vectors) and semi-axes (mm)."""

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray

    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        """``(N,)`` value that is 1 on the surface, < 1 inside."""
        local = (points - self.centre) @ self.axes.T
        return np.sqrt(((local / self.radii) ** 2).sum(axis=1))

    def inside(self, points: np.ndarray) -> np.ndarray:
        return self.normalised_radius(points) <= 1.0


def random_axes(rng: np.random.Generator, max_tilt_deg: float = 25.0) -> np.ndarray:
    """A rotation matrix (rows = axes) close to the identity."""
    angles = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class LeftVentricle:
    """A truncated thick ellipsoidal shell (the LV myocardium) and its local frame.

    ``axis`` points from the base to the apex; ``lateral`` and ``anterior`` complete the
    frame. The outer surface has semi-axes ``(length, r_ant, r_lat)`` measured from the
    ellipsoid centre ``centre``; the valve plane cuts it at ``base_offset`` mm along the
    axis (negative: beyond the equator, toward the atria).
    """

    centre: np.ndarray
    axis: np.ndarray
    anterior: np.ndarray
    lateral: np.ndarray
    length: float
    r_ant: float
    r_lat: float
    wall: float
    apex_wall: float
    base_offset: float

    @classmethod
    def orient(cls, centre: np.ndarray, azimuth_deg: float, elevation_deg: float, **shape: float) -> LeftVentricle:
        """Long axis from the azimuth (from patient-left toward anterior) and elevation (negative = inferior)."""
        az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
        axis = unit(np.array([-np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)]))
        left = np.array([-1.0, 0.0, 0.0])
        lateral = unit(left - axis * (left @ axis))
        anterior = np.cross(axis, lateral)
        if anterior @ np.array([0.0, 1.0, 0.5]) < 0:
            anterior = -anterior
        return cls(centre=centre, axis=axis, anterior=anterior, lateral=lateral, **shape)

    def local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(s, a, l)``: coordinates along the axis, anterior and lateral directions (mm)."""
        d = points - self.centre
        return d @ self.axis, d @ self.anterior, d @ self.lateral

    def myocardium(self, points: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: inside the outer surface, outside the cavity, apex side of the valve plane."""
        s, a, lat = self.local(points)
        outer = (s / self.length) ** 2 + (a / self.r_ant) ** 2 + (lat / self.r_lat) ** 2 <= 1.0
        inner_len = self.length - self.apex_wall
        cavity = (s / inner_len) ** 2 + (a / (self.r_ant - self.wall)) ** 2 + (
            lat / (self.r_lat - self.wall)
        ) ** 2 <= 1.0
        return outer & ~cavity & (s >= self.base_offset)

    def cavity(self, points: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: the blood pool inside the cup."""
        s, a, lat = self.local(points)
        inner_len = self.length - self.apex_wall
        inside = (s / inner_len) ** 2 + (a / (self.r_ant - self.wall)) ** 2 + (lat / (self.r_lat - self.wall)) ** 2
        return (inside <= 1.0) & (s >= self.base_offset)

    def polar(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Angle around the axis (deg; 0 anterior, 90 lateral, 180 inferior, -90 septal) and
        the fraction from base (0) to apex (1)."""
        s, a, lat = self.local(points)
        angle = np.degrees(np.arctan2(lat, a))
        frac = np.clip((s - self.base_offset) / (self.length - self.base_offset), 0.0, 1.0)
        return angle, frac

    def inferior_point(self) -> np.ndarray:
        """A point just outside the inferior wall at mid-ventricle (mm)."""
        return self.centre + self.axis * self.length * 0.35 - self.anterior * (self.r_ant + 2.0)


# Coronary territories: centre angle (deg, 0 anterior, 90 lateral, +-180 inferior, -90 septal), half-width.
TERRITORIES: dict[str, tuple[float, float]] = {"LAD": (-30.0, 75.0), "LCX": (100.0, 50.0), "RCA": (-165.0, 55.0)}


def angular_weight(angle: np.ndarray, centre: float, half_width: float, edge: float = 20.0) -> np.ndarray:
    """1 inside the territory, a cosine taper of ``edge`` degrees at its border, 0 outside."""
    delta = np.abs((angle - centre + 180.0) % 360.0 - 180.0)
    ramp = np.clip((half_width + edge / 2 - delta) / edge, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * ramp)
