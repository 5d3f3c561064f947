"""Morphological post-processing of a binary segmentation, step by step and as a chain.

Every step is a pure function on a 3D mask in NIfTI voxel order ``(i, j, k)``:
bool or integer input (non-zero is foreground), a new bool array of the same
shape out. Connectivity is 26 (face, edge or corner neighbours) throughout, for
objects and for holes. Distances and sizes are in voxels of the grid given (the
model grid in the predictor); no spacing is involved.

The chain (:class:`Postprocessor`) follows the seed's order: remove small objects,
keep the largest component, fill small or compact holes, close with a ball, median
filter, Gaussian smoothing into a soft map. Which steps run is set by
:class:`PostprocessSettings`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure, morphology

logger = logging.getLogger(__name__)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """Validate a 3D bool/integer mask and return it as a bool array (non-zero is foreground)."""
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D mask (I, J, K), got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"expected a bool or integer mask, got dtype {array.dtype}")
    return array != 0


def _full_connectivity() -> np.ndarray:
    """The 3x3x3 structuring element of 26-connectivity."""
    return ndimage.generate_binary_structure(3, 3)


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Slices of the smallest box holding every foreground voxel, grown by ``margin`` and clipped.

    Returns ``None`` for an empty mask.
    """
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present.size == 0:
            return None
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(start, stop))
    return slices[0], slices[1], slices[2]


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop the connected components smaller than ``min_size`` voxels.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.
    min_size
        Components with fewer voxels are removed; ``<= 1`` removes nothing.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``. Components are 26-connected.
    """
    binary = _as_mask(mask)
    if min_size <= 1 or not binary.any():
        return binary.copy()
    labels, count = ndimage.label(binary, structure=_full_connectivity())
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected component.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``; empty in, empty out. Of equal-sized largest components
        the first in C (raster) order of labelling is kept.
    """
    binary = _as_mask(mask)
    if not binary.any():
        return binary.copy()
    labels, count = ndimage.label(binary, structure=_full_connectivity())
    if count == 1:
        return binary.copy()
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def sphericity(region: np.ndarray) -> float:
    """Sphericity ``pi^(1/3) (6 V)^(2/3) / A`` of a 3D region, 1 for a ball, less otherwise.

    ``V`` and ``A`` are the volume and area of the region's marching-cubes surface at
    level 0.5 (voxel units), both taken from the same mesh so that the ratio is at
    most 1 (isoperimetric inequality) even for regions a few voxels across.

    Parameters
    ----------
    region
        bool ``(I, J, K)`` holding one region (cropped or not).

    Returns
    -------
    float
        In (0, 1]; 0.0 for an empty region.
    """
    if not np.any(region):
        return 0.0
    padded = np.pad(region.astype(np.float32), 1)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.5)
    area = float(measure.mesh_surface_area(verts, faces))
    triangles = verts[faces]
    volume = abs(float(np.einsum("ij,ij->i", triangles[:, 0], np.cross(triangles[:, 1], triangles[:, 2])).sum())) / 6.0
    if area <= 0.0 or volume <= 0.0:
        return 0.0
    return math.pi ** (1.0 / 3.0) * (6.0 * volume) ** (2.0 / 3.0) / area


