"""Retention (storage.retention and ``spect-node purge``) on real SQLite stores and files.

Studies are built through the storage API the node itself uses: instances stored
with a reception time in the past, a job claimed and finished with a SEG result and
its delivery, and the NIfTI volume the worker writes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from studies import node_config

from node.audit import read_audit
from node.cli import main as spect_node
from node.nm_writer import dataset_to_bytes
from node.service import Node
from storage import SEGMENT_JOB, NewResult, Storage
from storage.retention import SECONDS_PER_DAY, PurgeReport, _FileRemover, purge, purge_study

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
DAY = SECONDS_PER_DAY
NOW = time.time()
TABLES = ("instances", "series", "jobs", "results", "deliveries")


def _dataset(study: str, series: str, sop_class: str, patient: str, modality: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.PatientName = f"Retention^{patient}"
    ds.StudyDate = "20240101"
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.set_original_encoding(False, True)
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _store(storage: Storage, ds: Dataset, received_at: float, is_result: bool = False) -> str:
    record, _ = storage.store_instance(
        dataset_to_bytes(ds),
        ds,
        calling_ae_title=None if is_result else "MODALITY",
        is_result=is_result,
        received_at=received_at,
    )
    return record.path


def add_study(
    storage: Storage,
    patient: str,
    age_days: float,
    delivery: str | None = "done",
    job: str = "done",
) -> str:
    """A processed study received ``age_days`` ago: 2 NM instances, a SEG, a delivery in state ``delivery``.

    ``job="queued"`` or ``"running"`` stops before the result; ``delivery=None`` records no destination.
    Returns the Study Instance UID.
    """
    when = NOW - age_days * DAY
    study, series = generate_uid(), generate_uid()
    for number in (1, 2):
        _store(storage, _dataset(study, series, NM_STORAGE, patient, "NM", number), when)
    index = storage.index
    job_id = index.mark_series_complete(series, job_kind=SEGMENT_JOB, now=when)
    if job == "queued":
        return study
    claimed = index.claim_job("test-worker", now=when)
    assert claimed is not None and claimed.id == job_id
    if job == "running":
        return study
    nifti = storage.layout.nifti_path(series)
    nifti.write_bytes(b"volume")
    nifti.with_name(nifti.name.replace(".nii.gz", "_myocardium.nii.gz")).write_bytes(b"mask")
    seg = _dataset(study, generate_uid(), SEG_STORAGE, patient, "SEG", 1)
    path = _store(storage, seg, when, is_result=True)
    result = NewResult(
        job_id=job_id,
        study_instance_uid=study,
        source_series_instance_uid=series,
        seg_sop_instance_uid=str(seg.SOPInstanceUID),
        seg_series_instance_uid=str(seg.SeriesInstanceUID),
        path=path,
        myocardium_volume_ml=100.0,
        model_name="test",
        model_version="0",
    )
    _, deliveries = index.finish_job_with_result(result, ["PACS"] if delivery else [], now=when)
    if delivery in ("done", "failed"):
        index.mark_delivery(deliveries[0].id, success=delivery == "done", error="refused", max_attempts=1, now=when)
    elif delivery == "retrying":  # one failed attempt, the next one due later
        index.mark_delivery(deliveries[0].id, success=False, error="refused", max_attempts=10, now=when)
    return study


def counts(storage: Storage) -> dict[str, int]:
    with sqlite3.connect(storage.layout.index_path) as conn:
        return {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}


def files(storage: Storage) -> set[str]:
    return {storage.layout.relative(p) for p in storage.layout.root.rglob("*") if p.is_file() and "index" not in p.name}


def _series_of(storage: Storage, study: str) -> list[str]:
    with sqlite3.connect(storage.layout.index_path) as conn:
        rows = conn.execute("SELECT series_instance_uid FROM series WHERE study_instance_uid = ?", (study,))
        return [row[0] for row in rows]


def study_files(storage: Storage, study: str) -> list[Path]:
    """The DICOM files the index names for a study (received instances and SEGs)."""
    series = _series_of(storage, study)
    return [storage.layout.resolve(r.path) for s in series for r in storage.index.instances_for_series(s)]


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    with Storage.open(tmp_path / "store") as opened:
        yield opened


def test_old_done_study_is_removed_with_its_files_recent_one_kept(storage: Storage) -> None:
    old = add_study(storage, "OLD", age_days=40)
    recent = add_study(storage, "NEW", age_days=2)
    old_series = _series_of(storage, old)
    old_files = study_files(storage, old)
    assert len(old_files) == 3 and all(p.is_file() for p in old_files)  # 2 NM + the SEG
    before = counts(storage)

    report = purge(storage, 30 * DAY, now=NOW)

    assert [s.study_instance_uid for s in report.removed] == [old]
    assert report.removed[0].n_instances == 3 and not report.held and not report.file_errors
    assert not any(p.exists() for p in old_files)
    assert not (storage.layout.dicom_dir / old).exists()
    assert not any(storage.layout.nifti_dir.glob(f"{old_series[0]}*"))
    assert storage.index.results(old) == [] and storage.index.instances_for_series(old_series[0]) == []
    after = counts(storage)
    assert after == {"instances": 3, "series": 2, "jobs": 1, "results": 1, "deliveries": 1}
    assert before == {table: 2 * n for table, n in after.items()}
    assert all(p.is_file() for p in study_files(storage, recent))
    assert len(list(storage.layout.nifti_dir.iterdir())) == 2  # the recent study's volume and mask


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"job": "queued"}, "is queued"),
        ({"job": "running"}, "is running"),
        ({"delivery": "pending"}, "is pending after 0 attempt(s)"),
        ({"delivery": "retrying"}, "is pending after 1 attempt(s)"),
        ({"delivery": "failed"}, "failed for good"),
    ],
)
def test_study_the_node_still_owes_work_on_is_kept(storage: Storage, state: dict[str, str], reason: str) -> None:
    held = add_study(storage, "HELD", age_days=400, **state)
    files_before, rows_before = files(storage), counts(storage)

    report = purge(storage, 30 * DAY, now=NOW)

    assert report.removed == []
    assert [h.study.study_instance_uid for h in report.held] == [held]
    assert reason in report.held[0].reason
    assert files(storage) == files_before and counts(storage) == rows_before


def test_failed_delivery_goes_only_with_include_failed(storage: Storage) -> None:
    study = add_study(storage, "FAILED", age_days=60, delivery="failed")
    assert purge(storage, 30 * DAY, now=NOW).removed == []
    report = purge(storage, 30 * DAY, now=NOW, include_failed=True)
    assert [s.study_instance_uid for s in report.removed] == [study]
    assert counts(storage) == dict.fromkeys(TABLES, 0)


def test_series_still_receiving_is_kept(storage: Storage) -> None:
    study, series = generate_uid(), generate_uid()
    _store(storage, _dataset(study, series, NM_STORAGE, "RECV", "NM", 1), NOW - 90 * DAY)
    report = purge(storage, 30 * DAY, now=NOW)
    assert report.removed == [] and "still receiving" in report.held[0].reason


def test_dry_run_changes_nothing(storage: Storage) -> None:
    old = add_study(storage, "OLD", age_days=40)
    add_study(storage, "HELD", age_days=40, delivery="retrying")
    files_before, rows_before = files(storage), counts(storage)

    report = purge(storage, 30 * DAY, now=NOW, dry_run=True)

    assert [s.study_instance_uid for s in report.removed] == [old] and len(report.held) == 1
    assert files(storage) == files_before and counts(storage) == rows_before


def test_interrupted_purge_leaves_no_row_without_file_and_the_next_purge_removes_the_orphans(
    storage: Storage,
) -> None:
    """Rows go first (one transaction), files after: a crash in between leaves unindexed files only."""
    old = add_study(storage, "OLD", age_days=40)
    old_files = study_files(storage, old)
    outcome = purge_study(storage, old, cutoff=NOW - 30 * DAY)  # the commit, then "crash" before the files
    assert not isinstance(outcome, str)
    assert counts(storage) == dict.fromkeys(TABLES, 0)
    assert all(p.is_file() for p in old_files)  # orphans: no row names them
    leftovers = [*old_files, *storage.layout.nifti_dir.iterdir()]
    for path in leftovers:  # written when the study arrived, 40 days ago
        os.utime(path, (NOW - 40 * DAY, NOW - 40 * DAY))
    fresh = storage.layout.dicom_dir / generate_uid() / "1.dcm"  # being received now: file written, row not yet
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(b"new")

    report = purge(storage, 30 * DAY, now=NOW)

    assert report.orphans_removed == 5  # 2 NM + the SEG + the NIfTI volume and mask
    assert not any(p.exists() for p in leftovers) and not (storage.layout.dicom_dir / old).exists()
    assert fresh.is_file()


def test_orphans_of_a_study_re_sent_after_an_interrupted_purge_are_removed_and_its_new_file_kept(
    storage: Storage,
) -> None:
    old = add_study(storage, "AGAIN", age_days=40)
    old_files = study_files(storage, old)
    assert not isinstance(purge_study(storage, old, cutoff=NOW - 30 * DAY), str)  # rows gone, "crash"
    for path in old_files:
        os.utime(path, (NOW - 40 * DAY, NOW - 40 * DAY))
    kept = next(p for p in old_files if dcmread(p).Modality == "NM")
    again = dcmread(kept)  # the same instance re-sent, byte for byte
    storage.store_instance(kept.read_bytes(), again, calling_ae_title="MODALITY", received_at=NOW)
    assert os.stat(kept).st_mtime < NOW - 30 * DAY  # identical bytes: the old file was kept, mtime and all

    report = purge(storage, 30 * DAY, now=NOW)

    assert kept.is_file() and storage.index.instance(str(again.SOPInstanceUID)) is not None
    assert [p for p in old_files if p.exists()] == [kept]  # the study's other leftovers are gone
    assert report.orphans_removed == len(old_files) - 1


def test_study_received_again_during_the_purge_is_kept(storage: Storage) -> None:
    study = add_study(storage, "AGAIN", age_days=40)
    series = _series_of(storage, study)[0]
    _store(storage, _dataset(study, series, NM_STORAGE, "AGAIN", "NM", 3), NOW)  # arrives now
    assert purge_study(storage, study, cutoff=NOW - 30 * DAY) == "received again since the purge started"


@pytest.mark.parametrize("purge_slips_in", ["before the receiver indexes", "after the receiver indexes"])
def test_an_instance_re_sent_while_its_old_study_is_purged_keeps_its_file(
    storage: Storage, purge_slips_in: str
) -> None:
    """The receiver writes (or finds identical) bytes, then indexes; the purge deletes rows, then files."""
    study = add_study(storage, "RACE", age_days=40)
    series = _series_of(storage, study)[0]
    first = storage.index.instances_for_series(series)[0]
    ds = dcmread(storage.layout.resolve(first.path))
    remover = _FileRemover(storage, PurgeReport(cutoff=NOW - 30 * DAY, dry_run=False))

    def purge_now() -> None:
        outcome = purge_study(storage, study, cutoff=NOW - 30 * DAY)
        assert not isinstance(outcome, str)
        remover.remove_study_files(study, *outcome)

    add_instance = storage.index.add_instance
    if purge_slips_in == "before the receiver indexes":  # the file is unlinked before the row is back
        storage.index.add_instance = lambda record: (purge_now(), add_instance(record))[1]  # type: ignore[method-assign]
        _store(storage, ds, NOW)
    else:  # the rows are deleted, the re-send is indexed, then the purge reaches the files
        outcome = purge_study(storage, study, cutoff=NOW - 30 * DAY)
        assert not isinstance(outcome, str)
        _store(storage, ds, NOW)
        remover.remove_study_files(study, *outcome)
    record = storage.index.instance(str(ds.SOPInstanceUID))
    assert record is not None and storage.layout.resolve(record.path).is_file()


def test_purge_refuses_a_negative_period(storage: Storage) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        purge(storage, -1.0)


def _find_studies(port: int) -> set[str]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPECTNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = set()
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
            found.add(str(identifier.StudyInstanceUID))
    assoc.release()
    return found


def test_removed_study_is_no_longer_found_by_c_find(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node")
    with Storage.open(config.storage.root) as storage:
        old = add_study(storage, "OLD", age_days=40)
        recent = add_study(storage, "NEW", age_days=1)
    node = Node.start(config, load_model=False)
    try:
        assert _find_studies(node.port) == {old, recent}
        report = purge(node.storage, 30 * DAY)  # while the node runs, on its own storage object
        assert [s.study_instance_uid for s in report.removed] == [old]
        assert _find_studies(node.port) == {recent}
    finally:
        node.stop()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = spect_node(["purge", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    with Storage.open(root) as storage:
        old = add_study(storage, "OLD", age_days=40)
        held = add_study(storage, "HELD", age_days=40, delivery="retrying")
        recent = add_study(storage, "NEW", age_days=1)
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  root: {root}\n  retention_days: 30\n")
    no_period = tmp_path / "no-period.yaml"
    no_period.write_text(f"storage:\n  root: {root}\n")

    code, out, err = _cli(capsys, "--config", str(no_period))
    assert code == 2 and "no retention period" in err and "storage.retention_days" in err

    code, out, _ = _cli(capsys, "--config", str(config), "--dry-run")
    assert code == 0
    assert f"would remove study {old}" in out and "patient OLD, 3 instance(s)" in out
    assert f"kept study {held}: delivery" in out and recent not in out
    assert "purge (dry run): would remove 1 study (3 instance(s)" in out
    with Storage.open(root) as storage:
        assert counts(storage)["instances"] == 9

    code, out, _ = _cli(capsys, "--config", str(config), "--older-than", "0.5")  # the flag wins over the file
    assert code == 0
    assert f"removed study {old}" in out and f"removed study {recent}" in out and f"kept study {held}" in out
    assert "purge: removed 2 studies (6 instance(s)" in out and "(0.5 days); kept 1" in out
    with Storage.open(root) as storage:
        assert counts(storage)["instances"] == 3
    purged = [e for e in read_audit(root / "audit.jsonl") if e["event"] == "study-purged"]
    assert sorted(e["study_instance_uid"] for e in purged) == sorted([old, recent])  # the dry run audited nothing

    code, out, _ = _cli(capsys, "--config", str(config))
    assert code == 0 and "removed 0 studies" in out

    for bad in ("-3", "0"):  # 0 days would remove every finished study: refused, as storage.retention_days=0 is
        code, _, err = _cli(capsys, "--config", str(config), "--older-than", bad)
        assert code == 2 and "must be a number of days > 0" in err

    code, _, err = _cli(capsys, "--set", f"storage.root={tmp_path / 'nothing'}", "--older-than", "1")
    assert code == 2 and "nothing is stored there" in err and not (tmp_path / "nothing").exists()
    for command in (["status"], ["results"], ["resend", "--all-failed"], ["reprocess", "1.2.3"]):
        assert spect_node([*command, "--set", f"storage.root={tmp_path / 'nothing'}"]) == 2
        assert "nothing is stored there" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


def test_running_node_applies_the_retention_period_itself(tmp_path: Path) -> None:
    """With ``storage.retention_days`` set the node purges on its own: shortly after the start, then periodically."""
    config = node_config(tmp_path / "node", "storage.retention_days=30", "storage.purge_every_hours=0.0003")
    with Storage.open(config.storage.root) as storage:
        old = add_study(storage, "OLD", age_days=40)
        held = add_study(storage, "HELD", age_days=40, delivery="retrying")
        recent = add_study(storage, "NEW", age_days=1)
    node = Node.start(config, load_model=False)
    try:  # the first purge may come before a first query could see the old study: wait for its absence
        deadline = time.monotonic() + 30
        while old in _find_studies(node.port) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _find_studies(node.port) == {held, recent}
    finally:
        node.stop()
    purged = [e for e in read_audit(config.storage.root / "audit.jsonl") if e["event"] == "study-purged"]
    assert [(e["study_instance_uid"], e["patient_id"], e["by"]) for e in purged] == [(old, "OLD", "node")]
    with Storage.open(config.storage.root) as storage:
        assert counts(storage)["instances"] == 6  # the held and the recent study, 3 instances each


def test_node_without_a_retention_period_keeps_everything(tmp_path: Path) -> None:
    config = node_config(tmp_path / "node", "storage.purge_every_hours=0.0003")
    with Storage.open(config.storage.root) as storage:
        old = add_study(storage, "OLD", age_days=4000)
    node = Node.start(config, load_model=False)
    try:
        assert not any(t.name == "spect-node-retention" for t in node.threads)
        time.sleep(2.5)  # more than two purge intervals
        assert _find_studies(node.port) == {old}
    finally:
        node.stop()


def test_cli_purge_names_a_file_it_cannot_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    with Storage.open(root) as storage:
        old = add_study(storage, "OLD", age_days=40)
        source = next(s for s in _series_of(storage, old) if storage.layout.nifti_path(s).exists())
        stuck = storage.layout.nifti_path(source)
        stored = study_files(storage, old)
    stuck.unlink()
    stuck.mkdir()  # in the way of unlink(): a real OSError, whoever runs the test (root ignores chmod)
    (stuck / "inside").write_bytes(b"x")
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  root: {root}\n  retention_days: 30\n")

    code, out, err = _cli(capsys, "--config", str(config))
    assert code == 1 and "removed 1 study" in out
    assert f"spect-node purge: error: {stuck}" in err
    assert stored and not any(path.exists() for path in stored if path != stuck)  # the rest of the study went
    with Storage.open(root) as storage:
        assert counts(storage)["instances"] == 0
