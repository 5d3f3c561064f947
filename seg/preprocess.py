"""Volume preprocessing: reorientation, resampling and intensity normalisation.

All functions are pure. Arrays are 3D in NIfTI voxel order ``(i, j, k)``; affines
are 4x4 RAS+ (nibabel's convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
from nibabel import orientations
from scipy import ndimage

Normalization = Literal["percentile", "minmax", "none"]


@dataclass(frozen=True)
class PreprocessSettings:
    """How a volume is brought onto the model grid (recorded in every checkpoint).

    Parameters
    ----------
    target_shape
        Model grid ``(I, J, K)`` in voxels.
    normalization
        ``percentile`` maps the ``percentile_low``..``percentile_high`` range to [0, 1]
        and clips (robust to a hot liver); ``minmax`` is the seed's; ``none`` leaves values.
    reorient
        Bring the volume to the closest canonical (RAS) voxel order first. Plain seed
        checkpoints were trained without it (file's own voxel order).
    crop_spacing_mm
        Two passes when set: the heart is located on the whole field of view, then a
        ``target_shape`` box of this voxel size centred on it is segmented. ``None``: one
        pass over the whole field of view (the seed's way).
    """

    target_shape: tuple[int, int, int] = (64, 64, 56)
    normalization: Normalization = "percentile"
    percentile_low: float = 0.0
    percentile_high: float = 99.9
    reorient: bool = True
    crop_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        """Refuse settings no model could have been trained with (an edited or newer checkpoint)."""
        if self.normalization not in get_args(Normalization):
            raise ValueError(f"unknown normalization {self.normalization!r}")
        if len(self.target_shape) != 3 or min(self.target_shape) < 4:
            raise ValueError(f"target_shape {self.target_shape} must be 3 sizes of at least 4 voxels")
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ValueError(f"percentiles {self.percentile_low}..{self.percentile_high} must rise within 0..100")
        if self.crop_spacing_mm is not None and not self.crop_spacing_mm > 0:
            raise ValueError(f"crop_spacing_mm {self.crop_spacing_mm} must be positive")

    def to_dict(self) -> dict[str, object]:
        """Plain-dict form stored in checkpoints."""
        data = asdict(self)
        data["target_shape"] = list(self.target_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PreprocessSettings:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["target_shape"] = tuple(int(v) for v in values["target_shape"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]

    def orientation_for(self, affine: np.ndarray) -> Orientation:
        """The voxel reordering applied to an image with ``affine`` (identity when ``reorient`` is off)."""
        return Orientation.to_canonical(affine) if self.reorient else Orientation.identity()

    @classmethod
    def seed(cls, target_shape: tuple[int, int, int] = (64, 64, 56)) -> PreprocessSettings:
        """The seed pipeline's preprocessing: file voxel order, min-max."""
        return cls(target_shape=target_shape, normalization="minmax", reorient=False)


@dataclass(frozen=True)
class Orientation:
    """The voxel-axis transform from a file's order to the closest canonical (RAS) order.

    ``ornt`` is nibabel's ``(3, 2)`` orientation array (target axis, flip) for each
    input axis; the identity when ``reorient`` is off.
    """

    ornt: np.ndarray

    @classmethod
    def identity(cls) -> Orientation:
        return cls(np.array([[0, 1], [1, 1], [2, 1]], dtype=float))

    @classmethod
    def to_canonical(cls, affine: np.ndarray) -> Orientation:
        """Orientation taking voxels of an image with ``affine`` to RAS voxel order."""
        return cls(orientations.io_orientation(affine))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """File voxel order ``(i, j, k)`` -> canonical order; a view where possible."""
        return orientations.apply_orientation(array, self.ornt)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical order -> the file's voxel order (inverse of :meth:`apply`)."""
        inverse = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), self.ornt)
        return orientations.apply_orientation(array, inverse)

    def apply_spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Voxel sizes permuted like the axes by :meth:`apply`."""
        out = [0.0, 0.0, 0.0]
        for axis, (target, _flip) in enumerate(self.ornt):
            out[int(target)] = spacing[axis]
        return (out[0], out[1], out[2])


def resample_linear(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a volume to ``shape`` by trilinear interpolation.

    Parameters
    ----------
    volume
        ``(I, J, K)`` array, any real dtype.
    shape
        Output ``(I', J', K')``.

    Returns
    -------
    numpy.ndarray
        ``(I', J', K')`` float32. Voxel centres are aligned (the grid spans the same
        field of view), edges are extended by the nearest value.
    """
    volume = np.asarray(volume, dtype=np.float32)
    return GridMap.full_fov(volume.shape, shape).sample(volume, order=1)


