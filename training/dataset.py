"""Loading cases onto the model grid once, and the torch Dataset that serves them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from seg.preprocess import GridMap, PreprocessSettings, normalize_intensity, prepare_input, voxel_spacing
from training.augment import AugmentSettings, augment
from training.discovery import Case

log = logging.getLogger(__name__)


class CaseLoadError(ValueError):
    """A case file cannot be used; the message names the file and the problem."""


def load_volume(path: Path) -> nib.Nifti1Image:
    """Read a 3D NIfTI (a trailing singleton 4th axis is dropped) or raise :class:`CaseLoadError`."""
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise CaseLoadError(f"{path}: cannot read NIfTI: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseLoadError(f"{path}: expected a 3D volume, found shape {data.shape}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise CaseLoadError(f"{path}: {np.count_nonzero(~np.isfinite(data))} voxel(s) are NaN or infinite")
    return nib.Nifti1Image(np.asarray(data), image.affine)


# How far (mm) a mask's affine may stray from its volume's: float32 header rounding, not a shift.
AFFINE_TOLERANCE_MM = 0.01


def load_mask(path: Path, volume: nib.Nifti1Image) -> np.ndarray:
    """The mask at ``path`` as bool ``(I, J, K)`` on the grid of ``volume``, or raise :class:`CaseLoadError`.

    Any non-zero label counts as myocardium (0/1, 0/255; several labels are merged, with a
    warning); a float mask of partial-volume fractions is cut at 0.5. The mask must share
    the volume's shape and affine.
    """
    mask = load_volume(path)
    if mask.shape != volume.shape:
        raise CaseLoadError(f"{path}: mask shape {mask.shape} differs from volume shape {volume.shape}")
    offset = float(np.abs(mask.affine - volume.affine).max())
    if offset > AFFINE_TOLERANCE_MM:
        raise CaseLoadError(
            f"{path}: mask affine differs from its volume's (largest difference {offset:.3g}): "
            "flipped, shifted or resampled?"
        )
    data = np.asarray(mask.dataobj)
    if data.dtype.kind == "f" and np.any((data > 0) & (data < 1)):
        return data >= 0.5
    labels = np.unique(data[data > 0])
    if len(labels) > 1:
        log.warning("%s: labels %s; every non-zero label counts as myocardium", path, labels[:5].tolist())
    return data > 0


@dataclass
class PreparedCase:
    """A case ready for training, in canonical (RAS) voxel order.

    Attributes
    ----------
    image, label
        The whole field of view on the model grid: float32 in [0, 1] and the label,
        ``target_shape``: uint8 0/1, or float32 partial-volume fractions in [0, 1] with
        soft labels.
    box_image, box_label
        Two-pass models only: a heart-centred box at ``crop_spacing_mm`` voxels, larger than
        ``target_shape`` by ``margin`` voxels on each side (so training windows can be
        jittered around the heart); float32 *unnormalised*, and the label as above.
    margin
        Voxels of context on each side of the box.
    """

    base: str
    image: np.ndarray
    label: np.ndarray
    box_image: np.ndarray | None = None
    box_label: np.ndarray | None = None
    margin: int = 0

    def box_window(self, offset: tuple[int, int, int], settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        """The ``target_shape`` window at ``offset`` voxels into the box, normalised like at inference."""
        assert self.box_image is not None and self.box_label is not None
        window = tuple(slice(o, o + n) for o, n in zip(offset, settings.target_shape, strict=True))
        image = self.box_image[window]
        if settings.normalization != "none":
            image = normalize_intensity(
                image, settings.normalization, settings.percentile_low, settings.percentile_high
            )
        return image, self.box_label[window]

    def centred_box(self, settings: PreprocessSettings) -> tuple[np.ndarray, np.ndarray]:
        """The window centred on the heart (validation)."""
        return self.box_window((self.margin,) * 3, settings)  # type: ignore[arg-type]


def prepare_case(
    case: Case, settings: PreprocessSettings, box_margin: int = 0, soft_labels: bool = False
) -> PreparedCase:
    """Load one case and bring it to the model grid (and the heart box for two-pass models).

    The mask goes to the model grid by nearest neighbour (uint8 0/1) or, with
    ``soft_labels``, by linear interpolation (float32 fractions): the target the
    model's probability map is compared with after it is interpolated back.
    """
    if case.mask is None:
        raise CaseLoadError(f"{case.volume}: no mask; cases without a mask are not used for training")
    volume = load_volume(case.volume)
    mask = load_mask(case.mask, volume)
    orientation = settings.orientation_for(volume.affine)
    canonical = orientation.apply(np.asarray(volume.dataobj, dtype=np.float32))
    labels = orientation.apply(mask).astype(np.uint8)
    full = GridMap.full_fov(canonical.shape, settings.target_shape)
    order = 1 if soft_labels else 0
    prepared = PreparedCase(case.base, prepare_input(canonical, full, settings), full.sample(labels, order=order))
    if settings.crop_spacing_mm is not None:
        if not labels.any():
            raise CaseLoadError(f"{case.mask}: empty mask; a two-pass model needs the heart's position")
        shape = tuple(n + 2 * box_margin for n in settings.target_shape)
        spacing = orientation.apply_spacing(voxel_spacing(volume.affine))
        box = GridMap.box(np.argwhere(labels).mean(axis=0), spacing, shape, settings.crop_spacing_mm)  # type: ignore[arg-type]
        prepared.box_image = box.sample(canonical)
        prepared.box_label = box.sample(labels, order=order)
        prepared.margin = box_margin
    return prepared


def prepare_cases(
    cases: Sequence[Case],
    settings: PreprocessSettings,
    progress: bool = True,
    desc: str = "loading",
    box_margin: int = 0,
    workers: int = 0,
    soft_labels: bool = False,
) -> list[PreparedCase]:
    """:func:`prepare_case` for every case, in order, with a progress bar.

    ``workers`` > 1 spreads the cases over that many processes (the result does not depend on it).
    """
    bar = tqdm(total=len(cases), desc=desc, unit="case", disable=not progress, leave=False)
    prepared: list[PreparedCase] = []
    if workers > 1 and len(cases) > 1:
        with ProcessPoolExecutor(min(workers, len(cases))) as pool:
            n = len(cases)
            args = [settings] * n, [box_margin] * n, [soft_labels] * n
            for item in pool.map(prepare_case, cases, *args, chunksize=4):
                prepared.append(item)
                bar.update()
    else:
        for case in cases:
            prepared.append(prepare_case(case, settings, box_margin, soft_labels))
            bar.update()
    bar.close()
    return prepared


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Prepared cases as ``(image, label)`` tensors ``(1, I, J, K)`` float32.

    For two-pass models each item shows either the whole field of view (with
    probability ``full_view_fraction``: the model learns to find the heart) or a
    heart box at a random offset of up to ``margin`` voxels. With ``augment`` set, each
    item is transformed with an RNG seeded from ``(seed, epoch, index)``: reproducible,
    and resumable mid-run. Call :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        settings: PreprocessSettings,
        augment_settings: AugmentSettings | None = None,
        seed: int = 0,
        full_view_fraction: float = 0.3,
    ) -> None:
        self.cases = list(cases)
        self.settings = settings
        self.augment_settings = augment_settings
        self.seed = seed
        self.full_view_fraction = full_view_fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, label = case.image, case.label
        if case.box_image is not None and rng.random() >= self.full_view_fraction:
            offset = tuple(int(o) for o in rng.integers(0, 2 * case.margin + 1, size=3))
            image, label = case.box_window(offset, self.settings)  # type: ignore[arg-type]
        if self.augment_settings is not None:
            image, label = augment(image, label, rng, self.augment_settings)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None],
        )
