"""Dice when a NIfTI header lies about voxel order or voxel size, with and without the predictor's checks.

Another tool's phantoms or conversions may store the array in another axis order, mirror
it, or carry an identity affine (1 mm voxels). The network reads the heart in RAS order
at its true size, so each lie is a different image to it. For held-out phantoms (generated
here, the model never saw them) this prints mean / min Dice of the shipped model for four
headers:

* ``right``: the generator's own header;
* ``reordered``: the array turned by a random axis permutation and reversal (one per case,
  the identity excluded) and saved with a positive diagonal affine, which claims RAS;
* ``1 mm``: the array in RAS order with an identity affine;
* ``both``: reordered, and an identity affine;

each read three ways: the header trusted, the voxel size checked (``test.check_spacing``),
and the voxel size checked plus the orientation search (``test.orientation_search``, the
offline default).

    python benchmarks/header_robustness.py [--weights FILE] [--cases 10] [--seed 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from seg.metrics import dice
from seg.pose import canonical_poses
from seg.predictor import Predictor
from seg.preprocess import Orientation, voxel_spacing
from training.phantom import generate_case
from training.phantom_basic import generate_basic_case

HEADERS = ("right", "reordered", "1 mm", "both")
READERS = ("header trusted", "spacing checked", "spacing + orientation search")


def lying_headers(
    volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``header -> (volume, mask, affine)``: the case as each header of :data:`HEADERS` presents it."""
    to_ras = Orientation.to_canonical(affine)
    ras_volume, ras_mask = to_ras.apply(volume), to_ras.apply(mask)
    pose = Orientation(canonical_poses()[int(rng.integers(1, 48))])
    turned_volume, turned_mask = pose.apply(ras_volume), pose.apply(ras_mask)
    turned_spacing = pose.apply_spacing(to_ras.apply_spacing(voxel_spacing(affine)))
    return {
        "right": (volume, mask, affine),
        "reordered": (turned_volume, turned_mask, np.diag([*turned_spacing, 1.0])),
        "1 mm": (ras_volume, ras_mask, np.eye(4)),
        "both": (turned_volume, turned_mask, np.eye(4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    parser.add_argument("--cases", type=int, default=10, help="cases per family")
    parser.add_argument("--seed", type=int, default=2, help="phantom population (2: the card's held-out sets)")
    parser.add_argument("--families", nargs="+", default=["basic", "anatomical"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    args = parser.parse_args()

    load = functools.partial(Predictor.from_file, args.weights, device="cpu", precision=args.precision)
    readers = {
        READERS[0]: load(check_spacing=False),
        READERS[1]: load(),
        READERS[2]: load(orientation_search=True),
    }
    rng = np.random.default_rng(args.seed)
    for family in args.families:
        generate = generate_basic_case if family == "basic" else generate_case
        scores = {(h, r): [] for h in HEADERS for r in readers}
        for index in tqdm(range(args.cases), desc=family, unit="case"):
            case = generate(args.seed, index)
            for header, (volume, mask, affine) in lying_headers(case.volume, case.mask, case.affine, rng).items():
                for name, predictor in readers.items():
                    prediction = predictor.predict_array(np.ascontiguousarray(volume), affine)
                    scores[header, name].append(dice(prediction.mask, mask))
        print(f"\n{family} family, seed {args.seed}, {args.cases} cases: Dice mean (min)")
        print(f"  {'header':<10}" + "".join(f"{r:>32}" for r in readers))
        for header in HEADERS:
            cells = "".join(f"{np.mean(scores[header, r]):>25.3f} ({np.min(scores[header, r]):.3f})" for r in readers)
            print(f"  {header:<10}{cells}")


if __name__ == "__main__":
    main()