def fill_holes_selective(mask: np.ndarray, max_hole_size: int, min_compactness: float | None = 0.6) -> np.ndarray:
    """Fill the enclosed background regions that are small or compact.

    A hole is a 26-connected background region that cannot reach the outside of the
    mask's bounding box (the box is padded by one background voxel, so a region
    touching the box or the volume edge is outside, not a hole). 26-connectivity for
    the background is the cautious choice: a cavity that leaks out even through a
    single diagonal gap is not a hole. So the cavity of an LV myocardium cup that is
    open at the valve plane is never filled, whatever its size or shape.

    A hole is filled when it has fewer than ``max_hole_size`` voxels, or when its
    :func:`sphericity` (the 3D analogue of the seed's 2D ``4 pi area / perimeter^2``)
    is at least ``min_compactness``. Caution: a prediction that closes the base of
    the cup turns the LV cavity into a compact hole, which this rule fills (as the
    seed did); pass ``min_compactness=None`` to fill by size only.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.
    max_hole_size
        Holes with fewer voxels are filled; ``<= 0`` disables the whole step.
    min_compactness
        Sphericity threshold in (0, 1]; ``None`` disables the compactness criterion.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``, a superset of the input.
    """
    binary = _as_mask(mask)
    box = _bounding_box(binary)
    if max_hole_size <= 0 or box is None:
        return binary.copy()
    crop = np.pad(binary[box], 1)
    labels, count = ndimage.label(~crop, structure=_full_connectivity())
    # The padding is one connected shell of background: its label is the outside.
    outside = labels[0, 0, 0]
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    objects = ndimage.find_objects(labels) if min_compactness is not None else []
    fill = sizes < max_hole_size
    fill[0] = False  # label 0 is the foreground
    fill[outside] = False
    if min_compactness is not None:
        for label in np.flatnonzero(sizes >= max_hole_size):
            if label in (0, outside):
                continue
            region = labels[objects[label - 1]] == label
            fill[label] = sphericity(region) >= min_compactness
    result = binary.copy()
    result[box] |= fill[labels][1:-1, 1:-1, 1:-1]
    return result


