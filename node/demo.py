"""The README's main command: phantom NM studies -> a node -> SEGs at a stand-in PACS.

The one place in ``node`` that imports ``training`` (for the phantom generator).
Everything runs on 127.0.0.1 with embedded defaults: SQLite, local folders, the
shipped model.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from pydicom import dcmread

from config import AppConfig
from config.schema import PeerSection
from node.convert import series_to_nifti
from node.network import PeerAddress
from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.scu import send_files
from node.seg_encode import read_seg_mask
from node.service import Node, node_timeouts
from node.standin_pacs import PACS_AE, StandInPacs
from seg.metrics import compute_metrics
from seg.preprocess import voxel_spacing
from training.figures import plot_prediction
from training.phantom import generate_case

log = logging.getLogger(__name__)

DEMO_SEED = 777


def truth_on_grid(mask: np.ndarray, affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The phantom's mask in the voxel order of the DICOM-derived grid (same voxels, maybe flipped/permuted)."""
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(target_affine)
    )
    moved = orientations.apply_orientation(mask, transform)
    moved_affine = affine @ orientations.inv_ornt_aff(transform, mask.shape)
    if not np.allclose(moved_affine, target_affine, atol=1e-3):
        raise ValueError("the DICOM round trip changed the grid")
    return np.ascontiguousarray(moved)


def _write_studies(out: Path, n: int) -> list[tuple[Path, object]]:
    studies = []
    for index in range(n):
        case = generate_case(DEMO_SEED, index)
        ds = nifti_to_nm(
            nib.Nifti1Image(case.volume, case.affine),
            patient_name=f"Phantom^Demo{index + 1}",
            patient_id=case.patient_id,
            series_description="MPI SPECT phantom RECON TOMO",
            study_description="Synthetic MPI SPECT (spect-node demo)",
        )
        path = out / "studies" / f"{case.base}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dataset_to_bytes(ds))
        studies.append((path, case))
    return studies


def run_demo(config: AppConfig, out: Path, n_studies: int = 2, timeout: float = 300.0) -> int:
    """Run the whole loop and print Dice and where the overlays are; returns the exit status."""
    out = Path(out)
    print(f"1/4 writing {n_studies} phantom NM studies (RECON TOMO, multi-frame) under {out / 'studies'}")
    studies = _write_studies(out, n_studies)
    pacs = StandInPacs(out / "pacs")
    node_config = config.model_copy(deep=True)
    node_config.storage.root = out / "node-storage"
    node_config.node.port = 0
    node_config.peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=True)]
    print(f"2/4 starting the node (model {config.model.weights}) and a stand-in PACS {PACS_AE}@127.0.0.1:{pacs.port}")
    node = Node.start(node_config)
    try:
        print(f"3/4 sending the studies to {node_config.node.ae_title}@127.0.0.1:{node.port}")
        start = time.perf_counter()
        peer = PeerAddress(node_config.node.ae_title, "127.0.0.1", node.port)
        outcome = send_files([p for p, _ in studies], peer, "DEMOSCU", node_timeouts(node_config))
        if not outcome.all_succeeded:
            print(f"sending failed: {outcome.error or outcome.statuses}")
            return 1
        if not pacs.wait_for(n_studies, timeout):
            print(
                f"only {len(pacs.received)} of {n_studies} SEG(s) arrived in {timeout:.0f} s; see `spect-node status`"
            )
            return 1
        elapsed = time.perf_counter() - start
    finally:
        node.stop()
        pacs.stop()
    print(f"4/4 {n_studies} SEG(s) received by the PACS {elapsed:.1f} s after sending; checking them against the truth")
    by_series = {}
    for data in pacs.received.values():
        seg = dcmread(io.BytesIO(data))
        by_series[str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)] = data
    for path, case in studies:
        source = dcmread(path)
        converted = series_to_nifti([source])
        seg_mask = read_seg_mask(by_series[str(source.SeriesInstanceUID)], converted.references).astype(np.uint8)
        truth = truth_on_grid(case.mask, case.affine, converted.image.affine)
        spacing = voxel_spacing(converted.image.affine)
        metrics = compute_metrics(seg_mask.astype(bool), truth.astype(bool), spacing)
        png = plot_prediction(
            np.asarray(converted.image.dataobj, dtype=np.float32),
            converted.image.affine,
            truth,
            seg_mask,
            seg_mask,
            out / "overlays" / f"{case.base}.png",
            f"{case.base}: DICOM SEG vs phantom truth, Dice {metrics.dice:.3f}",
        )
        print(
            f"  {case.base}: Dice {metrics.dice:.3f}, HD95 {metrics.hd95_mm:.1f} mm, "
            f"myocardium {seg_mask.sum() * np.prod(spacing) / 1000:.0f} mL -> {png}"
        )
    print(f"SEG files: {out / 'pacs'}   node storage: {node_config.storage.root}")
    return 0
