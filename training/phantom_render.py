"""PNG previews of phantom cases: three orthogonal slices through the heart, mask contour on top."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    return np.asarray(image.dataobj), np.abs(np.diag(image.affine)[:3])


def display_slices(
    volume: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, float, float, float], tuple[str, ...]]]:
    """Transaxial, coronal and sagittal slices through the mask's centre of mass, display-ready.

    ``volume`` (float) and ``mask`` (0/1) are ``(I, J, K)`` on the grid of the RAS+
    ``affine``, in any voxel order. Each slice is reoriented so that every case looks
    the same way round, in radiological convention: transaxial and coronal show the
    patient's right on the image's left, anterior resp. superior up; sagittal shows
    anterior on the left, superior up. Returns ``(name, image, mask, extent_mm, labels)``
    with ``image``/``mask`` 2-D ``(rows, columns)`` for ``imshow(origin="lower")`` and
    ``labels`` = (left, right, bottom, top) patient directions.
    """
    vol, spacing = _canonical(np.asarray(volume, dtype=np.float32), affine)
    msk, _ = _canonical(np.asarray(mask, dtype=np.uint8), affine)
    centre = np.argwhere(msk).mean(axis=0) if msk.any() else (np.array(vol.shape) - 1) / 2
    ci, cj, ck = np.round(centre).astype(int)
    ni, nj, nk = (np.array(vol.shape) * spacing).tolist()
    # canonical i runs toward the patient's right: flip it so the right is on the image's left
    return [
        ("transaxial", vol[::-1, :, ck].T, msk[::-1, :, ck].T, (0, ni, 0, nj), ("R", "L", "P", "A")),
        ("coronal", vol[::-1, cj, :].T, msk[::-1, cj, :].T, (0, ni, 0, nk), ("R", "L", "I", "S")),
        ("sagittal", vol[ci, ::-1, :].T, msk[ci, ::-1, :].T, (0, nj, 0, nk), ("A", "P", "I", "S")),
    ]


def render_case(
    volume: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, title: str | None = None, cmap: str = "hot"
) -> Path:
    """Write a PNG of transaxial, coronal and sagittal slices through the mask's centre of mass.

    ``volume`` float and ``mask`` 0/1 are ``(I, J, K)`` on the grid of the RAS+ ``affine``
    (any voxel order); see :func:`display_slices` for the orientation. The mask contour is
    drawn in cyan. Returns ``path``.
    """
    cuts = display_slices(volume, mask, affine)
    fig = Figure(figsize=(13, 4.6), dpi=90)
    axes = fig.subplots(1, 3)
    finite = np.asarray(volume, dtype=np.float32)
    vmax = float(np.percentile(finite, 99.9)) or float(finite.max()) or 1.0
    for ax, (name, image, contour, extent, labels) in zip(axes, cuts, strict=True):
        ax.imshow(image, cmap=cmap, origin="lower", vmin=0, vmax=vmax, extent=extent, interpolation="nearest")
        if contour.any():
            rows, cols = contour.shape
            xs = np.linspace(extent[0], extent[1], cols, endpoint=False) + (extent[1] - extent[0]) / cols / 2
            ys = np.linspace(extent[2], extent[3], rows, endpoint=False) + (extent[3] - extent[2]) / rows / 2
            ax.contour(xs, ys, contour, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        for text, (px, py) in zip(labels, [(0.02, 0.5), (0.98, 0.5), (0.5, 0.02), (0.5, 0.98)], strict=True):
            ax.text(px, py, text, transform=ax.transAxes, color="white", ha="center", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