def binary_closing_ball(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological closing (dilation then erosion) with a ball of ``radius`` voxels.

    The mask is padded with ``radius + 1`` background voxels first, so that the
    erosion does not eat objects touching the volume edge.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.
    radius
        Ball radius in voxels (``skimage.morphology.ball``); ``<= 0`` returns the mask.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``, a superset of the input.
    """
    binary = _as_mask(mask)
    if radius <= 0 or not binary.any():
        return binary.copy()
    pad = radius + 1
    ball = morphology.ball(radius).astype(bool)
    padded = np.pad(binary, pad)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, structure=ball), structure=ball)
    return closed[pad:-pad, pad:-pad, pad:-pad] | binary


def median_filter(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary median filter over a ``size`` x ``size`` x ``size`` cube: a majority vote.

    A voxel is foreground when more than half of the window is, which is exactly the
    median of a binary window of odd size. Outside the volume the nearest voxel is
    repeated (``mode="nearest"``), so the volume edge does not erode.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.
    size
        Odd window edge in voxels; ``0`` or ``1`` returns the mask.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``.

    Raises
    ------
    ValueError
        For an even or negative ``size`` (an even window has no centre voxel).
    """
    binary = _as_mask(mask)
    if size in (0, 1):
        return binary.copy()
    if size < 0 or size % 2 == 0:
        raise ValueError(f"median filter size must be 0, 1 or an odd integer >= 3, got {size}")
    counts = ndimage.uniform_filter(binary.astype(np.float64), size=size, mode="nearest") * size**3
    # Counts are integers up to rounding; a strict majority of an odd count is >= (n + 1) / 2.
    return counts > size**3 / 2.0


def smooth(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a binary mask into a soft map.

    Parameters
    ----------
    mask
        bool or integer ``(I, J, K)``; non-zero is foreground.
    sigma
        Standard deviation in voxels (same along each axis); ``0`` returns the mask as
        float32. Outside the volume the nearest voxel is repeated.

    Returns
    -------
    numpy.ndarray
        float32 ``(I, J, K)`` in [0, 1].
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    soft = _as_mask(mask).astype(np.float32)
    if sigma == 0:
        return soft
    blurred = ndimage.gaussian_filter(soft, sigma=float(sigma), mode="nearest")
    return np.clip(blurred, 0.0, 1.0, out=blurred)


@dataclass(frozen=True)
class PostprocessSettings:
    """Which post-processing steps run, and with what parameters.

    Parameters
    ----------
    enable
        ``False`` turns the chain into the identity (the mask as float32).
    min_comp_voxels
        :func:`remove_small_objects` threshold; 0 disables.
    keep_largest_only
        Run :func:`keep_largest_component`.
    hole_size_threshold
        ``max_hole_size`` of :func:`fill_holes_selective` (compact holes are filled
        whatever their size); 0 disables hole filling.
    closing_structure_radius
        Ball radius of :func:`binary_closing_ball`; 0 disables (seed: 1).
    median_filter_size
        Window of :func:`median_filter`; 0 or 1 disables (seed: 3).
    smoothing_sigma
        Sigma of :func:`smooth` in voxels; 0 disables (seed: 0.3).
    threshold
        Threshold of the final soft map, applied by the caller after resampling to the
        input grid (and by :meth:`Postprocessor.binary` on the same grid).
    """

    enable: bool = True
    min_comp_voxels: int = 30
    keep_largest_only: bool = True
    hole_size_threshold: int = 0
    closing_structure_radius: int = 0
    median_filter_size: int = 0
    smoothing_sigma: float = 0.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("min_comp_voxels", "hole_size_threshold", "closing_structure_radius"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        size = self.median_filter_size
        if size < 0 or (size > 1 and size % 2 == 0):
            raise ValueError(f"median_filter_size must be 0, 1 or an odd integer >= 3, got {size}")
        if not (self.smoothing_sigma >= 0 and math.isfinite(self.smoothing_sigma)):
            raise ValueError(f"smoothing_sigma must be finite and >= 0, got {self.smoothing_sigma}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def seed_chain(cls) -> PostprocessSettings:
        """The seed pipeline's full chain (its ``config/default.yaml``), for parity."""
        return cls(
            enable=True,
            min_comp_voxels=30,
            keep_largest_only=True,
            hole_size_threshold=200,
            closing_structure_radius=1,
            median_filter_size=3,
            smoothing_sigma=0.3,
            threshold=0.5,
        )


class Postprocessor:
    """The post-processing chain: configuration in ``__init__``, data in ``__call__``.

    Parameters
    ----------
    settings
        Which steps run and how.
    """

    def __init__(self, settings: PostprocessSettings) -> None:
        self.settings = settings
        self._steps = self._build_steps(settings)

    @staticmethod
    def _build_steps(s: PostprocessSettings) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
        steps: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
        if not s.enable:
            return steps
        if s.min_comp_voxels > 1:
            steps.append(("remove_small_objects", lambda m: remove_small_objects(m, s.min_comp_voxels)))
        if s.keep_largest_only:
            steps.append(("keep_largest_component", keep_largest_component))
        if s.hole_size_threshold > 0:
            steps.append(("fill_holes_selective", lambda m: fill_holes_selective(m, s.hole_size_threshold)))
        if s.closing_structure_radius > 0:
            steps.append(("binary_closing_ball", lambda m: binary_closing_ball(m, s.closing_structure_radius)))
        if s.median_filter_size > 1:
            steps.append(("median_filter", lambda m: median_filter(m, s.median_filter_size)))
        return steps

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """Run the chain.

        Parameters
        ----------
        mask
            bool or integer ``(I, J, K)`` on the model grid; non-zero is foreground.

        Returns
        -------
        numpy.ndarray
            float32 soft map ``(I, J, K)`` in [0, 1]; with ``enable=False`` the mask as
            float32, unchanged.
        """
        current = _as_mask(mask)
        if not self.settings.enable:
            return current.astype(np.float32)
        for name, step in self._steps:
            before = current
            current = step(current)
            if logger.isEnabledFor(logging.DEBUG):
                removed = int(np.count_nonzero(before & ~current))
                added = int(np.count_nonzero(current & ~before))
                logger.debug("%s: removed %d voxels, added %d", name, removed, added)
        return smooth(current, self.settings.smoothing_sigma)

    def binary(self, mask: np.ndarray) -> np.ndarray:
        """The chain thresholded on the same grid.

        Parameters
        ----------
        mask
            bool or integer ``(I, J, K)``; non-zero is foreground.

        Returns
        -------
        numpy.ndarray
            uint8 ``(I, J, K)``, 1 where the soft map is ``>= settings.threshold``.
        """
        return (self(mask) >= self.settings.threshold).astype(np.uint8)
