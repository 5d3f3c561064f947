"""Training-time augmentation on the model grid.

Pure functions of (image, label, rng): the image is float32 ``(I, J, K)`` in [0, 1],
the label ``(I, J, K)`` uint8 0/1 or float32 fractions (soft labels); both come back
with the same shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random transforms (each applied with probability ``p``)."""

    p: float = 0.8
    max_rotation_deg: float = 12.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_voxels: float = 4.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.75, 1.25)
    max_noise_sigma: float = 0.05
    flip: bool = False  # mirroring swaps the heart's handedness: off unless asked


def random_affine(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, settings: AugmentSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Small rotation about the volume centre, isotropic scaling and a shift.

    The image is interpolated linearly, a uint8 label by nearest neighbour, a float (soft) label linearly.
    """
    angles = rng.uniform(-settings.max_rotation_deg, settings.max_rotation_deg, size=3)
    scale = rng.uniform(*settings.scale_range)
    matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() / scale
    centre = (np.array(image.shape) - 1) / 2.0
    shift = rng.uniform(-settings.max_shift_voxels, settings.max_shift_voxels, size=3)
    offset = centre - matrix @ centre + shift
    warped = ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    order = 1 if label.dtype.kind == "f" else 0
    warped_label = ndimage.affine_transform(label, matrix, offset=offset, order=order, mode="constant", cval=0)
    return warped.astype(np.float32), warped_label.astype(label.dtype)


def random_intensity(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    """Gamma, contrast around the mean and additive Gaussian noise, clipped to [0, 1]."""
    out = np.power(np.clip(image, 0, 1), rng.uniform(*settings.gamma_range))
    mean = float(out.mean())
    out = (out - mean) * rng.uniform(*settings.contrast_range) + mean
    sigma = rng.uniform(0, settings.max_noise_sigma)
    if sigma > 0:
        out = out + rng.normal(0.0, sigma, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def augment(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, settings: AugmentSettings | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the random transforms of ``settings`` (default ranges when ``None``)."""
    settings = settings or AugmentSettings()
    if rng.random() < settings.p:
        image, label = random_affine(image, label, rng, settings)
    if settings.flip and rng.random() < 0.5:
        axis = int(rng.integers(0, 3))
        image, label = np.flip(image, axis).copy(), np.flip(label, axis).copy()
    if rng.random() < settings.p:
        image = random_intensity(image, rng, settings)
    return image, label
