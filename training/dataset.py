"""Loading cases onto the model grid once, and the torch Dataset that serves them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from seg.preprocess import PreprocessSettings, labels_to_model_grid, to_model_grid
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
    return nib.Nifti1Image(np.asarray(data), image.affine)


@dataclass
class PreparedCase:
    """A case on the model grid: ``image`` float32 in [0, 1], ``label`` uint8, both ``target_shape``."""

    base: str
    image: np.ndarray
    label: np.ndarray


def prepare_cases(
    cases: Sequence[Case], settings: PreprocessSettings, progress: bool = True, desc: str = "loading"
) -> list[PreparedCase]:
    """Load, reorient, resample and normalise every case (labels by nearest neighbour)."""
    prepared = []
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False):
        if case.mask is None:
            raise CaseLoadError(f"{case.volume}: no mask; cases without a mask are not used for training")
        volume = load_volume(case.volume)
        mask = load_volume(case.mask)
        if volume.shape != mask.shape:
            raise CaseLoadError(f"{case.mask}: mask shape {mask.shape} differs from volume shape {volume.shape}")
        image, _ = to_model_grid(np.asarray(volume.dataobj, dtype=np.float32), volume.affine, settings)
        label = labels_to_model_grid(np.asarray(mask.dataobj), volume.affine, settings)
        prepared.append(PreparedCase(case.base, image, label))
    return prepared


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Prepared cases as ``(image, label)`` tensors ``(1, I, J, K)`` float32.

    With ``augment`` set, each item is transformed with an RNG seeded from
    ``(seed, epoch, index)``: reproducible, and resumable mid-run. Call
    :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self, cases: Sequence[PreparedCase], augment_settings: AugmentSettings | None = None, seed: int = 0
    ) -> None:
        self.cases = list(cases)
        self.augment_settings = augment_settings
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[index]
        image, label = case.image, case.label
        if self.augment_settings is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, label = augment(image, label, rng, self.augment_settings)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None],
        )
