"""Overlap and surface-distance metrics of binary segmentations, in physical units.

Masks are 3D arrays in NIfTI voxel order ``(i, j, k)``, bool or integer (non-zero is
foreground); ``spacing`` is the voxel size in mm along ``(i, j, k)``.

Definitions
-----------
- Surface of a mask: its voxels with at least one 6-neighbour (face neighbour) in
  the background, i.e. ``mask XOR erosion(mask, 6-neighbourhood)``; voxels on the
  volume edge count as surface (the outside is background).
- Directed distances from A to B: for each surface voxel of A, the Euclidean
  distance in mm from its centre to the nearest surface-voxel centre of B.
- ``hd95_mm``: the larger of the two directed 95th percentiles
  (``max(P95(d(A->B)), P95(d(B->A)))``), the convention of MONAI and of DeepMind's
  ``surface-distance``. (MedPy's ``hd95`` takes the 95th percentile of the pooled
  distances instead, which is never larger.)
- ``msd_mm``: the mean of the pooled distances of both directions (each surface
  voxel of either mask counts once).
- Empty masks: both empty gives Dice 1, IoU 1, HD95 0, MSD 0 (perfect agreement on
  "nothing"); exactly one empty gives Dice 0, IoU 0, HD95 = MSD = ``math.inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Spacing = tuple[float, float, float]


@dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics of one predicted mask against its reference.

    Attributes
    ----------
    dice, iou
        Overlap in [0, 1].
    hd95_mm
        Robust Hausdorff distance (max of the directed 95th percentiles), mm.
    msd_mm
        Mean symmetric surface distance (mean of the pooled distances), mm.
    """

    dice: float
    iou: float
    hd95_mm: float
    msd_mm: float


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate two 3D masks of one shape and return them as bool arrays."""
    a, b = np.asarray(pred), np.asarray(truth)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: pred {a.shape} vs truth {b.shape}")
    if a.ndim != 3:
        raise ValueError(f"expected 3D masks (I, J, K), got shape {a.shape}")
    for name, array in (("pred", a), ("truth", b)):
        if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name}: expected a bool or integer mask, got dtype {array.dtype}")
    return a.astype(bool, copy=False), b.astype(bool, copy=False)


def _spacing(spacing: Sequence[float]) -> Spacing:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive finite voxel sizes in mm, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)``; 1.0 when both masks are empty.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape; non-zero is foreground.
    """
    a, b = _pair(pred, truth)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|A & B| / |A | B|``; 1.0 when both are empty.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape; non-zero is foreground.
    """
    a, b = _pair(pred, truth)
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR erosion(mask)`` with the 6-neighbourhood.

    Parameters
    ----------
    mask
        bool ``(I, J, K)``.

    Returns
    -------
    numpy.ndarray
        bool ``(I, J, K)``; the outside of the volume counts as background.
    """
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def directed_surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances in mm in both directions.

    Both masks are cropped to their joint bounding box (plus one voxel) first: every
    surface voxel lies inside it, so the distances are unchanged and large grids
    cost little.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape, both non-empty.
    spacing
        Voxel size in mm along ``(i, j, k)``.

    Returns
    -------
    tuple of numpy.ndarray
        float64 1D arrays: distances from each surface voxel of ``pred`` to the surface
        of ``truth``, and from each surface voxel of ``truth`` to that of ``pred``.
    """
    a, b = _pair(pred, truth)
    sampling = _spacing(spacing)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    union = a | b
    box = []
    for axis in range(3):
        present = np.flatnonzero(union.any(axis=tuple(x for x in range(3) if x != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, union.shape[axis])))
    window = tuple(box)
    surface_a, surface_b = surface(a[window]), surface(b[window])
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)
    return np.asarray(to_b[surface_a], dtype=np.float64), np.asarray(to_a[surface_b], dtype=np.float64)


def _hd95(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _msd(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    return float(np.concatenate([a_to_b, b_to_a]).mean())


def _empty_case(a: np.ndarray, b: np.ndarray) -> float | None:
    """Surface distance for empty masks (0 for both empty, inf for one), ``None`` otherwise."""
    has_a, has_b = bool(a.any()), bool(b.any())
    if has_a and has_b:
        return None
    return 0.0 if not (has_a or has_b) else math.inf


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Robust Hausdorff distance in mm: the larger of the two directed 95th percentiles.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape; non-zero is foreground.
    spacing
        Voxel size in mm along ``(i, j, k)``.

    Returns
    -------
    float
        0.0 when both are empty, ``math.inf`` when exactly one is.
    """
    return compute_metrics(pred, truth, spacing).hd95_mm


def mean_surface_distance(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean symmetric surface distance in mm: the mean of both directions' distances pooled.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape; non-zero is foreground.
    spacing
        Voxel size in mm along ``(i, j, k)``.

    Returns
    -------
    float
        0.0 when both are empty, ``math.inf`` when exactly one is.
    """
    return compute_metrics(pred, truth, spacing).msd_mm


def compute_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> SegmentationMetrics:
    """All four metrics, computing the surface distance maps once.

    Parameters
    ----------
    pred, truth
        bool or integer ``(I, J, K)`` of one shape; non-zero is foreground.
    spacing
        Voxel size in mm along ``(i, j, k)``.

    Raises
    ------
    ValueError
        On a shape mismatch (naming both shapes) or an invalid spacing.
    """
    a, b = _pair(pred, truth)
    _spacing(spacing)
    empty = _empty_case(a, b)
    if empty is not None:
        overlap = 1.0 if empty == 0.0 else 0.0
        return SegmentationMetrics(dice=overlap, iou=overlap, hd95_mm=empty, msd_mm=empty)
    a_to_b, b_to_a = directed_surface_distances(a, b, spacing)
    return SegmentationMetrics(
        dice=dice(a, b), iou=iou(a, b), hd95_mm=_hd95(a_to_b, b_to_a), msd_mm=_msd(a_to_b, b_to_a)
    )


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and standard deviation over the finite values.

    Parameters
    ----------
    values
        Per-case metric values; ``inf`` and ``nan`` are left out and counted.

    Returns
    -------
    dict
        ``mean``, ``median``, ``std`` (population, ``ddof=0``) over the finite values
        (``nan`` when there are none), ``n`` the number of finite values and
        ``n_nonfinite`` the number left out (both ints).
    """
    array = np.asarray(list(values), dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    n, n_nonfinite = int(finite.size), int(array.size - finite.size)
    if n == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "n": 0, "n_nonfinite": n_nonfinite}
    return {
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "std": float(finite.std()),
        "n": n,
        "n_nonfinite": n_nonfinite,
    }
