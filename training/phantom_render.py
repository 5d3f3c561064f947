"""PNG previews of phantom cases: three orthogonal slices through the heart, mask contour on top."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def render_case(volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, title: str | None = None) -> Path:
    """Write a PNG of transaxial, coronal and sagittal slices through the mask's centre.

    ``volume`` float and ``mask`` 0/1 are ``(I, J, K)`` on the grid of ``affine``; the
    display is reoriented to RAS so every case looks the same way round (patient's left
    on the image's right, as radiologists view transaxial slices).
    """
    vol = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.float32), affine)).dataobj)
    msk = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), affine)).dataobj)
    ci, cj, ck = (np.argwhere(msk).mean(axis=0) if msk.any() else np.array(vol.shape) / 2).round().astype(int)
    cuts = [
        ("transaxial", vol[:, :, ck].T, msk[:, :, ck].T),
        ("coronal", vol[:, cj, :].T, msk[:, cj, :].T),
        ("sagittal", vol[ci, :, :].T, msk[ci, :, :].T),
    ]
    fig = Figure(figsize=(12, 4.4), dpi=90)
    axes = fig.subplots(1, 3)
    vmax = float(np.percentile(vol, 99.95)) or 1.0
    for ax, (name, image, contour) in zip(axes, cuts, strict=True):
        ax.imshow(image, cmap="hot", origin="lower", vmin=0, vmax=vmax)
        if contour.any():
            ax.contour(contour, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
