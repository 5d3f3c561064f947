"""Query/Retrieve over the wire: DCMTK findscu/movescu/getscu and pynetdicom against the running node.

The node runs in-process; one NM study is sent to it and its SEG awaited once
for the whole module. Move destinations are stand-in PACS servers.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import require_tool
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from studies import WEIGHTS, node_config, spect_like_volume

from config.schema import PeerSection
from node import qr
from node.network import PeerAddress, set_tcp_nodelay
from node.nm_writer import nifti_to_nm
from node.qr import CANCEL, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, MOVE_DESTINATION_UNKNOWN
from node.scu import send_datasets
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs
from storage import InformationModel, InstanceRecord, Query, QueryLevel, StudyMatch

NODE_AE = "SPECTNODE"
MOVE_AE = "MOVEDEST"
PENDING = 0xFF00
SUCCESS = 0x0000
SUB_OPERATIONS_WARNING = 0xB000


@dataclass(frozen=True)
class Study:
    """The NM study sent to the node and the SEG the node made of it (as stored by the node)."""

    source: Dataset
    seg: Dataset
    seg_path: Path

    @property
    def study_uid(self) -> str:
        return str(self.source.StudyInstanceUID)


@dataclass(frozen=True)
class Setup:
    node: Node
    pacs: StandInPacs
    destination: StandInPacs
    study: Study


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    root = tmp_path_factory.mktemp("qr")
    pacs = StandInPacs(root / "pacs")
    destination = StandInPacs(root / "destination")
    config = node_config(root / "node", f"node.ae_title={NODE_AE}")
    config.peers = [
        PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port),
        PeerSection(ae_title=MOVE_AE, host="127.0.0.1", port=destination.port, send_results=False),
    ]
    node = Node.start(config)
    try:
        source = nifti_to_nm(spect_like_volume(), patient_name="Test^QR", patient_id="QR1")
        outcome = send_datasets([source], PeerAddress(NODE_AE, "127.0.0.1", node.port), "TESTSCU")
        assert outcome.all_succeeded, outcome
        assert pacs.wait_for(1, timeout=120), "the node made no SEG"
        results = node.storage.index.results(str(source.StudyInstanceUID))
        assert len(results) == 1
        seg_path = node.storage.layout.resolve(results[0].path)
        study = Study(source, dcmread(seg_path), seg_path)
        yield Setup(node, pacs, destination, study)
    finally:
        node.stop()
        pacs.stop()
        destination.stop()


# ----------------------------------------------------------------------------- DCMTK


def _run(tool: str, node: Node, *args: str, cwd: Path) -> str:
    """Run a DCMTK tool against the node (Nagle off); return its verbose output."""
    command = [require_tool(tool), "-v", "-aec", NODE_AE, *args, "127.0.0.1", str(node.port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False)
    return done.stdout + done.stderr


def _keys(*keys: str) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def _responses(folder: Path) -> list[Dataset]:
    return [dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


def test_findscu_series_level_modality_seg(setup: Setup, tmp_path: Path) -> None:
    study = setup.study
    keys = _keys(
        "QueryRetrieveLevel=SERIES",
        "Modality=SEG",
        f"StudyInstanceUID={study.study_uid}",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    )
    output = _run("findscu", setup.node, "-S", *keys, "-X", "-od", str(tmp_path), cwd=tmp_path)
    (response,) = _responses(tmp_path)
    assert "Find Response 1 (Pending)" in output  # 0xFF00: every key supported
    assert response.RetrieveAETitle == NODE_AE  # returned though not asked for (PS3.4 C.4.1.1.3.2)
    assert response.QueryRetrieveLevel == "SERIES"
    assert response.Modality == "SEG"
    assert response.SeriesInstanceUID == study.seg.SeriesInstanceUID
    assert int(response.SeriesNumber) == int(study.seg.SeriesNumber)
    assert int(response.NumberOfSeriesRelatedInstances) == 1
    assert "Final Find Response (Success)" in output


def test_findscu_study_level_modalities_in_study(setup: Setup, tmp_path: Path) -> None:
    keys = _keys(
        "QueryRetrieveLevel=STUDY",
        "PatientID=QR1",
        "ModalitiesInStudy=SEG",
        "PatientName",
        "StudyInstanceUID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "PatientComments",  # not held by the index
        "(0009,0010)=ACME",  # private
    )
    output = _run("findscu", setup.node, "-P", *keys, "-X", "-od", str(tmp_path), cwd=tmp_path)
    (response,) = _responses(tmp_path)
    # 0xFF01: optional keys not supported, and not returned
    assert "Find Response 1 (Pending: WarningUnsupportedOptionalKeys)" in output
    assert "PatientComments" not in response and 0x00090010 not in response
    assert response.StudyInstanceUID == setup.study.study_uid
    assert list(response.ModalitiesInStudy) == ["NM", "SEG"]
    assert str(response.PatientName) == "Test^QR"
    assert int(response.NumberOfStudyRelatedSeries) == 2
    assert int(response.NumberOfStudyRelatedInstances) == 2
    none = tmp_path / "none"
    none.mkdir()
    _run(
        "findscu",
        setup.node,
        "-S",
        *_keys("QueryRetrieveLevel=STUDY", "ModalitiesInStudy=CT"),
        "-X",
        "-od",
        str(none),
        cwd=none,
    )
    assert _responses(none) == []


def test_findscu_bad_level_is_refused(setup: Setup, tmp_path: Path) -> None:
    output = _run("findscu", setup.node, "-S", *_keys("QueryRetrieveLevel=PATIENT", "PatientID"), cwd=tmp_path)
    assert "DataSetDoesNotMatchSOPClass" in output  # Study Root has no PATIENT level: 0xA900


def test_movescu_study_to_a_configured_peer(setup: Setup, tmp_path: Path) -> None:
    study, destination = setup.study, setup.destination
    keys = _keys("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_uid}")
    output = _run("movescu", setup.node, "-S", "-aem", MOVE_AE, *keys, cwd=tmp_path)
    assert "Final Move Response (Success)" in output, output
    assert destination.wait_for(2, timeout=10)
    received = {uid: dcmread(io.BytesIO(data)) for uid, data in destination.received.items()}
    seg = received[str(study.seg.SOPInstanceUID)]
    assert seg == study.seg
    assert seg.PixelData == study.seg.PixelData
    nm = received[str(study.source.SOPInstanceUID)]
    assert nm.PixelData == study.source.PixelData and nm.Modality == "NM"


def test_movescu_to_an_unknown_destination_is_refused(setup: Setup, tmp_path: Path) -> None:
    before = dict(setup.destination.received)
    keys = _keys("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={setup.study.study_uid}")
    output = _run("movescu", setup.node, "-S", "-aem", "NOBODY", *keys, cwd=tmp_path)
    assert "MoveDestinationUnknown" in output
    assert setup.destination.received == before


def test_getscu_seg_series(setup: Setup, tmp_path: Path) -> None:
    study = setup.study
    keys = _keys(
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={study.study_uid}",
        f"SeriesInstanceUID={study.seg.SeriesInstanceUID}",
    )
    output = _run("getscu", setup.node, "-S", *keys, "-od", str(tmp_path), cwd=tmp_path)
    files = [path for path in tmp_path.iterdir() if path.is_file()]
    assert len(files) == 1, output
    retrieved = dcmread(files[0])
    assert retrieved == study.seg
    assert retrieved.PixelData == study.seg.PixelData


# ----------------------------------------------------------------------------- pynetdicom


def _associate(node: Node, *, get_storage: bool = False, on_store: list[Dataset] | None = None) -> Association:
    ae = AE(ae_title="QRSCU")
    for model in (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_requested_context(model)
    roles = []
    handlers = []
    if get_storage:
        ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian])
        roles.append(build_role(SegmentationStorage, scp_role=True))
        store = on_store if on_store is not None else []

        def keep(event: evt.Event) -> int:
            store.append(event.dataset)
            return SUCCESS

        handlers.append((evt.EVT_C_STORE, keep))
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=roles, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _final_status(responses: Iterator[tuple[Dataset, Dataset | None]]) -> tuple[int, Dataset, Dataset | None, int]:
    """(final status, final status dataset, final identifier, number of pending responses)."""
    pending = 0
    for status, identifier in responses:
        if status.Status != PENDING:
            return int(status.Status), status, identifier, pending
        pending += 1
    raise AssertionError("no final response")


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the invalid values are the point
@pytest.mark.parametrize(
    ("service", "level", "keys"),
    [
        ("find", "FOO", {"PatientID": ""}),
        ("find", "STUDY", {"StudyDate": "2024-01-01"}),
        ("find", "STUDY", {"StudyInstanceUID": "1.2.*"}),
        ("move", "STUDY", {"StudyInstanceUID": ""}),
        ("get", "SERIES", {"StudyInstanceUID": "1.2.3"}),
    ],
)
def test_bad_identifiers_are_refused(setup: Setup, service: str, level: str, keys: dict[str, str]) -> None:
    identifier = _identifier(level, **keys)
    assoc = _associate(setup.node)
    try:
        if service == "find":
            responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        elif service == "move":
            responses = assoc.send_c_move(identifier, MOVE_AE, StudyRootQueryRetrieveInformationModelMove)
        else:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        status, _, _, pending = _final_status(responses)
    finally:
        assoc.release()
    assert (status, pending) == (IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, 0)


def test_move_to_unknown_destination_status(setup: Setup) -> None:
    assoc = _associate(setup.node)
    try:
        identifier = _identifier("STUDY", StudyInstanceUID=setup.study.study_uid)
        status, _, _, _ = _final_status(
            assoc.send_c_move(identifier, "NOBODY", StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert status == MOVE_DESTINATION_UNKNOWN


def _fake_record(study_uid: str, series_uid: str, number: int) -> InstanceRecord:
    """An indexed instance whose file does not exist (queries never open files)."""
    sop_uid = generate_uid()
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        sop_class_uid=SegmentationStorage,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        path=f"dicom/{study_uid}/{series_uid}/{sop_uid}.dcm",
        size_bytes=0,
        received_at=time.time(),
        is_result=True,  # keeps the series sweeper away
        patient_id="MANY",
        modality="OT",
        instance_number=number,
    )


def test_get_with_a_missing_file_warns_and_lists_it(setup: Setup) -> None:
    index = setup.node.storage.index
    study_uid, series_uid = generate_uid(), generate_uid()
    real = copy.deepcopy(setup.study.seg)
    real.StudyInstanceUID, real.SeriesInstanceUID, real.SOPInstanceUID = study_uid, series_uid, generate_uid()
    real.file_meta.MediaStorageSOPInstanceUID = real.SOPInstanceUID
    buffer = io.BytesIO()
    real.save_as(buffer, enforce_file_format=True)
    setup.node.storage.store_instance(buffer.getvalue(), real, calling_ae_title=None, is_result=True)
    missing = _fake_record(study_uid, series_uid, 2)
    index.add_instance(missing)
    received: list[Dataset] = []
    assoc = _associate(setup.node, get_storage=True, on_store=received)
    try:
        identifier = _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        status, final, failed, _ = _final_status(
            assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        )
    finally:
        assoc.release()
    assert status == SUB_OPERATIONS_WARNING
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert failed is not None
    assert _uid_list(failed.get("FailedSOPInstanceUIDList")) == [missing.sop_instance_uid]
    assert [ds.SOPInstanceUID for ds in received] == [real.SOPInstanceUID]


def _uid_list(value: object) -> list[str]:
    """A UI element value (absent, one UID or several) as a list of UIDs."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(uid) for uid in value]  # type: ignore[attr-defined]


