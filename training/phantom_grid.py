"""Camera-like reconstruction grids for the phantoms, and painting analytic shapes onto them.

A phantom is built on an internal array in RAS voxel order (``i`` -> patient right,
``j`` -> anterior, ``k`` -> superior) with coordinates in mm centred on the field of
view; :meth:`CameraGrid.store` flips it into the stored voxel order (LPS as the node's
NM reader produces, LPI when the slice spacing is negative, or RAS) and
:meth:`CameraGrid.affine` gives the matching RAS+ affine, which places the field of
view at ``world_centre``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

# voxel-axis flips of each stored order relative to RAS
ORDERS: Mapping[str, tuple[bool, bool, bool]] = MappingProxyType(
    {"LPS": (True, True, False), "LPI": (True, True, True), "RAS": (False, False, False)}
)

Shape = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CameraGrid:
    """Matrix, voxel size (mm, positive, per RAS axis), stored voxel order and world position of a grid."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    order: str
    world_centre: tuple[float, float, float]

    @property
    def fov_mm(self) -> np.ndarray:
        """Extent (mm) of the grid along each axis (3,)."""
        return np.asarray(self.shape, float) * np.asarray(self.spacing)

    def axis_coords(self) -> list[np.ndarray]:
        """FOV-centred coordinates (mm, float32) of the voxel centres along x, y, z, increasing (RAS order)."""
        return [
            ((np.arange(n) - (n - 1) / 2.0) * d).astype(np.float32)
            for n, d in zip(self.shape, self.spacing, strict=True)
        ]

    def affine(self) -> np.ndarray:
        """RAS+ affine ``(4, 4)`` float64 of the stored array (after :meth:`store`)."""
        affine = np.eye(4)
        for axis, (n, d, flip) in enumerate(zip(self.shape, self.spacing, ORDERS[self.order], strict=True)):
            half = (n - 1) / 2.0 * d
            affine[axis, axis] = -d if flip else d
            affine[axis, 3] = self.world_centre[axis] + (half if flip else -half)
        return affine

    def store(self, array: np.ndarray) -> np.ndarray:
        """An ``(I, J, K)`` array in RAS voxel order, flipped into the stored order (contiguous copy)."""
        flips = tuple(axis for axis, flip in enumerate(ORDERS[self.order]) if flip)
        return np.ascontiguousarray(np.flip(array, axis=flips) if flips else array)


def sample_grid(
    rng: np.random.Generator,
    p_matrix_128: float,
    p_slices_reversed: float,
    p_ras_order: float,
    axial_extent_mm: tuple[float, float],
    p_anisotropic: float,
    pixel_mm: float | None = None,
) -> CameraGrid:
    """Draw a camera grid: 64x64 at 6.25-7.0 mm or 128x128 at 3.2-4.29 mm in-plane (a 40-55 cm field of
    view), 56-128 slices covering ``axial_extent_mm``, mostly in LPS order.

    ``pixel_mm`` replaces the drawn pixel size after every draw: the same field of view on a
    finer or coarser matrix, slices scaled alike (the random stream is unchanged).
    """
    if rng.random() < p_matrix_128:
        n, pixel = 128, rng.uniform(3.2, 550.0 / 128)
    else:
        n, pixel = 64, rng.uniform(400.0 / 64, 7.0)
    ratio, anisotropic = rng.uniform(0.85, 1.15), rng.random() < p_anisotropic
    slice_mm = pixel * ratio if anisotropic else pixel
    n_slices = int(np.clip(round(rng.uniform(*axial_extent_mm) / slice_mm), 56, 128))
    roll = rng.random()
    order = "RAS" if roll < p_ras_order else "LPI" if roll < p_ras_order + p_slices_reversed else "LPS"
    centre = (rng.uniform(-40, 40), rng.uniform(-250, 50), rng.uniform(-400, 200))
    if pixel_mm is not None:
        zoom = pixel / pixel_mm
        n, n_slices = round(n * zoom), round(n_slices * zoom)
        pixel, slice_mm = pixel_mm, slice_mm / zoom
    return CameraGrid((n, n, n_slices), (pixel, pixel, slice_mm), order, centre)


class Canvas:
    """Paints shapes given as functions of FOV-centred coordinates onto arrays of a grid's shape (RAS order)."""

    def __init__(self, grid: CameraGrid) -> None:
        self.grid = grid
        self.shape = grid.shape
        self.coords = grid.axis_coords()
        self.voxel_mm = float(np.mean(grid.spacing))

    def full(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x ``(I,1,1)``, y ``(1,J,1)``, z ``(1,1,K)`` of the whole grid."""
        x, y, z = self.coords
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def region(self, lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, slice, slice], tuple] | None:
        """The voxels whose centres lie in the box ``[lo, hi]`` (mm): slices and broadcastable coordinates,
        or ``None`` when the box misses the grid."""
        slices = []
        for c, a, b in zip(self.coords, lo, hi, strict=True):
            start, stop = int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right"))
            if stop <= start:
                return None
            slices.append(slice(start, stop))
        x, y, z = (c[s] for c, s in zip(self.coords, slices, strict=True))
        return tuple(slices), (x[:, None, None], y[None, :, None], z[None, None, :])

    def paint(
        self,
        layers: list[tuple[np.ndarray, float | Shape]],
        bounds: tuple[np.ndarray, np.ndarray],
        fraction: Shape | np.ndarray,
    ) -> np.ndarray | None:
        """Paint over each ``(target, value)`` layer inside ``bounds``: ``target += f * (value - target)``.

        ``fraction`` is a function of ``(x, y, z)`` giving the occupancy in [0, 1] (or the
        occupancy array of the region itself); ``value`` a number or such a function. Returns
        the occupancy painted (region-shaped) or ``None`` when the box misses the grid.
        """
        found = self.region(*bounds)
        if found is None:
            return None
        slices, (x, y, z) = found
        frac = fraction if isinstance(fraction, np.ndarray) else fraction(x, y, z)
        frac = np.broadcast_to(frac, tuple(s.stop - s.start for s in slices)).astype(np.float32)
        for target, value in layers:
            v = value(x, y, z) if callable(value) else np.float32(value)
            view = target[slices]
            view += frac * (v - view)
        return frac

    def supersample(self, inside: Shape, bounds: tuple[np.ndarray, np.ndarray], factor: int) -> np.ndarray | None:
        """Fraction (float32, region-shaped) of ``factor**3`` sub-voxel points per voxel for which the
        boolean ``inside(x, y, z)`` holds, within ``bounds``; ``None`` when the box misses the grid."""
        found = self.region(*bounds)
        if found is None:
            return None
        _, (x, y, z) = found
        offsets = ((np.arange(factor) + 0.5) / factor - 0.5).astype(np.float32)
        dx, dy, dz = (np.float32(d) for d in self.grid.spacing)
        total = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for ox in offsets:
            for oy in offsets:
                for oz in offsets:
                    total += inside(x + ox * dx, y + oy * dy, z + oz * dz)
        return total / np.float32(factor**3)

    def place(
        self, region_values: np.ndarray, bounds: tuple[np.ndarray, np.ndarray], dtype: type = np.float32
    ) -> np.ndarray:
        """A full-grid array (zeros) holding ``region_values`` where ``region(bounds)`` lies."""
        out = np.zeros(self.shape, dtype=dtype)
        found = self.region(*bounds)
        if found is not None:
            out[found[0]] = region_values
        return out
