"""The shipped model on images framed unlike its training data: heart-centred views, fine pixels, negative values.

Held-out phantoms (seed 2) presented as other cameras and reconstructions present them:

* ``crop 160 mm`` / ``crop 120 mm``: a cube of that size around the heart, its centre
  off by up to 20 mm (a CZT camera's heart-centred field of view);
* ``pixel 2.46 mm``: the same case rendered on a 2.46 mm grid (a CZT camera's pixel; the
  training grids were 3.2-7 mm), anatomical generator only;
* ``FBP-like values``: counts x 1000 minus 5% of the maximum (arbitrary units with
  negative values, as filtered back-projection gives).

    python benchmarks/domain_shift.py [--cases 10] [--seed 2] [--weights models/unet3d_weights.pth] [--precision fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seg.metrics import dice
from seg.predictor import Predictor
from training.phantom import PhantomCase, PhantomSettings, generate_case
from training.phantom_basic import generate_basic_case

Framed = tuple[np.ndarray, np.ndarray, np.ndarray]  # volume, mask, affine


def crop(case: PhantomCase, size_mm: float, rng: np.random.Generator) -> Framed:
    """A ``size_mm`` cube around the heart, centred up to 20 mm off it; the affine follows."""
    spacing = np.abs(np.diag(case.affine)[:3])
    centre = np.argwhere(case.mask).mean(axis=0) + rng.uniform(-20.0, 20.0, 3) / spacing
    half = np.ceil(size_mm / 2 / spacing).astype(int)
    low = np.clip(np.round(centre).astype(int) - half, 0, None)
    region = tuple(slice(a, a + 2 * h) for a, h in zip(low, half, strict=True))
    affine = case.affine.copy()
    affine[:3, 3] = case.affine[:3, :3] @ low + case.affine[:3, 3]
    return case.volume[region], case.mask[region], affine


def fbp_like(case: PhantomCase) -> Framed:
    """Counts x 1000 minus 5% of the maximum."""
    volume = case.volume * 1000.0
    return volume - 0.05 * float(volume.max()), case.mask, case.affine


def framings(case: PhantomCase, fine: PhantomCase | None, rng: np.random.Generator) -> dict[str, Framed]:
    """One held-out case as each framing presents it (``fine``: the case rendered at 2.46 mm, if any)."""
    out = {
        "as generated": (case.volume, case.mask, case.affine),
        "crop 160 mm": crop(case, 160.0, rng),
        "crop 120 mm": crop(case, 120.0, rng),
        "FBP-like values": fbp_like(case),
    }
    if fine is not None:
        out["pixel 2.46 mm"] = (fine.volume, fine.mask, fine.affine)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10, help="held-out cases 0..N-1 per family")
    parser.add_argument("--seed", type=int, default=2, help="the held-out population's seed")
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    args = parser.parse_args()

    predictor = Predictor.from_file(args.weights, device="cpu", precision=args.precision)
    rng = np.random.default_rng(args.seed)
    fine_settings = dataclasses.replace(PhantomSettings(), pixel_mm=2.46)
    scores: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for family in ("basic", "anatomical"):
        for index in tqdm(range(args.cases), desc=family, unit="case"):
            if family == "basic":
                case, fine = generate_basic_case(args.seed, index), None
            else:
                case, fine = generate_case(args.seed, index), generate_case(args.seed, index, fine_settings)
            for name, (volume, mask, affine) in framings(case, fine, rng).items():
                predicted = predictor.predict_array(np.asarray(volume, dtype=np.float32), affine).mask
                scores[name, family].append((dice(predicted, mask), float(predicted.sum()) / float(mask.sum())))

    print(f"{args.weights}, held-out seed {args.seed}, {args.cases} cases per family: Dice mean (min), volume ratio")
    print(f"{'framing':<18}{'basic':>28}{'anatomical':>28}")
    for name in ("as generated", "crop 160 mm", "crop 120 mm", "pixel 2.46 mm", "FBP-like values"):
        cells = []
        for family in ("basic", "anatomical"):
            rows = np.array(scores.get((name, family), np.zeros((0, 2))))
            dices, ratios = rows[:, 0], rows[:, 1]
            cells.append(f"{dices.mean():.3f} ({dices.min():.3f}), {ratios.mean():.2f}" if len(rows) else "-")
        print(f"{name:<18}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
