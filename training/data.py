"""From the configuration to the list of cases: folders, discovery, demographics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from config import AppConfig, ConfigError
from seg.preprocess import PreprocessSettings
from training.discovery import DiscoveryReport, discover, read_patient_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSelection:
    """The folders searched and what was found there."""

    data_root: Path | None
    vols_dir: Path
    masks_dir: Path | None
    report: DiscoveryReport


def preprocess_settings(config: AppConfig) -> PreprocessSettings:
    """The preprocessing a new model is trained with."""
    pre = config.preprocess
    return PreprocessSettings(
        target_shape=pre.target_shape,
        normalization=pre.normalization if pre.normalize else "none",
        percentile_low=pre.percentile_low,
        percentile_high=pre.percentile_high,
        reorient=pre.reorient,
        crop_spacing_mm=pre.crop_spacing_mm,
    )


def select_cases(config: AppConfig) -> DataSelection:
    """Discover the dataset named by ``paths.data_root`` / ``data.vols_dir`` / ``data.masks_dir``.

    Raises
    ------
    ConfigError
        Neither a data root nor a volumes folder is given.
    FileNotFoundError
        A folder does not exist.
    """
    data_root = config.paths.data_root
    vols_dir = config.data.vols_dir or (data_root / "NIfTI" if data_root is not None else None)
    if vols_dir is None:
        raise ConfigError("no dataset: give --data_root DIR (or data.vols_dir)")
    if not vols_dir.is_dir():
        raise FileNotFoundError(f"{vols_dir}: dataset folder not found")
    patient_ids = read_patient_ids(data_root / "demographics.csv") if data_root is not None else {}
    report = discover(
        vols_dir,
        config.data.masks_dir,
        vol_suffix=config.data.vol_suffix,
        mask_suffix=config.data.mask_suffix,
        extensions=config.data.extensions,
        recursive=config.data.recursive,
        allow_mask_as_volume=config.data.allow_mask_as_volume,
        patient_ids=patient_ids,
    )
    for line in report.summary().splitlines():
        log.info("%s: %s", vols_dir, line)
    return DataSelection(data_root, vols_dir, config.data.masks_dir, report)