def resample_labels(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a label map to ``shape`` by nearest neighbour.

    Unlike the seed's linear zoom + ``> 0`` (which dilates every mask), the label
    values and the structure's size are preserved.

    Parameters
    ----------
    labels
        ``(I, J, K)`` integer or bool label map.
    shape
        Output ``(I', J', K')``.

    Returns
    -------
    numpy.ndarray
        ``(I', J', K')`` of the input dtype.
    """
    labels = np.asarray(labels)
    return GridMap.full_fov(labels.shape, shape).sample(labels, order=0).astype(labels.dtype, copy=False)


def normalize_intensity(
    volume: np.ndarray,
    method: Normalization = "percentile",
    percentile_low: float = 0.0,
    percentile_high: float = 99.9,
) -> np.ndarray:
    """Scale intensities to [0, 1].

    Parameters
    ----------
    volume
        ``(I, J, K)`` real array.
    method
        ``minmax`` (the seed's: a hot liver maps to 1 and crushes the heart), ``percentile``
        (the ``percentile_low``..``percentile_high`` range maps to [0, 1], clipped; the
        maximum stands in for an upper percentile equal to the lower one), or ``none``.

    Returns
    -------
    numpy.ndarray
        float32 of the same shape; a constant volume maps to zeros.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if method == "none":
        return volume.copy()
    if method == "minmax":
        low, high = float(volume.min()), float(volume.max())
    elif method == "percentile":
        low, high = (float(v) for v in np.percentile(volume, [percentile_low, percentile_high]))
        if high <= low:  # a sparse image (activity in < 0.1% of the voxels, zeros elsewhere): scale to its max
            high = float(volume.max())
    else:
        raise ValueError(f"unknown normalization {method!r}")
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros_like(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the array axes ``(i, j, k)`` of a 4x4 affine."""
    sizes = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


@dataclass(frozen=True)
class GridMap:
    """Where the model grid lies in the (canonical) input grid.

    Model voxel ``m`` (per axis) sits at input voxel ``v = scale * m + offset``.
    :meth:`full_fov` spans the whole field of view (the seed's resize);
    :meth:`box` is a heart-centred box of fixed physical voxel size.
    """

    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    is_box: bool = False

    @classmethod
    def full_fov(cls, input_shape: tuple[int, ...], shape: tuple[int, int, int]) -> GridMap:
        """The whole input resampled to ``shape`` (voxel centres aligned)."""
        scale = np.array(input_shape[:3], dtype=float) / np.array(shape, dtype=float)
        offset = 0.5 * scale - 0.5
        return cls(tuple(shape), _triple(scale), _triple(offset))

    @classmethod
    def box(
        cls,
        centre: np.ndarray | tuple[float, float, float],
        input_spacing: tuple[float, float, float],
        shape: tuple[int, int, int],
        spacing_mm: float,
    ) -> GridMap:
        """A ``shape`` box of ``spacing_mm`` voxels centred on ``centre`` (input voxel coordinates)."""
        scale = spacing_mm / np.array(input_spacing, dtype=float)
        offset = np.asarray(centre, dtype=float) - scale * (np.array(shape, dtype=float) - 1) / 2.0
        return cls(tuple(shape), _triple(scale), _triple(offset), is_box=True)

    def to_input(self, model_voxel: np.ndarray) -> np.ndarray:
        """Model-grid voxel coordinates -> input voxel coordinates (last axis of length 3)."""
        return np.asarray(model_voxel, dtype=float) * np.array(self.scale) + np.array(self.offset)

    def sample(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample an input-grid array onto the model grid.

        ``volume`` is ``(I, J, K)`` in canonical order; returns ``self.shape``, float32 for
        ``order=1`` and the input dtype for ``order=0`` (labels). Outside the input, a
        full-FOV grid repeats the edge and a box reads 0.
        """
        source = volume.astype(np.uint8) if volume.dtype.kind == "b" else volume
        if order == 1:
            source = np.asarray(source, dtype=np.float32)
        if not self.is_box and tuple(source.shape) == self.shape:
            return source.copy()
        out = ndimage.affine_transform(
            source,
            np.array(self.scale),
            offset=np.array(self.offset),
            output_shape=self.shape,
            order=order,
            mode="constant" if self.is_box else "nearest",
            cval=0.0,
            prefilter=False,
        )
        return out.astype(volume.dtype, copy=False) if order == 0 else out

    def back(self, soft_map: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
        """A model-grid soft map onto the input grid by linear interpolation (0 outside a box).

        Returns float32 ``input_shape``.
        """
        scale = 1.0 / np.array(self.scale)
        offset = -np.array(self.offset) * scale
        return ndimage.affine_transform(
            np.asarray(soft_map, dtype=np.float32),
            scale,
            offset=offset,
            output_shape=tuple(input_shape),
            order=1,
            mode="constant" if self.is_box else "nearest",
            cval=0.0,
            prefilter=False,
        )


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def prepare_input(canonical: np.ndarray, grid: GridMap, settings: PreprocessSettings) -> np.ndarray:
    """Sample a canonical-order volume onto ``grid`` and normalise it (float32 ``grid.shape``)."""
    sampled = grid.sample(canonical)
    if settings.normalization == "none":
        return sampled
    return normalize_intensity(sampled, settings.normalization, settings.percentile_low, settings.percentile_high)


def to_model_grid(
    volume: np.ndarray,
    affine: np.ndarray,
    settings: PreprocessSettings,
) -> tuple[np.ndarray, Orientation]:
    """Reorient (optionally), resample the whole field of view and normalise, for the network.

    Parameters
    ----------
    volume
        ``(I, J, K)`` in the file's voxel order.
    affine
        Its 4x4 RAS+ affine.

    Returns
    -------
    tuple
        ``(array, orientation)``: float32 ``settings.target_shape`` in [0, 1], and the
        orientation used (to bring results back with :func:`from_model_grid`).
    """
    orientation = settings.orientation_for(affine)
    canonical = orientation.apply(np.asarray(volume, dtype=np.float32))
    grid = GridMap.full_fov(canonical.shape, settings.target_shape)
    return prepare_input(canonical, grid, settings), orientation


def labels_to_model_grid(labels: np.ndarray, affine: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """The training-side twin of :func:`to_model_grid` for a label map (nearest neighbour).

    Returns ``settings.target_shape`` uint8.
    """
    orientation = settings.orientation_for(affine)
    canonical = orientation.apply(np.asarray(labels) > 0).astype(np.uint8)
    return GridMap.full_fov(canonical.shape, settings.target_shape).sample(canonical, order=0)


def from_model_grid(
    soft_map: np.ndarray,
    input_shape: tuple[int, int, int],
    orientation: Orientation,
    threshold: float = 0.5,
    grid: GridMap | None = None,
) -> np.ndarray:
    """Bring a soft map from the model grid back onto the input grid and threshold it.

    Parameters
    ----------
    soft_map
        ``grid.shape`` float in [0, 1] (probabilities or a smoothed mask), canonical order.
    input_shape
        Shape of the original volume in its file voxel order.
    orientation
        The orientation used on the way in.
    grid
        Where the model grid lay in the canonical input (default: the full field of view).

    Returns
    -------
    numpy.ndarray
        uint8 mask of ``input_shape`` in the file's voxel order (linear resampling, then
        ``>= threshold``).
    """
    canonical_shape = tuple(int(s) for s in orientation.apply(np.empty(input_shape, dtype=np.uint8)).shape)
    grid = grid or GridMap.full_fov(canonical_shape, tuple(soft_map.shape))  # type: ignore[arg-type]
    resampled = grid.back(soft_map, canonical_shape)  # type: ignore[arg-type]
    mask = (resampled >= threshold).astype(np.uint8)
    return np.ascontiguousarray(orientation.invert(mask))
