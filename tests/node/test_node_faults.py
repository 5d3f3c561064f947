"""SIGKILL during receive and during sending: the node as a process, real sockets, restarts.

(Killed during conversion, inference and encoding: ``test_node_process.py``.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from node_process import NodeProcess, assert_one_seg_delivered, echo, wait_until
from pydicom import Dataset
from pynetdicom import evt
from studies import spect_like_volume

from node.nm_writer import dataset_to_bytes, nifti_to_nm, nifti_to_nm_series
from node.standin_pacs import StandInPacs
from storage import Index
from storage.records import DeliveryState

# A C-STORE SCU in its own process: prints each acknowledged SOP Instance UID; with
# --die-after-pdus N it exits abruptly after sending N P-DATA PDUs (mid-message).
SCU = textwrap.dedent(
    """
    import os, sys
    from pydicom import dcmread
    from pynetdicom import AE, evt
    from pynetdicom.pdu import P_DATA_TF
    port, die_after, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    sent = [0]
    def on_pdu(event):
        if isinstance(event.pdu, P_DATA_TF):
            sent[0] += 1
            if die_after and sent[0] >= die_after:
                os._exit(3)
    ae = AE(ae_title="FAULTSCU")
    datasets = [dcmread(f) for f in files]
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPECTNODE", evt_handlers=[(evt.EVT_PDU_SENT, on_pdu)])
    assert assoc.is_established
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if status and status.Status == 0:
            print(ds.SOPInstanceUID, flush=True)
    assoc.release()
    """
)


def _scu(port: int, files: list[Path], die_after_pdus: int = 0) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", SCU, str(port), str(die_after_pdus), *map(str, files)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(tmp: Path, datasets: list[Dataset]) -> list[Path]:
    paths = []
    for n, ds in enumerate(datasets):
        path = tmp / f"{n:03d}.dcm"
        path.write_bytes(dataset_to_bytes(ds))
        paths.append(path)
    return paths


def _assert_one_seg_delivered(index: Index, source: Dataset, delivery_attempts: int) -> None:
    """Once its delivery is recorded: one job, one result and one delivery, done after ``delivery_attempts``."""
    wait_until(
        lambda: bool(index.deliveries()) and all(d.state == DeliveryState.DONE for d in index.deliveries()),
        60,
        "the delivery to be recorded",
    )
    assert assert_one_seg_delivered(index, source).attempts == delivery_attempts


class HeldPacs(StandInPacs):
    """A stand-in PACS that keeps each C-STORE (stores it) but answers only once ``release`` is set."""

    def __init__(self, folder: Path) -> None:
        self.release = threading.Event()
        self.attempts: list[str] = []
        super().__init__(folder)

    def _on_store(self, event: evt.Event) -> int:
        self.attempts.append(str(event.request.AffectedSOPInstanceUID))
        status = super()._on_store(event)
        self.release.wait(60)
        return status


@pytest.mark.slow
def test_kill9_during_receive_keeps_every_acknowledged_instance(tmp_path: Path, pacs: StandInPacs) -> None:
    node = NodeProcess(tmp_path, pacs.port, series_idle_timeout=30).start()
    slices = nifti_to_nm_series(spect_like_volume(), patient_name="Fault^Receive", patient_id="FREC")
    (tmp_path / "series").mkdir()
    files = _files(tmp_path / "series", slices)
    sender = _scu(node.port, files)
    acknowledged: list[str] = []
    assert sender.stdout is not None
    while len(acknowledged) < 12:
        line = sender.stdout.readline()
        assert line, sender.stderr.read() if sender.stderr else "SCU ended early"
        acknowledged.append(line.strip())
    node.kill(signal.SIGKILL)  # mid-series: the SCU is still sending
    sender.wait(timeout=60)
    restarted = NodeProcess(tmp_path, pacs.port, port=node.port, series_idle_timeout=30).start()
    try:
        with restarted.index() as index:
            for uid in acknowledged:
                record = index.instance(uid)
                assert record is not None, f"acknowledged instance {uid} lost"
                assert (restarted.root / record.path).is_file()
        # the sender re-sends the whole series: the node completes it and sends one SEG
        again = _scu(restarted.port, files)
        assert again.wait(timeout=120) == 0, again.stderr.read() if again.stderr else ""
        wait_until(lambda: len(pacs.received) == 1, 120, "the SEG of the re-sent series")
        with restarted.index() as index:
            _assert_one_seg_delivered(index, slices[0], delivery_attempts=1)
        assert len(pacs.received) == 1
    finally:
        restarted.kill(signal.SIGTERM)


def test_association_aborted_mid_transfer_leaves_nothing_half_stored(tmp_path: Path, pacs: StandInPacs) -> None:
    node = NodeProcess(tmp_path, pacs.port, maximum_pdu_size=16384).start()
    try:
        ds = nifti_to_nm(spect_like_volume(), patient_name="Fault^Abort", patient_id="FABORT")  # ~460 kB
        (tmp_path / "one").mkdir()
        dying = _scu(node.port, _files(tmp_path / "one", [ds]), die_after_pdus=8)
        assert dying.wait(timeout=60) == 3  # it died with the instance half sent
        time.sleep(1.0)
        assert echo(node.port)  # the node is up
        with node.index() as index:
            assert index.instance(str(ds.SOPInstanceUID)) is None
            assert not index.jobs_for_series(str(ds.SeriesInstanceUID))
        stored = [p for p in (node.root / "dicom").rglob("*") if p.is_file()] if (node.root / "dicom").exists() else []
        assert stored == []  # no file, no temporary file
    finally:
        node.kill(signal.SIGTERM)


@pytest.mark.slow
def test_kill9_during_sending_then_restart_gives_one_seg_object(tmp_path: Path) -> None:
    pacs = HeldPacs(tmp_path / "pacs")
    try:
        node = NodeProcess(tmp_path, pacs.port).start()
        ds = nifti_to_nm(spect_like_volume(), patient_name="Fault^Send", patient_id="FSEND")
        (tmp_path / "one").mkdir()
        assert _scu(node.port, _files(tmp_path / "one", [ds])).wait(timeout=60) == 0
        wait_until(lambda: len(pacs.attempts) == 1, 120, "the SEG to be on its way")
        node.kill(signal.SIGKILL)  # the PACS has the SEG, the node never heard back
        pacs.release.set()
        restarted = NodeProcess(tmp_path, pacs.port, port=node.port).start()
        try:
            wait_until(lambda: len(pacs.attempts) >= 2, 120, "the delivery to be retried after restart")
            with restarted.index() as index:
                # sent before the kill, sent again after it: one SEG, recorded delivered once
                _assert_one_seg_delivered(index, ds, delivery_attempts=1)
            assert len(set(pacs.attempts)) == 1 and len(pacs.received) == 1  # one SOP Instance UID, one object
        finally:
            restarted.kill(signal.SIGTERM)
    finally:
        pacs.release.set()
        pacs.stop()
