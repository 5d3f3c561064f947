"""The audit log: one JSON line per event, the only place patient identifiers are written."""

from __future__ import annotations

import json
import logging
import stat
import threading
from pathlib import Path

import pytest
from dicom_client import associate, c_find, c_get, c_move, c_store, wait_for_event
from studies import WEIGHTS, node_config, spect_like_volume

from config.schema import PeerSection
from node.audit import AuditLog, AuditLogError, read_audit
from node.nm_writer import nifti_to_nm
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs

PATIENT_ID, PATIENT_NAME = "PID-SECRET-7731", "Audit^Secretname"


def _by_kind(path: Path) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for event in read_audit(path):
        kinds.setdefault(event["event"], []).append(event)
    return kinds


def test_audit_log_records_who_did_what_and_patients_stay_out_of_the_log(
    tmp_path: Path, stop_later: list, caplog: pytest.LogCaptureFixture
) -> None:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    caplog.set_level(logging.DEBUG)  # every logger, pynetdicom's included
    pacs = StandInPacs(tmp_path / "pacs")
    stop_later.append(pacs)
    node = Node.start(
        node_config(tmp_path / "node", peers=[PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)])
    )
    stop_later.append(node)
    audit_path = tmp_path / "node" / "audit.jsonl"
    ds = nifti_to_nm(spect_like_volume(), patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    study_uid = str(ds.StudyInstanceUID)

    assert c_store(node.port, ds, "MODALITY").Status == 0
    seg = wait_for_event(audit_path, "seg-sent", timeout=120)[0]
    assert [s.Status for s in c_find(node.port, "VIEWER", PATIENT_ID)] == [0xFF00, 0x0000]
    final, received = c_get(node.port, "VIEWER", study_uid)
    assert final.Status == 0 and len(received) == 2  # the NM and its SEG
    assert c_move(node.port, "VIEWER", study_uid, PACS_AE).Status == 0
    assert c_move(node.port, "VIEWER", study_uid, "NOWHERE").Status == 0xA801
    assert associate(node.port, "VIEWER", ae_title="NOTTHENODE").is_rejected

    kinds = _by_kind(audit_path)
    received_event = kinds["instance-received"][0]
    assert (received_event["calling_ae"], received_event["patient_id"], received_event["patient_name"]) == (
        "MODALITY",
        PATIENT_ID,
        PATIENT_NAME,
    )
    assert received_event["sop_instance_uid"] == str(ds.SOPInstanceUID)
    job = kinds["job-result"][0]
    assert (job["state"], job["patient_id"], job["study_instance_uid"]) == ("done", PATIENT_ID, study_uid)
    assert seg["seg_sop_instance_uid"] == job["seg_sop_instance_uid"] in pacs.received
    assert seg["destination"] == f"{PACS_AE}@127.0.0.1:{pacs.port}"
    query = kinds["query"][0]
    assert (query["calling_ae"], query["keys"]["PatientID"], query["level"], query["count"]) == (
        "VIEWER",
        PATIENT_ID,
        "STUDY",
        1,
    )
    retrievals = [(e["service"], e["destination"], e["count"], e["studies"]) for e in kinds["retrieve"]]
    assert retrievals == [("C-GET", "VIEWER", 2, [study_uid]), ("C-MOVE", PACS_AE, 2, [study_uid])]
    (refused,) = kinds["retrieve-refused"]  # who asked what of which study, and why not
    assert (refused["service"], refused["destination"], refused["status"]) == ("C-MOVE", "NOWHERE", "0xA801")
    assert refused["keys"]["StudyInstanceUID"] == study_uid and "not a configured peer" in refused["reason"]
    accepted = kinds["association-accepted"]
    assert {e["calling_ae"] for e in accepted} == {"MODALITY", "VIEWER"}
    assert all(e["address"] == "127.0.0.1" and isinstance(e["port"], int) for e in accepted)
    rejected = kinds["association-rejected"]
    assert [(e["calling_ae"], e["reason"]) for e in rejected] == [("VIEWER", "called AE title not recognised")]
    assert all(e["time"].endswith("+00:00") for events in kinds.values() for e in events)

    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert str(ds.SOPInstanceUID) in logged and study_uid in logged  # the normal log names things by UID...
    assert PATIENT_ID not in logged and "Secretname" not in logged  # ...and never the patient
    assert PATIENT_ID in audit_path.read_text()


def test_concurrent_appends_stay_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    audit = AuditLog(path, fsync=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds patient identifiers

    def write(thread: int) -> None:
        for index in range(150):
            audit.record("instance-received", thread=thread, index=index, patient_name="Nöme^Ünicode" * 20, empty=None)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    audit.close()
    audit.record("after-close")  # ignored, not raised
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8 * 150
    events = [json.loads(line) for line in lines]
    assert {(e["thread"], e["index"]) for e in events} == {(t, i) for t in range(8) for i in range(150)}
    assert all("empty" not in e and e["patient_name"].startswith("Nöme") for e in events)
    AuditLog(path).record("reopened")  # appends, never truncates
    assert len(read_audit(path)) == 8 * 150 + 1


def test_an_unusable_audit_path_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(AuditLogError, match="not-a-folder/audit.jsonl: cannot open the audit log"):
        AuditLog(blocker / "audit.jsonl")
    config = node_config(tmp_path / "node", f"node.audit_log={blocker / 'audit.jsonl'}")
    with pytest.raises(AuditLogError):
        Node.start(config, load_model=False)
