"""Reproducible train/validation/test splits, by patient where known."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.discovery import Case

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Case bases per subset, and the seed that made them."""

    train: list[str]
    val: list[str]
    test: list[str]
    seed: int

    def subset(self, name: str) -> list[str]:
        """The bases of ``train``, ``val`` or ``test``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return list(getattr(self, name))

    def save(self, path: Path) -> Path:
        """Write as JSON (sorted lists, so the file is diff-friendly)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Split:
        """Read a split written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(train=data["train"], val=data["val"], test=data["test"], seed=int(data["seed"]))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a split file: {exc}") from exc


def make_split(cases: Sequence[Case], val_size: float, test_size: float, seed: int) -> Split:
    """Split cases by patient (a patient's cases never straddle two subsets).

    Cases without a patient id form their own group. The result depends only on the
    set of (base, patient) pairs and the seed, not on the order given. At least one group
    is left for training: with few groups the test set shrinks first, then validation.
    """
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(case.patient_id or f"case:{case.base}", []).append(case.base)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    n = len(keys)
    n_test = math.floor(test_size * n + 0.5) if test_size > 0 else 0
    n_val = math.floor(val_size * n + 0.5) if val_size > 0 else 0
    if val_size > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_test + n_val >= n and n_test + n_val > 0:  # keep one group to train on: test gives way first
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    shuffled = [keys[i] for i in order]

    def bases(selected: list[str]) -> list[str]:
        return sorted(b for key in selected for b in groups[key])

    return Split(
        test=bases(shuffled[:n_test]),
        val=bases(shuffled[n_test : n_test + n_val]),
        train=bases(shuffled[n_test + n_val :]),
        seed=seed,
    )