def test_find_is_cancelled(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.qr

    build = node.qr.response_identifier
    cancel_sent = threading.Event()
    built = 0

    def slow_response(*args: object) -> Dataset:
        """The first match at once; the others only after the C-CANCEL left, 5 ms each (399 take ~2 s)."""
        nonlocal built
        built += 1
        if built > 1:
            assert cancel_sent.wait(30), "the test never sent its C-CANCEL"
            time.sleep(0.005)
        return build(*args)

    monkeypatch.setattr(node.qr, "response_identifier", slow_response)
    index = setup.node.storage.index
    study_uid, series_uid = generate_uid(), generate_uid()
    total = 400
    for number in range(total):
        index.add_instance(_fake_record(study_uid, series_uid, number))
    assoc = _associate(setup.node)
    try:
        context_id = next(
            cx.context_id
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == PatientRootQueryRetrieveInformationModelFind
        )
        identifier = _identifier("IMAGE", PatientID="MANY", StudyInstanceUID=study_uid, SOPInstanceUID="")
        responses = assoc.send_c_find(identifier, PatientRootQueryRetrieveInformationModelFind, msg_id=7)
        first_status, first = next(responses)
        assert first_status.Status == PENDING and first.SOPInstanceUID
        assoc.send_c_cancel(7, context_id)
        cancel_sent.set()
        status, _, _, pending = _final_status(responses)
    finally:
        cancel_sent.set()  # a failure above must not leave the handler waiting
        assoc.release()
    assert status == CANCEL
    assert pending + 1 < total


def test_move_sub_association_turns_nagle_off(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handlers C-MOVE hands to pynetdicom run on the sub-association's own (requestor) socket."""
    seen: list[tuple[bool, int]] = []

    def probe(event: evt.Event) -> None:
        set_tcp_nodelay(event)
        sock = event.assoc.dul.socket.socket
        seen.append((event.assoc.is_requestor, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    monkeypatch.setattr(qr, "NODELAY_HANDLERS", [(evt.EVT_CONN_OPEN, probe)])
    assoc = _associate(setup.node)
    try:
        identifier = _identifier("SERIES", StudyInstanceUID=setup.study.study_uid)
        identifier.SeriesInstanceUID = setup.study.seg.SeriesInstanceUID
        status, final, _, _ = _final_status(
            assoc.send_c_move(identifier, MOVE_AE, StudyRootQueryRetrieveInformationModelMove)
        )
    finally:
        assoc.release()
    assert status == SUCCESS and final.NumberOfCompletedSuboperations == 1
    assert seen == [(True, 1)]


def test_response_identifier_declares_utf8_for_non_ascii_values() -> None:
    request = _identifier("STUDY", PatientName="", StudyInstanceUID="", ModalitiesInStudy="")
    request.PatientComments = ""
    query = Query(InformationModel.STUDY_ROOT, QueryLevel.STUDY, {"PatientName": ""})
    match = StudyMatch(
        patient_id="P1",
        patient_name="Müller^Jürgen",
        patient_birth_date=None,
        patient_sex=None,
        study_instance_uid="1.2.3",
        study_date="20240101",
        study_time=None,
        accession_number=None,
        study_id=None,
        study_description=None,
        referring_physician_name=None,
        number_of_study_related_series=2,
        number_of_study_related_instances=3,
        modalities_in_study=("NM", "SEG"),
    )
    response = qr.response_identifier(request, query, match, NODE_AE)
    decoded = decode(io.BytesIO(encode(response, False, True)), False, True)
    assert decoded.SpecificCharacterSet == "ISO_IR 192"
    assert str(decoded.PatientName) == "Müller^Jürgen"
    assert list(decoded.ModalitiesInStudy) == ["NM", "SEG"]
    assert "PatientComments" not in decoded  # asked for, not held by the index: not returned
    assert decoded.RetrieveAETitle == NODE_AE
    assert "StudyDate" not in decoded  # not asked for
    assert decoded.QueryRetrieveLevel == "STUDY" and decoded.StudyInstanceUID == "1.2.3"
