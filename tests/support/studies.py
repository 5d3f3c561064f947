"""Shared helpers of the node tests: the shipped model, free ports, a SPECT-like test volume."""

from __future__ import annotations

import functools
import io
import socket
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian

from config import AppConfig, load_config
from config.schema import PeerSection
from node.nm_writer import nifti_to_nm
from training.phantom_basic import generate_basic_case

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "models" / "unet3d_weights.pth"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.lru_cache(maxsize=1)
def _phantom() -> tuple[np.ndarray, np.ndarray]:
    case = generate_basic_case(7, 1)  # 64x64x56 at ~6.4 mm, LPS voxel order; the shipped model finds its heart
    return case.volume.astype(np.float32), case.affine


def spect_like_volume(kind: str = "axial") -> nib.Nifti1Image:
    """A SPECT-like volume: one phantom of the basic family (its heart is what a model must find).

    ``kind="oblique"`` turns the patient axes 25 degrees about the axial direction (same voxels).
    """
    volume, affine = _phantom()
    affine = affine.copy()
    if kind == "oblique":
        t = np.deg2rad(25.0)
        rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    return nib.Nifti1Image(volume.copy(), affine)


def nm_study_file(folder: Path, patient_name: str, patient_id: str) -> tuple[Dataset, Path]:
    """The SPECT-like volume as one multi-frame NM instance, and that instance written to ``folder/nm.dcm``."""
    ds = nifti_to_nm(spect_like_volume(), patient_name=patient_name, patient_id=patient_id)
    path = folder / "nm.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


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


def part10_bytes(
    body: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str = ExplicitVRLittleEndian
) -> bytes:
    """Preamble, file meta naming the SOP Class/Instance UIDs and transfer syntax, then ``body`` verbatim.

    This is what pynetdicom hands a C-STORE handler, and a file whose data set goes on the wire unparsed.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body
