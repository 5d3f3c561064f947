"""Evaluation (metrics per case and a summary) and prediction (masks and figures) over a dataset."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from seg.metrics import compute_metrics, summarize
from seg.predictor import Prediction, Predictor
from seg.preprocess import voxel_spacing
from training.dataset import CaseLoadError, load_mask, load_volume
from training.discovery import Case
from training.figures import plot_prediction

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("dice", "iou", "hd95_mm", "msd_mm")


@dataclass
class CaseOutcome:
    """One case's prediction, with its volume and truth (truth ``None`` without a mask)."""

    case: Case
    volume: nib.Nifti1Image
    truth: np.ndarray | None
    prediction: Prediction


@dataclass
class CaseFailure:
    """A case that could not be read or segmented; ``error`` names the file and the problem."""

    case: Case
    error: str


def run_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    progress: bool = True,
    desc: str = "predict",
    failures: list[CaseFailure] | None = None,
) -> Iterator[CaseOutcome]:
    """Predict each case in turn (a generator, so memory stays one case deep).

    With ``failures``, a case that cannot be used (unreadable file, mask unlike its volume,
    NaN voxels, unusable geometry) is logged, appended there and skipped; without, the
    error propagates.
    """
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress):
        try:
            volume = load_volume(case.volume)
            truth = None if case.mask is None else load_mask(case.mask, volume)
            prediction = predictor.predict_array(np.asarray(volume.dataobj, dtype=np.float32), volume.affine)
        except ValueError as exc:  # CaseLoadError included
            if failures is None:
                raise
            error = str(exc) if isinstance(exc, CaseLoadError) else f"{case.volume}: {exc}"  # name the file
            log.error("%s", error)
            failures.append(CaseFailure(case, error))
            continue
        if prediction.geometry:
            log.warning("%s: %s", case.volume, prediction.geometry)
        yield CaseOutcome(case, volume, truth, prediction)


def _metric_row(outcome: CaseOutcome) -> dict[str, object]:
    spacing = voxel_spacing(outcome.volume.affine)
    row: dict[str, object] = {"file_base": outcome.case.base}
    assert outcome.truth is not None
    for tag, mask in (("raw", outcome.prediction.raw_mask), ("pp", outcome.prediction.mask)):
        metrics = compute_metrics(mask.astype(bool), outcome.truth, spacing)
        for name in METRIC_COLUMNS:
            row[f"{name}_{tag}"] = round(float(getattr(metrics, name)), 6)
    row["hd95_vox_pp"] = round(float(row["hd95_mm_pp"]) / float(np.mean(spacing)), 4)  # type: ignore[arg-type]
    row["truth_ml"] = round(float(outcome.truth.sum()) * float(np.prod(spacing)) / 1000.0, 3)
    row["pred_ml"] = round(float(outcome.prediction.mask.sum()) * float(np.prod(spacing)) / 1000.0, 3)
    row["infer_s"] = round(outcome.prediction.timings.get("infer", math.nan), 4)
    row["geometry"] = outcome.prediction.geometry
    return row


ROW_COLUMNS = (
    "file_base",
    *(f"{name}_{tag}" for tag in ("raw", "pp") for name in METRIC_COLUMNS),
    "hd95_vox_pp",
    "truth_ml",
    "pred_ml",
    "infer_s",
    "geometry",
    "error",
)


