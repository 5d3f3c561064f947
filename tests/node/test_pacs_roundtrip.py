"""The loop with a real PACS: Orthanc -> the node -> SEG back in Orthanc, then queried and retrieved.

Orthanc runs as a subprocess with its own storage (``tests/support/orthanc.py``), the
node in-process. Two phantom NM studies are uploaded to Orthanc over REST; Orthanc
sends one to the node through REST ``/modalities/<node>/store`` and the other on a
DCMTK ``movescu`` C-MOVE request. The node's ``peers`` entry for Orthanc brings each
SEG back. DCMTK ``findscu`` finds the SEGs on Orthanc and on the node; ``movescu`` and
``getscu`` retrieve them from the node, and the retrieved datasets equal Orthanc's copies.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from orthanc import ORTHANC_AE, Modality, OrthancServer, require_orthanc
from peers import require_tool
from pydicom import Dataset, dcmread
from studies import WEIGHTS, free_port, node_config, spect_like_volume

from config.schema import PeerSection
from node.nm_writer import dataset_to_bytes, nifti_to_nm
from node.service import Node
from storage import JobState

pytestmark = [pytest.mark.slow, pytest.mark.peers]

NODE_AE = "SPECTNODE"
QR_AE = "QRSCU"  # the DCMTK tools' AE title: registered in Orthanc and in the node's peers
NODE_MODALITY = "spectnode"  # the node's symbolic name in Orthanc's DicomModalities
SEG_TIMEOUT = 120.0


@dataclass(frozen=True)
class RoundTrip:
    """One NM study that went Orthanc -> node -> Orthanc."""

    source: Dataset
    seg_series_ids: list[str]  # Orthanc IDs of the SEG series found in the study

    @property
    def study_uid(self) -> str:
        return str(self.source.StudyInstanceUID)


@dataclass(frozen=True)
class Loop:
    node: Node
    orthanc: OrthancServer
    qr_port: int
    by_rest: RoundTrip
    by_move: RoundTrip
    store_answer: dict
    movescu_output: str

    def orthanc_seg(self, trip: RoundTrip) -> Dataset:
        """The SEG of ``trip`` as Orthanc stores it (GET /instances/<id>/file)."""
        assert len(trip.seg_series_ids) == 1, f"expected one SEG series in Orthanc, got {trip.seg_series_ids}"
        (instance,) = self.orthanc.series_instances(trip.seg_series_ids[0])
        return dcmread(io.BytesIO(self.orthanc.instance_file(instance)))


def _run(tool: str, called_ae: str, port: int, *args: str, cwd: Path) -> str:
    """Run a DCMTK tool as ``QRSCU`` against ``called_ae`` on 127.0.0.1 (Nagle off); return its verbose output."""
    command = [require_tool(tool), "-v", "-aet", QR_AE, "-aec", called_ae, *args, "127.0.0.1", str(port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False)
    return done.stdout + done.stderr


def _keys(*keys: str) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def _seg_series(orthanc: OrthancServer, study_uid: str, timeout: float) -> list[str]:
    return orthanc.wait_for_find("Series", {"Modality": "SEG", "StudyInstanceUID": study_uid}, timeout=timeout)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    executable = require_orthanc()
    require_tool("movescu")
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    root = tmp_path_factory.mktemp("pacs")
    orthanc = OrthancServer(root / "orthanc")  # ports chosen now: the node's peers entry needs the DICOM port
    qr_port = free_port()
    config = node_config(root / "node", f"node.ae_title={NODE_AE}")
    config.peers = [
        PeerSection(ae_title=ORTHANC_AE, host="127.0.0.1", port=orthanc.dicom_port, send_results=True),
        PeerSection(ae_title=QR_AE, host="127.0.0.1", port=qr_port, send_results=False),
    ]
    node = Node.start(config)
    try:
        orthanc.modalities[NODE_MODALITY] = Modality(NODE_AE, "127.0.0.1", node.port)
        orthanc.modalities["qrscu"] = Modality(QR_AE, "127.0.0.1", qr_port)
        orthanc.start(executable=executable)
        rest_source = nifti_to_nm(spect_like_volume(), patient_name="Pacs^Rest", patient_id="PACS1")
        move_source = nifti_to_nm(spect_like_volume("oblique"), patient_name="Pacs^Move", patient_id="PACS2")
        rest_upload = orthanc.upload(dataset_to_bytes(rest_source))
        orthanc.upload(dataset_to_bytes(move_source))
        store_answer = orthanc.store_to_modality(NODE_MODALITY, [rest_upload["ParentStudy"]])
        movescu_output = _run(
            "movescu",
            ORTHANC_AE,
            orthanc.dicom_port,
            "-S",
            "-aem",
            NODE_AE,
            *_keys("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={move_source.StudyInstanceUID}"),
            cwd=root,
        )
        by_rest = RoundTrip(rest_source, _seg_series(orthanc, str(rest_source.StudyInstanceUID), SEG_TIMEOUT))
        by_move = RoundTrip(move_source, _seg_series(orthanc, str(move_source.StudyInstanceUID), SEG_TIMEOUT))
        yield Loop(node, orthanc, qr_port, by_rest, by_move, store_answer, movescu_output)
    finally:
        orthanc.stop()
        node.stop()


def _check_seg_of(loop: Loop, trip: RoundTrip) -> Dataset:
    seg = loop.orthanc_seg(trip)
    source = trip.source
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    (job,) = loop.node.storage.index.jobs_for_series(str(source.SeriesInstanceUID))
    assert job.state == JobState.DONE
    (result,) = loop.node.storage.index.results(trip.study_uid)
    kept = dcmread(loop.node.storage.layout.resolve(result.path))
    assert kept == seg and kept.PixelData == seg.PixelData  # what the node kept is what Orthanc holds
    return seg


def test_rest_store_to_the_node_brings_the_seg_back(loop: Loop) -> None:
    answer = loop.store_answer
    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (1, 0), answer
    assert answer["RemoteAet"] == NODE_AE
    assert loop.by_rest.seg_series_ids, f"no SEG in Orthanc within {SEG_TIMEOUT} s"
    _check_seg_of(loop, loop.by_rest)
    received = loop.node.storage.index.instance(str(loop.by_rest.source.SOPInstanceUID))
    assert received is not None and received.calling_ae_title == ORTHANC_AE


def test_cmove_from_orthanc_to_the_node_brings_the_seg_back(loop: Loop) -> None:
    assert "Final Move Response (Success)" in loop.movescu_output, loop.movescu_output
    assert loop.by_move.seg_series_ids, f"no SEG in Orthanc within {SEG_TIMEOUT} s"
    _check_seg_of(loop, loop.by_move)


def test_findscu_against_orthanc_finds_the_segs(loop: Loop, tmp_path: Path) -> None:
    expected = {str(loop.orthanc_seg(trip).SeriesInstanceUID) for trip in (loop.by_rest, loop.by_move)}
    keys = _keys("QueryRetrieveLevel=SERIES", "Modality=SEG", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber")
    output = _run("findscu", ORTHANC_AE, loop.orthanc.dicom_port, "-S", *keys, "-X", "-od", str(tmp_path), cwd=tmp_path)
    responses = [dcmread(path) for path in sorted(tmp_path.glob("rsp*.dcm"))]
    assert {str(r.SeriesInstanceUID) for r in responses} == expected, output
    assert all(r.Modality == "SEG" for r in responses)
    assert {int(r.SeriesNumber) for r in responses} == {loop.node.config.node.seg_series_number}


def test_findscu_against_the_node_finds_the_segs(loop: Loop, tmp_path: Path) -> None:
    trip = loop.by_rest
    seg = loop.orthanc_seg(trip)
    one = tmp_path / "one"
    one.mkdir()
    keys = _keys("QueryRetrieveLevel=SERIES", "Modality=SEG", f"StudyInstanceUID={trip.study_uid}", "SeriesInstanceUID")
    output = _run("findscu", NODE_AE, loop.node.port, "-S", *keys, "-X", "-od", str(one), cwd=one)
    (response,) = [dcmread(path) for path in sorted(one.glob("rsp*.dcm"))]
    assert response.SeriesInstanceUID == seg.SeriesInstanceUID and response.Modality == "SEG", output
    assert "Final Find Response (Success)" in output
    every = tmp_path / "every"  # the same query as against Orthanc: every SEG series, any study
    every.mkdir()
    keys = _keys("QueryRetrieveLevel=SERIES", "Modality=SEG", "StudyInstanceUID", "SeriesInstanceUID")
    output = _run("findscu", NODE_AE, loop.node.port, "-S", *keys, "-X", "-od", str(every), cwd=every)
    expected = {str(loop.orthanc_seg(t).SeriesInstanceUID) for t in (loop.by_rest, loop.by_move)}
    assert {str(dcmread(path).SeriesInstanceUID) for path in every.glob("rsp*.dcm")} == expected, output


def _retrieved(folder: Path) -> list[Dataset]:
    return [dcmread(path) for path in sorted(folder.iterdir()) if path.is_file()]


def test_movescu_from_the_node_equals_orthancs_copy(loop: Loop, tmp_path: Path) -> None:
    trip = loop.by_move
    seg = loop.orthanc_seg(trip)
    keys = _keys(
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={trip.study_uid}", f"SeriesInstanceUID={seg.SeriesInstanceUID}"
    )
    out = tmp_path / "moved"
    out.mkdir()
    output = _run(
        "movescu",
        NODE_AE,
        loop.node.port,
        "-S",
        "-aem",
        QR_AE,
        "+P",
        str(loop.qr_port),
        "-od",
        str(out),
        *keys,
        cwd=tmp_path,
    )
    assert "Final Move Response (Success)" in output, output
    (retrieved,) = _retrieved(out)
    assert retrieved == seg
    assert retrieved.PixelData == seg.PixelData


def test_getscu_from_the_node_equals_orthancs_copy(loop: Loop, tmp_path: Path) -> None:
    trip = loop.by_rest
    seg = loop.orthanc_seg(trip)
    keys = _keys(
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={trip.study_uid}", f"SeriesInstanceUID={seg.SeriesInstanceUID}"
    )
    out = tmp_path / "got"
    out.mkdir()
    output = _run("getscu", NODE_AE, loop.node.port, "-S", *keys, "-od", str(out), cwd=tmp_path)
    (retrieved,) = _retrieved(out)
    assert retrieved == seg, output
    assert retrieved.PixelData == seg.PixelData
