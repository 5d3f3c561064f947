"""Choosing the probability threshold on validation cases, on their own grids (Dice-optimal)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from seg.metrics import dice
from seg.predictor import Predictor
from training.discovery import Case
from training.evaluate import run_cases

log = logging.getLogger(__name__)

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.71, 0.05))


def calibrate_threshold(
    predictor: Predictor, cases: Sequence[Case], thresholds: Sequence[float] = THRESHOLDS, progress: bool = True
) -> tuple[float, dict[float, float]]:
    """Mean Dice of the post-processed mask per threshold; the network runs once per case.

    Returns
    -------
    tuple
        The best threshold and ``{threshold: mean Dice}``.
    """
    scores: dict[float, list[float]] = {float(t): [] for t in thresholds}
    for outcome in run_cases(predictor, [c for c in cases if c.mask is not None], progress, "calibrate"):
        assert outcome.truth is not None
        prediction = outcome.prediction
        for t in scores:
            mask, _ = predictor.masks(
                prediction.probability, prediction.grid, prediction.orientation, outcome.truth.shape, t
            )
            scores[t].append(dice(mask.astype(bool), outcome.truth))
    table = {t: float(np.mean(v)) for t, v in scores.items() if v}
    if not table:
        raise ValueError("no case with a mask to calibrate on")
    best = max(table, key=lambda t: (table[t], -abs(t - 0.5)))
    log.info("threshold calibration: %s -> %.2f", ", ".join(f"{t:.2f}:{d:.4f}" for t, d in table.items()), best)
    return best, table
