"""Per-peer rules: the services each calling AE title may use, and the check of its address.

``node.allowed_calling_ae_titles`` stays the association-level gate; ``peers[].services``
and ``node.unlisted_services`` decide per DIMSE service; ``peers[].check_host`` rejects a
peer's AE title called from another address. Real peers on 127.0.0.1: pynetdicom and
DCMTK ``storescu``/``findscu``/``movescu``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from dicom_client import NODE_AE, associate, c_find, c_get, c_move, c_store
from peers import require_tool
from pydicom import Dataset
from studies import nm_study_file, node_config

from config.schema import PeerSection
from node.audit import read_audit
from node.policy import REFUSED_NOT_AUTHORISED, UNABLE_TO_PROCESS_NOT_AUTHORISED, AccessPolicy, PeerRule
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs

PENDING, SUCCESS = 0xFF00, 0x0000


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    return nm_study_file(tmp_path_factory.mktemp("study"), "Rules^Test", "RULES-0001")


def _peer(ae_title: str, services: list[str], host: str = "127.0.0.1", check_host: bool = False) -> PeerSection:
    return PeerSection(
        ae_title=ae_title, host=host, port=1, services=services, send_results=False, check_host=check_host
    )


def test_each_dimse_service_follows_the_callers_peer_rule(
    tmp_path: Path, study: tuple[Dataset, Path], stop_later: list
) -> None:
    pacs = StandInPacs(tmp_path / "pacs")  # the C-MOVE destination (a peer that may do nothing itself)
    stop_later.append(pacs)
    peers = [
        _peer("STOREONLY", ["store"]),
        _peer("QUERYONLY", ["query"]),
        _peer("RETRIEVER", ["retrieve"]),
        PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, services=[], send_results=False),
    ]
    node = Node.start(node_config(tmp_path / "node", "node.unlisted_services=[]", peers=peers), load_model=False)
    stop_later.append(node)
    ds, _ = study
    study_uid = str(ds.StudyInstanceUID)

    # C-STORE: 0x0124 Refused: Not Authorized, and nothing kept
    for caller in ("QUERYONLY", "RETRIEVER", "NOTAPEER"):
        answer = c_store(node.port, ds, caller)
        assert (answer.Status, answer.ErrorComment) == (REFUSED_NOT_AUTHORISED, f"{caller} is not authorised to store")
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None
    assert c_store(node.port, ds, "STOREONLY").Status == SUCCESS

    # C-FIND: 0xC124 (Failed: Unable to process)
    assert [s.Status for s in c_find(node.port, "QUERYONLY", ds.PatientID)] == [PENDING, SUCCESS]
    for caller in ("STOREONLY", "RETRIEVER", "NOTAPEER"):
        (refused,) = c_find(node.port, caller, ds.PatientID)
        assert (refused.Status, refused.ErrorComment) == (
            UNABLE_TO_PROCESS_NOT_AUTHORISED,
            f"{caller} is not authorised to query",
        )

    # C-GET and C-MOVE: 0x0124, and nothing sent
    final, received = c_get(node.port, "RETRIEVER", study_uid)
    assert (final.Status, received) == (SUCCESS, [str(ds.SOPInstanceUID)])
    final, received = c_get(node.port, "QUERYONLY", study_uid)
    assert (final.Status, final.ErrorComment, received) == (
        REFUSED_NOT_AUTHORISED,
        "QUERYONLY is not authorised to retrieve",
        [],
    )
    moved = c_move(node.port, "STOREONLY", study_uid, PACS_AE)
    assert (moved.Status, moved.ErrorComment) == (REFUSED_NOT_AUTHORISED, "STOREONLY is not authorised to retrieve")
    assert pacs.received == {}
    assert c_move(node.port, "RETRIEVER", study_uid, PACS_AE).Status == SUCCESS
    assert list(pacs.received) == [str(ds.SOPInstanceUID)]

    refusals = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"].endswith("-refused")]
    assert [e["event"] for e in refusals] == ["store-refused"] * 3 + ["query-refused"] * 3 + ["retrieve-refused"] * 2
    assert {e["calling_ae"] for e in refusals} == {"QUERYONLY", "RETRIEVER", "NOTAPEER", "STOREONLY"}


@pytest.mark.peers
def test_dcmtk_tools_see_the_refusals(tmp_path: Path, study: tuple[Dataset, Path], stop_later: list) -> None:
    storescu, findscu, movescu = require_tool("storescu"), require_tool("findscu"), require_tool("movescu")
    pacs = StandInPacs(tmp_path / "pacs")
    stop_later.append(pacs)
    peers = [
        _peer("QUERYONLY", ["query"]),
        _peer("MOVER", ["store"]),
        PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=False),
    ]
    node = Node.start(node_config(tmp_path / "node", peers=peers), load_model=False)  # unlisted: everything
    stop_later.append(node)
    ds, path = study
    address = ["127.0.0.1", str(node.port)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args], capture_output=True, text=True, timeout=60)

    refused = run(storescu, "-v", "-aet", "QUERYONLY", "-aec", NODE_AE, *address, str(path))
    # storescu's summary line does not name 0x0124 ("Unknown Status: 0x124"), yet counts it as a failure
    assert refused.returncode != 0 and "Status: 0x124" in refused.stderr, refused.stderr
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is None
    stored = run(storescu, "-aet", "SOMEONE", "-aec", NODE_AE, *address, str(path))  # not a peer
    assert stored.returncode == 0, stored.stderr

    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    found = run(findscu, "-v", "-S", "-aet", "QUERYONLY", "-aec", NODE_AE, *keys, *address)
    assert found.returncode == 0 and str(ds.StudyInstanceUID) in found.stdout + found.stderr
    not_found = run(findscu, "-v", "-S", "-aet", "MOVER", "-aec", NODE_AE, *keys, *address)
    output = not_found.stdout + not_found.stderr
    assert "Final Find Response (Failed: UnableToProcess)" in output, output
    moved = run(movescu, "-v", "-S", "-aet", "MOVER", "-aec", NODE_AE, "-aem", PACS_AE, *keys, *address)
    output = moved.stdout + moved.stderr
    assert moved.returncode != 0 and "Move response with error status (Unknown Status: 0x124)" in output, output
    assert pacs.received == {}


def test_check_host_and_the_association_gate(tmp_path: Path, stop_later: list) -> None:
    peers = [
        _peer("ELSEWHERE", ["store", "query", "retrieve"], host="127.0.0.2", check_host=True),
        _peer("HERE", ["store"], check_host=True),
        _peer("BYNAME", ["store"], host="localhost", check_host=True),
        _peer("NOTLET", ["store"]),
    ]
    overrides = ["node.allowed_calling_ae_titles=[ELSEWHERE, HERE, BYNAME, OTHER]"]
    node = Node.start(node_config(tmp_path / "node", *overrides, peers=peers), load_model=False)
    stop_later.append(node)

    rejected = associate(node.port, "ELSEWHERE")
    assert rejected.is_rejected
    rj = rejected.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # permanent, calling AE not recognised
    for caller in ("HERE", "BYNAME", "OTHER"):  # OTHER: allowed, not a peer, so no host to check
        accepted = associate(node.port, caller)
        assert accepted.is_established, caller
        accepted.release()
    assert associate(node.port, "NOTLET").is_rejected  # a peer entry does not open the gate

    rejections = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "association-rejected"]
    assert [(e["calling_ae"], e["address"]) for e in rejections] == [
        ("ELSEWHERE", "127.0.0.1"),
        ("NOTLET", "127.0.0.1"),
    ]
    assert "configured at 127.0.0.2" in rejections[0]["reason"]
    assert rejections[1]["reason"] == "calling AE title not recognised"


def test_host_check_compares_addresses_not_spellings() -> None:
    rules = [PeerRule("PACS", "pacs.example", frozenset({"store"}), check_host=True)]
    policy = AccessPolicy(rules, unlisted_services=["query"], resolve=lambda host: {"10.1.2.3", "fd00::7"})
    assert policy.host_mismatch("PACS", "10.1.2.3") is None
    assert policy.host_mismatch("PACS", "::ffff:10.1.2.3") is None  # IPv4 caller on an IPv6 socket
    assert policy.host_mismatch("PACS", "fd00:0:0::7") is None
    assert "configured at pacs.example" in (policy.host_mismatch("PACS", "10.1.2.4") or "")
    assert policy.host_mismatch("OTHER", "10.9.9.9") is None  # not a peer: nothing to compare
    assert policy.allows("PACS", "store") and not policy.allows("PACS", "query")
    assert policy.allows("OTHER", "query") and not policy.allows("OTHER", "store")

    def unresolvable(host: str) -> set[str]:
        raise OSError("no such host")

    broken = AccessPolicy(rules, resolve=unresolvable)
    assert "does not resolve" in (broken.host_mismatch("PACS", "10.1.2.3") or "")


def test_the_association_check_fails_closed(tmp_path: Path, stop_later: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom accepts when an EVT_REQUESTED handler raises: the node's check must reject instead.
    A host IDNA cannot encode made the host check raise; a storage root that cannot be read, the disk check."""
    peers = [_peer("BADNAME", ["store"], host="pacs..example.org", check_host=True), _peer("FINE", ["store"])]
    node = Node.start(node_config(tmp_path / "node", peers=peers), load_model=False)
    stop_later.append(node)
    assert associate(node.port, "BADNAME").is_rejected

    def unreadable() -> int | None:
        raise PermissionError("the storage root cannot be read")

    monkeypatch.setattr(node.storage, "free_bytes_if_low", unreadable)
    rejected = associate(node.port, "FINE")
    assert rejected.is_rejected and rejected.acceptor.primitive.result == 0x02  # transient: try again later
    reasons = [
        e["reason"] for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "association-rejected"
    ]
    assert "host 'pacs..example.org' does not resolve" in reasons[0]
    assert reasons[1] == "the association check failed (PermissionError: the storage root cannot be read)"
