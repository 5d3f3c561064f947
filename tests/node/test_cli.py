"""``spect-node`` commands against a node's storage, and the association policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from studies import node_config, spect_like_volume

from config.schema import PeerSection
from node.cli import main as spect_node
from node.network import PeerAddress
from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.scu import send_datasets
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs


@pytest.fixture
def node(tmp_path: Path, pacs: StandInPacs) -> Iterator[Node]:
    peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)]
    running = Node.start(
        node_config(tmp_path / "node", "node.allowed_calling_ae_titles=[TESTSCU, STORESCU]", peers=peers)
    )
    yield running
    running.stop()


def _wait_delivered(node: Node, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.state == "done" for d in node.storage.index.deliveries()):
            return
        time.sleep(0.05)
    raise AssertionError(f"deliveries not done: {node.storage.index.deliveries()}")


def _root(node: Node) -> list[str]:
    return ["--set", f"storage.root={node.config.storage.root}"]


def test_status_results_resend_reprocess_send(
    node: Node, pacs: StandInPacs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = nifti_to_nm(spect_like_volume(), patient_name="Test^Cli", patient_id="CLI1")
    assert send_datasets([study], PeerAddress("SPECTNODE", "127.0.0.1", node.port), "TESTSCU").all_succeeded
    assert pacs.wait_for(1, 120)
    _wait_delivered(node)  # the PACS has the SEG; the node records the acknowledgement right after
    series = str(study.SeriesInstanceUID)

    assert spect_node(["status", *_root(node)]) == 0
    out = capsys.readouterr().out
    assert series in out and "done" in out

    assert spect_node(["results", "--study", str(study.StudyInstanceUID), *_root(node)]) == 0
    out = capsys.readouterr().out
    assert "myocardium" in out and f"{PACS_AE}:done" in out and series in out

    (job,) = node.storage.index.jobs_for_series(series)
    assert spect_node(["resend", "--job", str(job.id), *_root(node)]) == 0
    assert "1 delivery queued again" in capsys.readouterr().out
    node.sender.wake.set()
    _wait_delivered(node)
    assert len(pacs.received) == 1  # the same SOP Instance UID again: the PACS keeps one object

    assert spect_node(["reprocess", series, *_root(node)]) == 0
    assert "queued" in capsys.readouterr().out
    node.worker.wake.set()
    assert pacs.wait_for(2, 120)  # a reprocessed series is a new SEG
    assert spect_node(["reprocess", "1.2.3.4.5", *_root(node)]) == 2
    assert "not stored" in capsys.readouterr().err

    path = tmp_path / "again.dcm"
    path.write_bytes(dataset_to_bytes(study))
    assert spect_node(["send", str(path), "--to", f"SPECTNODE@127.0.0.1:{node.port}", "--aet", "TESTSCU"]) == 0
    assert "sent 1/1" in capsys.readouterr().out
    assert spect_node(["send", str(path), "--to", f"SPECTNODE@127.0.0.1:{node.port}", "--aet", "INTRUDER"]) == 1
    assert "association" in capsys.readouterr().out
    assert spect_node(["send", str(path), "--to", "nonsense"]) == 2


def test_calling_ae_outside_the_allow_list_is_rejected(node: Node) -> None:
    def echo(calling: str) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SPECTNODE")
        established = assoc.is_established
        if established:
            assoc.release()
        return established

    assert echo("TESTSCU")
    assert not echo("INTRUDER")


def test_wrong_called_ae_title_is_rejected(node: Node) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONEELSE")
    assert not assoc.is_established
