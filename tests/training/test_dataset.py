"""Loading cases onto the model grid: serial and parallel loading agree; soft labels."""

from __future__ import annotations

import numpy as np
import pytest

from config.loader import load_config
from seg.preprocess import PreprocessSettings
from training.augment import AugmentSettings, augment
from training.cli import main as spect_train
from training.data import preprocess_settings
from training.dataset import prepare_cases
from training.discovery import Case, discover


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], PreprocessSettings]:
    root = tmp_path_factory.mktemp("phantoms")
    args = ["phantom", "--out", str(root), "--cases", "3", "--seed", "9", "--render", "0", "--workers", "2"]
    assert spect_train(args) == 0
    config = load_config(None, values={"paths": {"data_root": str(root)}})
    return discover(root / "NIfTI").masked_cases, preprocess_settings(config)


def test_parallel_loading_matches_serial_loading(phantom_cases: tuple[list[Case], PreprocessSettings]) -> None:
    cases, settings = phantom_cases
    serial = prepare_cases(cases, settings, progress=False, box_margin=3)
    parallel = prepare_cases(cases, settings, progress=False, box_margin=3, workers=2)
    assert [c.base for c in parallel] == [c.base for c in serial] == sorted(c.base for c in cases)
    for a, b in zip(serial, parallel, strict=True):
        assert a.margin == b.margin == 3
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.box_image, b.box_image)
        np.testing.assert_array_equal(a.box_label, b.box_label)


def test_soft_labels_are_partial_volume_fractions_of_the_same_mask(
    phantom_cases: tuple[list[Case], PreprocessSettings],
) -> None:
    cases, settings = phantom_cases
    hard = prepare_cases(cases, settings, progress=False, box_margin=3)
    soft = prepare_cases(cases, settings, progress=False, box_margin=3, soft_labels=True)
    for h, s in zip(hard, soft, strict=True):
        np.testing.assert_array_equal(h.box_image, s.box_image)  # only the labels differ
        for hard_label, soft_label in ((h.label, s.label), (h.box_label, s.box_label)):
            assert hard_label.dtype == np.uint8 and soft_label.dtype == np.float32
            assert soft_label.min() >= 0 and soft_label.max() <= 1
            assert 0 < np.count_nonzero((soft_label > 0) & (soft_label < 1))  # boundary voxels are fractional
            # the same myocardium: equal volume within 10%, and mostly the same voxels at 0.5
            assert abs(soft_label.sum() / hard_label.sum() - 1) < 0.1
            binary = soft_label >= 0.5
            overlap = 2 * np.count_nonzero(binary & (hard_label > 0)) / (binary.sum() + hard_label.sum())
            assert overlap > 0.85
        image, label = s.box_window((1, 2, 3), settings)
        warped_image, warped = augment(image, label, np.random.default_rng(0), AugmentSettings(p=1.0))
        assert warped.dtype == np.float32 and warped.min() >= 0 and warped.max() <= 1
        assert 0 < np.count_nonzero((warped > 0.01) & (warped < 0.99))  # interpolated, not snapped to 0/1
        assert warped_image.shape == warped.shape == label.shape
