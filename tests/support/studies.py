"""Shared helpers of the node tests: the shipped model, free ports, a SPECT-like test volume."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from config import AppConfig, load_config
from config.schema import PeerSection

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "models" / "unet3d_weights.pth"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spect_like_volume(kind: str = "axial") -> nib.Nifti1Image:
    """A small SPECT-like volume: a hot ellipsoidal cup (the myocardium) in a warm body."""
    shape = (64, 64, 56)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    r = np.sqrt(((i - 36) / 9) ** 2 + ((j - 28) / 8) ** 2 + ((k - 30) / 10) ** 2)
    cup = (r > 0.62) & (r < 1.0) & (k > 24)
    body = ((i - 32) / 28) ** 2 + ((j - 32) / 22) ** 2 < 1
    rng = np.random.default_rng(0)
    volume = rng.poisson(np.where(cup, 120.0, np.where(body, 12.0, 0.0))).astype(np.float32)
    volume = ndimage.gaussian_filter(volume, 1.0)
    affine = np.diag([-6.4, -6.4, 6.4, 1.0])
    affine[:3, 3] = [200.0, 180.0, -170.0]
    if kind == "oblique":
        t = np.deg2rad(25.0)
        rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    return nib.Nifti1Image(volume, affine)


def node_config(root: Path, *overrides: str, peers: Sequence[PeerSection] = ()) -> AppConfig:
    """A node configuration for tests: storage under ``root``, a free port, the shipped model on the CPU."""
    config = load_config(
        overrides=[
            f"storage.root={root}",
            "node.port=0",
            f"model.weights={WEIGHTS}",
            "model.device=cpu",
            "node.min_free_bytes=0",
            *overrides,
        ]
    )
    config.peers = list(peers)
    return config
