"""Security and admission: DICOM TLS, per-peer rules, the low-disk gate, the audit log.

Real peers: DCMTK ``storescu +tls``/``echoscu`` and pynetdicom against the node on 127.0.0.1;
certificates come from a throwaway CA made with the openssl CLI.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import Pki, make_pki
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    NuclearMedicineImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from studies import WEIGHTS, node_config, spect_like_volume

from config.schema import PeerSection
from node.audit import read_audit
from node.nm_writer import nifti_to_nm
from node.policy import REFUSED_NOT_AUTHORISED
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs

NODE_AE = "SPECTNODE"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (DCMTK); CI must have the real peers")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None and os.environ.get("CI") != "true":
        pytest.skip("openssl is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def study_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    ds = nifti_to_nm(spect_like_volume(), patient_name="Audit^Secret", patient_id="PID-SECRET-7731")
    path = tmp_path_factory.mktemp("study") / "nm.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def _start(tmp_path: Path, *overrides: str, peers: list[PeerSection] = (), load_model: bool = False) -> Node:
    return Node.start(node_config(tmp_path / "node", *overrides, peers=peers), load_model=load_model)


@pytest.fixture
def stop_later() -> Iterator[list]:
    started: list = []
    yield started
    for item in reversed(started):
        item.stop()


def _client_context(pki: Pki, with_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if with_certificate:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def _associate(port: int, calling: str = "TESTSCU", contexts=(Verification,), **kwargs):
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE, **kwargs)


def _store(port: int, ds: Dataset, calling: str = "TESTSCU") -> int:
    assoc = _associate(port, calling, contexts=(NuclearMedicineImageStorage,))
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _find(port: int, calling: str, patient_id: str) -> list[int]:
    assoc = _associate(port, calling, contexts=(StudyRootQueryRetrieveInformationModelFind,))
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    try:
        return [int(s.Status) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()


def _tls_overrides(pki: Pki, require_client: bool = True) -> list[str]:
    return [
        f"node.tls_certificate={pki.server_cert}",
        f"node.tls_private_key={pki.server_key}",
        f"node.tls_ca_certificates={pki.ca}",
        f"node.tls_require_client_certificate={str(require_client).lower()}",
    ]


def _wait_for_event(path: Path, kind: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in read_audit(path) if e["event"] == kind]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event in {path} within {timeout} s")


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_listening_port_with_storescu_and_pynetdicom(
    tmp_path: Path, pki: Pki, study_file: tuple[Dataset, Path], stop_later: list
) -> None:
    storescu = _tool("storescu")
    node = _start(tmp_path, *_tls_overrides(pki))
    stop_later.append(node)
    ds, path = study_file
    base = [storescu, "-aet", "TLSSCU", "-aec", NODE_AE, "-to", "10", "-ta", "10"]

    def run(*tls: str) -> subprocess.CompletedProcess[str]:
        command = [*base, *tls, "127.0.0.1", str(node.port), str(path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    sent = run("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is not None

    for refused in (
        run(),  # plain TCP to a TLS port
        run("+tla", "+cf", str(pki.ca)),  # TLS without a client certificate
        run("+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)),  # not signed by the CA
    ):
        assert refused.returncode != 0, refused.args

    assoc = _associate(node.port, tls_args=(_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert not _associate(node.port).is_established  # pynetdicom without TLS
    assert not _associate(
        node.port, tls_args=(_client_context(pki, with_certificate=False), "127.0.0.1")
    ).is_established


def test_seg_is_sent_to_a_tls_peer(
    tmp_path: Path, pki: Pki, study_file: tuple[Dataset, Path], stop_later: list
) -> None:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    pacs_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pacs_context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    pacs_context.load_verify_locations(cafile=str(pki.ca))
    pacs_context.verify_mode = ssl.CERT_REQUIRED  # the PACS checks the node's certificate
    pacs = StandInPacs(tmp_path / "pacs", ssl_context=pacs_context)
    stop_later.append(pacs)
    peer = PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, tls=True)
    overrides = [
        f"node.tls_certificate={pki.client_cert}",
        f"node.tls_private_key={pki.client_key}",
        f"node.tls_ca_certificates={pki.ca}",
    ]
    node = Node.start(node_config(tmp_path / "node", *overrides, peers=[peer]))
    stop_later.append(node)  # listening is TLS too here (the node's certificate serves both ways)
    ds, _ = study_file
    assoc = _associate(node.port, contexts=(NuclearMedicineImageStorage,), tls_args=(_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    assert pacs.wait_for(1, timeout=120), "no SEG reached the TLS peer"
    sent = _wait_for_event(tmp_path / "node" / "audit.jsonl", "seg-sent")
    assert len(sent) == 1 and sent[0]["destination"].startswith(PACS_AE)


# --- per-peer rules and the host check -----------------------------------------------------------


def test_peer_services_are_enforced_per_dimse_service(
    tmp_path: Path, study_file: tuple[Dataset, Path], stop_later: list
) -> None:
    peers = [
        PeerSection(ae_title="STOREONLY", host="127.0.0.1", port=1, services=["store"], send_results=False),
        PeerSection(ae_title="QUERYONLY", host="127.0.0.1", port=1, services=["query"], send_results=False),
    ]
    node = _start(tmp_path, "node.unlisted_services=[]", peers=peers)
    stop_later.append(node)
    ds, _ = study_file
    assert _store(node.port, ds, "QUERYONLY") == REFUSED_NOT_AUTHORISED
    assert _store(node.port, ds, "NOTAPEER") == REFUSED_NOT_AUTHORISED
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None  # nothing kept from a refused caller
    assert _store(node.port, ds, "STOREONLY") == 0
    assert _find(node.port, "STOREONLY", ds.PatientID) == [REFUSED_NOT_AUTHORISED]
    assert _find(node.port, "QUERYONLY", ds.PatientID) == [0xFF00, 0x0000]  # one match, then success


def test_check_host_rejects_a_peer_calling_from_elsewhere(tmp_path: Path, stop_later: list) -> None:
    peers = [
        PeerSection(ae_title="ELSEWHERE", host="127.0.0.2", port=1, check_host=True, send_results=False),
        PeerSection(ae_title="HERE", host="127.0.0.1", port=1, check_host=True, send_results=False),
    ]
    node = _start(tmp_path, peers=peers)
    stop_later.append(node)
    rejected = _associate(node.port, "ELSEWHERE")
    assert rejected.is_rejected
    rj = rejected.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # permanent, calling AE not recognised
    accepted = _associate(node.port, "HERE")
    assert accepted.is_established
    accepted.release()


# --- low disk: transient rejection at association ------------------------------------------------


def test_low_disk_rejects_new_associations_transiently(
    tmp_path: Path, study_file: tuple[Dataset, Path], stop_later: list
) -> None:
    echoscu = _tool("echoscu")
    node = _start(tmp_path)
    stop_later.append(node)
    ds, _ = study_file
    assert _store(node.port, ds) == 0  # accepted before the disk "fills"
    node.storage.min_free_bytes = 10**18  # the watermark above any disk: space is now "low"

    assoc = _associate(node.port)
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
    assoc = _associate(node.port)
    assert assoc.is_established
    assoc.release()
    record = node.storage.index.instance(str(ds.SOPInstanceUID))
    assert record is not None and node.storage.layout.resolve(record.path).is_file()  # nothing accepted was lost
    events = [e["event"] for e in read_audit(tmp_path / "node" / "audit.jsonl")]
    assert "association-rejected" in events


# --- the audit log -------------------------------------------------------------------------------


def test_audit_log_records_who_did_what_and_patient_ids_stay_out_of_the_log(
    tmp_path: Path, study_file: tuple[Dataset, Path], stop_later: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = _start(tmp_path, f"model.weights={tmp_path / 'missing.pth'}")  # the job fails: model unavailable
    stop_later.append(node)
    ds, _ = study_file
    assert _store(node.port, ds, "AUDITSCU") == 0
    _wait_for_event(tmp_path / "node" / "audit.jsonl", "job-result")
    assert _find(node.port, "AUDITSCU", ds.PatientID) == [0xFF00, 0x0000]
    wrong = AE(ae_title="AUDITSCU")
    wrong.add_requested_context(Verification)
    assert wrong.associate("127.0.0.1", node.port, ae_title="NOTTHENODE").is_rejected

    events = read_audit(tmp_path / "node" / "audit.jsonl")
    by_kind: dict[str, list[dict]] = {}
    for event in events:
        by_kind.setdefault(event["event"], []).append(event)
    assert {"association-accepted", "association-rejected", "instance-received", "job-result", "query"} <= set(by_kind)
    received = by_kind["instance-received"][0]
    assert received["patient_id"] == "PID-SECRET-7731" and received["calling_ae"] == "AUDITSCU"
    assert received["sop_instance_uid"] == str(ds.SOPInstanceUID)
    job = by_kind["job-result"][0]
    assert job["state"] == "failed" and "model unavailable" in job["reason"] and job["patient_id"] == ds.PatientID
    assert by_kind["query"][0]["keys"]["PatientID"] == ds.PatientID and by_kind["query"][0]["count"] == 1
    assert all("time" in e for e in events)

    ours = ("node", "storage", "seg", "config")  # pynetdicom's own DEBUG dumps are silenced by the CLI
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ours)
    assert str(ds.SOPInstanceUID) in logged  # the normal log names instances by UID...
    assert "PID-SECRET-7731" not in logged and "Secret" not in logged  # ...never the patient
