"""How much Dice the unknown wall thickness costs: a wall-blind oracle, and the model's volume bias.

The phantoms' left-ventricular wall (8-12 mm) is thinner than the camera's resolution
(12-16 mm FWHM), so the blurred image says little about how thick the wall is. This
script measures what that costs:

* the *wall-blind oracle*: for each held-out case, the truth mask against the mask of
  the same case regenerated with every parameter equal except the wall, fixed at the
  middle of the range. That is the Dice of a predictor that knows everything about the
  case but its wall thickness;
* with ``--metrics`` (the ``metrics.csv`` of ``spect-train evaluate`` on the same cases,
  which carries the phantom parameters), how the model's predicted/true volume ratio
  follows the wall thickness, with a scatter plot (``--png``).

    python benchmarks/wall_thickness.py [--cases 60] [--seed 2] [--workers 2] \
        [--metrics outputs/eval_basic/metrics.csv outputs/eval_anatomical/metrics.csv] [--png wall.png]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from seg.metrics import dice
from training.phantom import PhantomSettings, generate_case
from training.phantom_basic import BasicSettings, generate_basic_case


def oracle_dice(family: str, seed: int, index: int) -> float:
    """Dice of case ``index`` against itself regenerated with the wall fixed at the range's middle."""
    generate = generate_basic_case if family == "basic" else generate_case
    settings = BasicSettings() if family == "basic" else PhantomSettings()
    middle = float(np.mean(settings.wall_mm))
    blind = dataclasses.replace(settings, wall_mm=(middle, middle))  # same draws, one value changed
    return dice(generate(seed, index, blind).mask, generate(seed, index, settings).mask)  # type: ignore[arg-type]


def print_oracle(families: list[str], seed: int, cases: int, workers: int) -> None:
    """The wall-blind oracle's Dice per family over cases ``0..cases-1`` of population ``seed``."""
    print(f"wall-blind oracle (wall fixed at the range's middle), seed {seed}, {cases} cases per family")
    with ProcessPoolExecutor(workers) as pool:
        for family in families:
            jobs = [pool.submit(oracle_dice, family, seed, i) for i in range(cases)]
            scores = np.array([job.result() for job in tqdm(jobs, desc=family, unit="case", leave=False)])
            print(
                f"  {family:<11} Dice mean {scores.mean():.3f}  median {np.median(scores):.3f}  min {scores.min():.3f}"
            )


def volume_bias(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wall thickness (mm), predicted/true volume and Dice per case of an evaluation ``metrics.csv``."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "wall_mm" not in rows[0]:
        raise SystemExit(f"{path}: no wall_mm column (evaluate phantoms with their demographics.csv)")
    wall = np.array([float(r["wall_mm"]) for r in rows])
    ratio = np.array([float(r["pred_ml"]) / float(r["truth_ml"]) for r in rows])
    dice_pp = np.array([float(r["dice_pp"]) for r in rows])
    return wall, ratio, dice_pp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=60, help="cases per family for the oracle (0: skip it)")
    parser.add_argument("--seed", type=int, default=2, help="the held-out population's seed")
    parser.add_argument("--families", nargs="+", default=["basic", "anatomical"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--metrics", nargs="*", type=Path, default=[], help="metrics.csv files of evaluate")
    parser.add_argument("--png", type=Path, help="scatter plot of volume ratio against wall thickness")
    args = parser.parse_args()

    if args.cases > 0:
        print_oracle(args.families, args.seed, args.cases, args.workers)

    if not args.metrics:
        return
    fig = Figure(figsize=(6.5, 4.5), dpi=100)
    ax = fig.subplots()
    print("model: predicted / true myocardial volume against the wall thickness")
    for path in args.metrics:
        wall, ratio, dice_pp = volume_bias(path)
        r = float(np.corrcoef(wall, ratio)[0, 1])
        print(
            f"  {path.parent.name:<20} volume ratio {ratio.mean():.3f} +- {ratio.std():.3f}, "
            f"r(wall, ratio) = {r:+.2f}, r(wall, Dice) = {float(np.corrcoef(wall, dice_pp)[0, 1]):+.2f}"
        )
        ax.scatter(wall, ratio, s=14, label=f"{path.parent.name} (r = {r:+.2f})")
    ax.axhline(1.0, color="grey", lw=0.8)
    lo, hi = PhantomSettings().wall_mm
    walls = np.linspace(lo, hi, 50)
    middle = (lo + hi) / 2
    ax.plot(walls, middle / walls, "k--", lw=1, label=f"always a {middle:g} mm wall ({middle:g} / wall)")
    ax.set_xlabel("true wall thickness (mm)")
    ax.set_ylabel("predicted / true myocardial volume")
    ax.set_title("Wall thickness below the resolution: the model predicts a typical wall")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if args.png:
        fig.savefig(args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
