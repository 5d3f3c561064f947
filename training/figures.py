"""Figures people look at: training curves and the 4-panel prediction figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training loss and validation Dice per epoch, side by side, as a PNG."""
    epochs = [int(h["epoch"]) for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_loss.grid(alpha=0.3)
    val = [(e, h["val_dice"]) for e, h in zip(epochs, history, strict=True) if h.get("val_dice") is not None]
    if val:
        ax_dice.plot([e for e, _ in val], [d for _, d in val], marker="o", ms=3, color="tab:green")
        best_epoch, best = max(val, key=lambda ed: ed[1])
        ax_dice.axhline(best, color="gray", ls=":", lw=1)
        ax_dice.set_title(f"Validation Dice (best {best:.3f} at epoch {best_epoch})")
    else:
        ax_dice.set_title("Validation Dice (no validation set)")
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    ax_dice.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def heart_centre(mask: np.ndarray | None, fallback: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the heart's centre: the mask's centre of mass, else the brightest region's."""
    source = mask if mask is not None and mask.any() else None
    if source is None:
        smooth = fallback.astype(np.float32)
        threshold = np.percentile(smooth, 99.5)
        source = smooth >= threshold
    idx = np.argwhere(source)
    centre = idx.mean(axis=0) if len(idx) else np.array(fallback.shape) / 2
    return tuple(int(round(c)) for c in centre)  # type: ignore[return-value]


def plot_prediction(
    volume: np.ndarray,
    affine: np.ndarray,
    truth: np.ndarray | None,
    raw: np.ndarray,
    post: np.ndarray,
    path: Path,
    title: str = "",
) -> Path:
    """The seed's 4-panel figure (volume, ground truth or "no mask", raw, post-processed).

    Each panel shows the three orthogonal mid-slices through the heart (the
    prediction's or the truth's centre of mass), displayed in RAS orientation.
    All arrays are ``(I, J, K)`` on the same grid with ``affine``.
    """
    vol = _canonical(volume.astype(np.float32), affine)
    layers = {
        "ground truth": None if truth is None else _canonical(truth.astype(np.uint8), affine),
        "raw prediction": _canonical(raw.astype(np.uint8), affine),
        "post-processed": _canonical(post.astype(np.uint8), affine),
    }
    centre_source = layers["post-processed"] if layers["post-processed"].any() else layers["ground truth"]
    ci, cj, ck = heart_centre(centre_source, vol)
    cuts = [
        ("transaxial", lambda a: a[:, :, ck].T),
        ("coronal", lambda a: a[:, cj, :].T),
        ("sagittal", lambda a: a[ci, :, :].T),
    ]
    vmax = float(np.percentile(vol, 99.9)) or 1.0
    fig = Figure(figsize=(12, 9), dpi=90)
    axes = fig.subplots(3, 4)
    columns = [("volume", None), *layers.items()]
    for row, (cut_name, cut) in enumerate(cuts):
        background = cut(vol)
        for col, (name, layer) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(background, cmap="gray", origin="lower", vmin=0, vmax=vmax)
            if col > 0 and layer is None:
                ax.text(0.5, 0.5, "no mask", color="yellow", ha="center", va="center", transform=ax.transAxes)
            elif layer is not None:
                ax.imshow(
                    np.ma.masked_equal(cut(layer), 0),
                    cmap="autumn",
                    alpha=0.6,
                    origin="lower",
                    vmin=0,
                    vmax=1,
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(cut_name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
