"""Where the model's Dice goes: the same held-out phantoms regenerated with one difficulty removed at a time.

Every case of the anatomical generator is drawn from ``default_rng([seed, index])``, so a
case can be regenerated with one setting changed and everything else equal (shape,
position, organs, grid). This script segments ``--cases`` held-out cases in each of these
variants and prints the model's Dice and its predicted/true myocardial volume:

* ``as generated``: the held-out case;
* ``no noise``: the expected counts instead of the Poisson draw;
* ``wall 10 mm``: the wall fixed at the middle of its range (8-12 mm);
* ``wall 10 mm, no noise``;
* ``ideal, wall W mm``: no noise, FWHM 14 mm, no post-filter, no hot neighbour, no defect,
  no apical thinning, the wall fixed at W = 8, 10 and 12 mm.

What the ideal rows show: how well the model places a boundary when nothing but the
anatomy varies, and how it reads walls thinner or thicker than the typical one.

    python benchmarks/dice_budget.py [--cases 30] [--seed 2] [--weights models/unet3d_weights.pth] [--png budget.png]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from seg.metrics import dice
from seg.predictor import Predictor
from training.phantom import PhantomSettings, generate_case


def variants(base: PhantomSettings) -> dict[str, PhantomSettings]:
    """The population ``base`` with difficulties removed, by name (draws unchanged)."""
    replace = dataclasses.replace
    ideal = replace(
        base,
        noise=False,
        fwhm_mm=(14.0, 14.0),
        p_postfilter=0.0,
        p_hot_adjacent=0.0,
        p_defect=0.0,
        p_apical_thinning=0.0,
    )
    return {
        "as generated": base,
        "no noise": replace(base, noise=False),
        "wall 10 mm": replace(base, wall_mm=(10.0, 10.0)),
        "wall 10 mm, no noise": replace(base, wall_mm=(10.0, 10.0), noise=False),
        **{f"ideal, wall {w} mm": replace(ideal, wall_mm=(float(w), float(w))) for w in (8, 10, 12)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=30, help="held-out cases 0..N-1")
    parser.add_argument("--seed", type=int, default=2, help="the held-out population's seed")
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--png", type=Path, help="Dice per case and variant")
    args = parser.parse_args()

    predictor = Predictor.from_file(args.weights, device="cpu", precision=args.precision)
    table = variants(PhantomSettings())
    scores: dict[str, np.ndarray] = {}
    print(f"{args.weights}, anatomical generator, seed {args.seed}, cases 0-{args.cases - 1}")
    print(f"{'variant':<22} {'Dice mean':>9} {'median':>7} {'min':>6}   predicted/true volume")
    for name, settings in table.items():
        dices, ratios = [], []
        for index in tqdm(range(args.cases), desc=name, unit="case", leave=False):
            case = generate_case(args.seed, index, settings)
            mask = predictor.predict_array(case.volume, case.affine).mask
            dices.append(dice(mask, case.mask))
            ratios.append(float(mask.sum()) / float(case.mask.sum()))
        d, r = np.array(dices), np.array(ratios)
        scores[name] = d
        print(f"{name:<22} {d.mean():9.3f} {np.median(d):7.3f} {d.min():6.3f}   {r.mean():.3f} +- {r.std():.3f}")

    if args.png:
        fig = Figure(figsize=(8, 4.5), dpi=100)
        ax = fig.subplots()
        for x, d in enumerate(scores.values()):
            ax.scatter(np.full(d.size, x) + np.linspace(-0.2, 0.2, d.size), d, s=10, alpha=0.6)
            ax.plot([x - 0.3, x + 0.3], [d.mean()] * 2, "k-", lw=2)
        ax.set_xticks(range(len(scores)), list(scores), rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("Dice (black bar: mean)")
        ax.set_title("The same held-out phantoms with one difficulty removed at a time")
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()
