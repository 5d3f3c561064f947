"""Loading cases onto the model grid: serial and parallel loading agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from config.loader import load_config
from training.cli import main as spect_train
from training.data import preprocess_settings
from training.dataset import prepare_cases
from training.discovery import discover


def test_parallel_loading_matches_serial_loading(tmp_path: Path) -> None:
    assert (
        spect_train(
            ["phantom", "--out", str(tmp_path), "--cases", "3", "--seed", "9", "--render", "0", "--workers", "2"]
        )
        == 0
    )
    config = load_config(None, values={"paths": {"data_root": str(tmp_path)}})
    cases = discover(tmp_path / "NIfTI").masked_cases
    settings = preprocess_settings(config)
    serial = prepare_cases(cases, settings, progress=False, box_margin=3)
    parallel = prepare_cases(cases, settings, progress=False, box_margin=3, workers=2)
    assert [c.base for c in parallel] == [c.base for c in serial] == sorted(c.base for c in cases)
    for a, b in zip(serial, parallel, strict=True):
        assert a.margin == b.margin == 3
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.box_image, b.box_image)
        np.testing.assert_array_equal(a.box_label, b.box_label)
