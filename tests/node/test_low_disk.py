"""Disk nearly full, seen from DCMTK storescu and from an association already open.

The watermark (``node.min_free_bytes``, held by ``node.storage.min_free_bytes``) is set
above any disk's size, so the real free-space probe finds the disk "nearly full";
lowering it again on the running node is "space is back".
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_client import associate, c_store
from peers import require_tool
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage
from studies import WEIGHTS, node_config, spect_like_volume

from config.schema import PeerSection
from node.audit import read_audit
from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.scp import OUT_OF_RESOURCES
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs

NODE_AE = "SPECTNODE"
NEARLY_FULL = 10**18  # bytes to keep free: more than any disk has


@pytest.fixture
def node(tmp_path: Path, pacs: StandInPacs) -> Iterator[Node]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)]
    running = Node.start(node_config(tmp_path / "node", peers=peers))
    yield running
    running.stop()


def _study(tmp_path: Path, name: str):
    ds = nifti_to_nm(spect_like_volume(), patient_name=f"Disk^{name}", patient_id=name)
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(dataset_to_bytes(ds))
    return ds, path


def _run_storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=60,
    )


def _seg_studies(pacs: StandInPacs) -> list[str]:
    return sorted(str(dcmread(io.BytesIO(data)).StudyInstanceUID) for data in list(pacs.received.values()))


def test_low_disk_refuses_storescu_and_open_associations_then_recovers(
    tmp_path: Path, node: Node, pacs: StandInPacs
) -> None:
    before, _ = _study(tmp_path, "BEFORE")
    refused, refused_path = _study(tmp_path, "REFUSED")
    sender = AE(ae_title="OPENSCU")
    sender.add_requested_context(NuclearMedicineImageStorage)
    opened = sender.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert opened.is_established
    assert opened.send_c_store(before).Status == 0  # accepted while space is plentiful

    node.storage.min_free_bytes = NEARLY_FULL  # the disk is now "nearly full"
    result = _run_storescu(node.port, refused_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Association Rejected" in output and "Rejected Transient" in output, output
    assert "Local Limit Exceeded" in output, output
    # the association opened earlier stays open, but each C-STORE is refused: nothing half-kept
    assert opened.send_c_store(refused).Status == OUT_OF_RESOURCES
    opened.release()
    assert node.storage.index.instance(str(refused.SOPInstanceUID)) is None
    assert not (node.storage.layout.dicom_dir / str(refused.StudyInstanceUID)).exists()

    node.storage.min_free_bytes = 0  # space is back: the sender's retry goes through
    result = _run_storescu(node.port, refused_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pacs.wait_for(2, timeout=120), "both studies should get their SEG"
    assert _seg_studies(pacs) == sorted([str(before.StudyInstanceUID), str(refused.StudyInstanceUID)])
    for ds in (before, refused):  # everything accepted is kept, on disk and in the index
        record = node.storage.index.instance(str(ds.SOPInstanceUID))
        assert record is not None and node.storage.layout.resolve(record.path).is_file()


@pytest.mark.peers
def test_low_disk_rejects_new_associations_transiently(tmp_path: Path, stop_later: list) -> None:
    echoscu = require_tool("echoscu")
    node = Node.start(node_config(tmp_path / "node"), load_model=False)
    stop_later.append(node)
    ds = nifti_to_nm(spect_like_volume(), patient_name="Disk^Low", patient_id="DISK-0001")
    assert c_store(node.port, ds).Status == 0  # accepted before the disk "fills"
    node.storage.min_free_bytes = 10**18  # the watermark above any disk: space is now "low"

    assoc = associate(node.port)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    echo = subprocess.run(
        [echoscu, "-aet", "TESTSCU", "-aec", NODE_AE, "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode != 0
    assert "Local Limit Exceeded" in echo.stdout + echo.stderr

    node.storage.min_free_bytes = 0  # space is back
    assoc = associate(node.port)
    assert assoc.is_established
    assoc.release()
    record = node.storage.index.instance(str(ds.SOPInstanceUID))
    assert record is not None and node.storage.layout.resolve(record.path).is_file()  # nothing accepted was lost
    reasons = [
        e["reason"] for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "association-rejected"
    ]
    assert len(reasons) == 2 and all(r.startswith("low disk space") for r in reasons)
