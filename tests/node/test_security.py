"""Admission at association time: the low-disk gate, seen from pynetdicom and DCMTK ``echoscu``.

DICOM TLS, per-peer rules and the audit log have their own files: ``test_tls.py``,
``test_peer_rules.py`` and ``test_audit.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_client import NODE_AE, associate, c_store, require_tool
from studies import node_config, spect_like_volume

from node.audit import read_audit
from node.nm_writer import nifti_to_nm
from node.service import Node


@pytest.fixture
def stop_later() -> Iterator[list]:
    started: list = []
    yield started
    for item in reversed(started):
        item.stop()


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