def evaluate_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    out_dir: Path,
    n_visualize: int = 5,
    extra_columns: dict[str, dict[str, str]] | None = None,
    progress: bool = True,
    failures: list[CaseFailure] | None = None,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Per-case metrics (raw and post-processed) to ``metrics.csv`` and a summary.

    Each row is written as soon as its case is done, so an interrupted run keeps what it
    measured.

    Parameters
    ----------
    cases
        Cases with a mask (cases without one are skipped with a warning).
    extra_columns
        ``base -> {column: value}`` appended to each row (e.g. the phantom parameters).
    failures
        Cases that cannot be used are appended here (and written last, as rows with only
        an ``error``); without it the first such case stops the run.

    Returns
    -------
    tuple
        The CSV path and ``{metric_column: summarize(...)}`` over the cases evaluated.
    """
    masked = [c for c in cases if c.mask is not None]
    if len(masked) < len(cases):
        log.warning("skipping %d case(s) without a mask", len(cases) - len(masked))
    if not masked:
        raise ValueError("no case with a mask to evaluate")
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_columns = extra_columns or {}
    columns = list(dict.fromkeys([*ROW_COLUMNS, *(k for row in extra_columns.values() for k in row)]))
    csv_path = out_dir / "metrics.csv"
    rows: list[dict[str, object]] = []
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for outcome in run_cases(predictor, masked, progress, "evaluate", failures):
            row = _metric_row(outcome)
            row.update(extra_columns.get(outcome.case.base, {}))
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            if len(rows) <= n_visualize:
                _figure(outcome, out_dir / "figures" / f"{outcome.case.base}.png", row)
        writer.writerows({"file_base": f.case.base, "error": f.error} for f in failures or [])
    if not rows:
        raise ValueError(f"no case could be evaluated (errors above and in {csv_path})")
    summary = {
        f"{name}_{tag}": summarize([float(r[f"{name}_{tag}"]) for r in rows])  # type: ignore[arg-type]
        for tag in ("raw", "pp")
        for name in METRIC_COLUMNS
    }
    summary["hd95_vox_pp"] = summarize([float(r["hd95_vox_pp"]) for r in rows])  # type: ignore[arg-type]
    for label, stats in subgroup_summary(rows):
        summary[f"dice_pp | {label}"] = stats
    return csv_path, summary


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


# Subgroups reported when the dataset's demographics.csv has the columns (the phantoms do).
SUBGROUPS: tuple[tuple[str, str, object], ...] = (
    ("hot extracardiac activity next to the heart", "hot_extracardiac_adjacent", _truthy),
    ("severe defect (>= 70% reduction)", "defect_severity", lambda v: _number(v) >= 0.7),
    ("low counts", "low_counts", _truthy),
    ("64x64 matrix", "matrix", lambda v: str(v) == "64"),
    ("128x128 matrix", "matrix", lambda v: str(v) == "128"),
)


def subgroup_summary(rows: Sequence[dict[str, object]], metric: str = "dice_pp") -> list[tuple[str, dict[str, float]]]:
    """``metric`` summarised over each subgroup of :data:`SUBGROUPS` present in the rows."""
    out = []
    for label, column, predicate in SUBGROUPS:
        if rows and column in rows[0]:
            values = [float(r[metric]) for r in rows if predicate(r.get(column))]  # type: ignore[operator, arg-type]
            if values:
                out.append((label, summarize(values)))
    return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per metric, columns mean/median/std/n."""
    width = max(14, *(len(name) + 2 for name in summary))
    lines = [f"{'metric':<{width}}{'mean':>10}{'median':>10}{'std':>10}{'n':>6}"]
    for name, stats in summary.items():
        lines.append(
            f"{name:<{width}}{stats['mean']:>10.4f}{stats['median']:>10.4f}{stats['std']:>10.4f}{int(stats['n']):>6}"
            + (f"  ({int(stats['n_nonfinite'])} non-finite)" if stats.get("n_nonfinite") else "")
        )
    return "\n".join(lines)


def _figure(outcome: CaseOutcome, path: Path, row: dict[str, object] | None = None) -> Path:
    title = outcome.case.base
    if row is not None:
        title += f"  Dice raw {row['dice_raw']:.3f}  post-processed {row['dice_pp']:.3f}"
    return plot_prediction(
        np.asarray(outcome.volume.dataobj, dtype=np.float32),
        outcome.volume.affine,
        outcome.truth,
        outcome.prediction.raw_mask,
        outcome.prediction.mask,
        path,
        title,
    )


def predict_cases(
    predictor: Predictor,
    cases: Sequence[Case],
    masks_out: Path,
    viz_out: Path,
    mask_suffix_out: str = "_pred_pp.nii.gz",
    progress: bool = True,
    failures: list[CaseFailure] | None = None,
) -> Iterator[tuple[Path, Path]]:
    """Write ``<masks_out>/<base><mask_suffix_out>`` (on each input's grid) and ``<viz_out>/<base>.png``.

    Yields the two paths per case; with ``failures``, cases that cannot be used are
    appended there and skipped (see :func:`run_cases`).
    """
    masks_out.mkdir(parents=True, exist_ok=True)
    viz_out.mkdir(parents=True, exist_ok=True)
    for outcome in run_cases(predictor, cases, progress, "predict", failures):
        image = nib.Nifti1Image(outcome.prediction.mask.astype(np.uint8), outcome.volume.affine)
        image.set_qform(outcome.volume.affine, code=1)
        image.set_sform(outcome.volume.affine, code=1)
        mask_path = masks_out / f"{outcome.case.base}{mask_suffix_out}"
        nib.save(image, str(mask_path))
        yield mask_path, _figure(outcome, viz_out / f"{outcome.case.base}.png")
