"""The segmentation worker: claims jobs, converts, segments, encodes the SEG, queues deliveries.

Runs on its own thread, never on an association thread. Every state change is a row
in the index, so a node killed at any point restarts and finishes what it had
accepted. The SEG's UIDs derive from the job, so a job re-run after a crash builds
the same SOP Instance UID and a PACS keeps one object.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.audit import AuditLog
from node.convert import is_reconstructed_emission, series_to_nifti
from node.errors import InvalidSeriesError, UnsupportedSeriesError
from node.seg_encode import build_seg, with_research_marking
from seg.predictor import Predictor
from seg.preprocess import voxel_spacing
from storage import Job, JobState, JobTimings, NewResult, Storage, StorageError
from storage.errors import InvalidUIDError, JobStateError, RecordNotFoundError

log = logging.getLogger(__name__)


class NoMyocardiumError(Exception):
    """The network found no myocardium in a series it could read: the job fails, without a SEG."""


STAGES = ("convert", "infer", "encode", "send")
RESEARCH_CONTENT = "LV myocardium by spect-node; RESEARCH USE ONLY - NOT FOR CLINICAL DIAGNOSIS"


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs from the configuration.

    A job failing on storage (:func:`is_transient`) is retried after ``retry_delay_s``,
    doubled at each attempt, until it has run ``max_attempts`` times. ``pause_at`` is a
    test-only hook: the worker blocks at that stage of every job (so a test can kill the
    node there); never set it in production.
    """

    accept_pet_like: bool
    seg_series_number: int
    seg_series_description: str
    destinations: tuple[str, ...]
    pause_at: str | None = None
    max_attempts: int = 3
    retry_delay_s: float = 30.0


def is_transient(exc: BaseException) -> bool:
    """Whether a job failing with ``exc`` may succeed later: the disk full or below the
    watermark, an I/O error, the index busy. Not: a bad UID, a job or record the index
    does not know, or anything about the data or the model."""
    if isinstance(exc, InvalidUIDError | JobStateError | RecordNotFoundError):
        return False
    return isinstance(exc, StorageError | OSError)


def seg_uids(job: Job) -> tuple[str, str]:
    """SEG SOP Instance and Series Instance UIDs, fixed by the job (same job, same UIDs)."""
    sources = [job.series_instance_uid, str(job.id), str(job.created_at)]
    return (
        generate_uid(entropy_srcs=["seg-instance", *sources]),
        generate_uid(entropy_srcs=["seg-series", *sources]),
    )


class SegmentationWorker:
    """Processes queued jobs one at a time (inference is serialised).

    Parameters
    ----------
    storage
        Files and index.
    predictor_factory
        Returns the loaded :class:`~seg.predictor.Predictor` (raises if the model is unusable:
        the job fails with the reason and the node keeps receiving).
    settings
        SEG identity, destinations and the test-only pause.
    worker_id
        Name under which jobs are claimed.
    audit
        Where each job's outcome is recorded, with its patient.
    """

    def __init__(
        self,
        storage: Storage,
        predictor_factory: Callable[[], Predictor],
        settings: WorkerSettings,
        worker_id: str,
        audit: AuditLog | None = None,
    ) -> None:
        self.storage = storage
        self.predictor_factory = predictor_factory
        self.settings = settings
        self.worker_id = worker_id
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # set when a job is queued (and on stop)
        self.on_result: Callable[[], None] = lambda: None  # called when a SEG awaits delivery
        self.audit = audit or AuditLog(None)

    def _pause(self, stage: str) -> None:
        if self.settings.pause_at == stage:
            log.warning("test-only pause at stage %r (node.test_pause_at)", stage)
            while not self.stop_event.wait(3600):
                pass

    def run(self, poll_interval: float = 1.0) -> None:
        """Claim and process jobs until :attr:`stop_event` is set (the job in hand is finished).

        Sleeps until :attr:`wake` is set or ``poll_interval`` passes (jobs a restart re-queued,
        or queued by another process such as ``spect-node reprocess``). An error outside a
        job's own processing (the index unavailable, say) is logged and the loop goes on
        after ``poll_interval``: the worker thread never dies while the node receives.
        """
        while not self.stop_event.is_set():
            self.wake.clear()
            job: Job | None = None
            try:
                job = self.storage.index.claim_job(self.worker_id)
                if job is None:
                    self.wake.wait(poll_interval)
                    continue
                state = self.process(job)
                if state == JobState.QUEUED:  # to be retried: no outcome yet
                    continue
                self._audit_result(job)
                if state == JobState.DONE:
                    self.on_result()
            except Exception as exc:  # keep the worker alive; the job, if any, is failed below
                log.exception("worker loop error%s", "" if job is None else f" on job {job.id}")
                if job is not None:
                    self._fail_if_running(job, f"worker error: {type(exc).__name__}: {exc}")
                self.stop_event.wait(poll_interval)

    def _fail_if_running(self, job: Job, reason: str) -> None:
        """Best effort: mark ``job`` failed unless it already reached a final state."""
        try:
            current = self.storage.index.job(job.id)
            if current is not None and current.state in (JobState.RUNNING, JobState.QUEUED):
                self.storage.index.finish_job(job.id, JobState.FAILED, reason=reason)
        except Exception:  # the index itself is failing: a restart requeues the job
            log.exception("could not record the failure of job %d", job.id)

    def _audit_result(self, job: Job) -> None:
        index = self.storage.index
        final = index.job(job.id)
        result = index.result_for_job(job.id)
        records = index.instances_for_series(job.series_instance_uid)
        first = records[0] if records else None
        self.audit.record(
            "job-result",
            job_id=job.id,
            state=None if final is None else str(final.state),
            reason=None if final is None else final.reason,
            patient_id=None if first is None else first.patient_id,
            study_instance_uid=None if first is None else first.study_instance_uid,
            series_instance_uid=job.series_instance_uid,
            seg_sop_instance_uid=None if result is None else result.seg_sop_instance_uid,
        )

    def process(self, job: Job) -> JobState:
        """Run one job to a final state (done, skipped or failed).

        A series that is not for the node (:class:`~node.errors.UnsupportedSeriesError`)
        is ``skipped``; one that cannot be converted
        (:class:`~node.errors.InvalidSeriesError`) or any other error, a missing or
        corrupt model included, makes the job ``failed`` with ``"<error type>: <message>"``
        as its reason. The instances stay stored and no SEG is made. A storage failure
        (:func:`is_transient`) puts the job back in the queue (``queued`` is returned)
        until its last attempt. Raises only if the index cannot record the outcome
        (:meth:`run` then fails the job).
        """
        index = self.storage.index
        series = job.series_instance_uid
        try:
            existing = index.result_for_job(job.id)
            if existing is not None:  # crashed after the SEG was recorded: nothing to redo
                index.finish_job(job.id, JobState.DONE)
                return JobState.DONE
            datasets = self._load(series)
            accepted, reason = is_reconstructed_emission(datasets[0], accept_pet_like=self.settings.accept_pet_like)
            if not accepted:
                log.info("job %d series=%s skipped: %s", job.id, series, reason)
                index.finish_job(job.id, JobState.SKIPPED, reason=reason)
                return JobState.SKIPPED
            return self._segment(job, datasets)
        except UnsupportedSeriesError as exc:
            log.info("job %d series=%s skipped: %s", job.id, series, exc)
            index.finish_job(job.id, JobState.SKIPPED, reason=str(exc))
            return JobState.SKIPPED
        except (InvalidSeriesError, NoMyocardiumError) as exc:  # the reason says it all, no traceback
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("job %d series=%s failed: %s", job.id, series, reason)
            index.finish_job(job.id, JobState.FAILED, reason=reason)
            return JobState.FAILED
        except Exception as exc:  # a job fails with its reason; the node keeps running
            reason = f"{type(exc).__name__}: {exc}"
            if is_transient(exc) and job.attempts < self.settings.max_attempts:
                delay = self.settings.retry_delay_s * 2 ** (job.attempts - 1)
                log.warning("job %d series=%s: %s; retried in %.0f s", job.id, series, reason, delay)
                index.requeue_job(job.id, reason, delay_s=delay)
                return JobState.QUEUED
            if is_transient(exc):
                reason += f" (attempt {job.attempts} of {self.settings.max_attempts})"
            log.exception("job %d series=%s failed: %s", job.id, series, reason)
            index.finish_job(job.id, JobState.FAILED, reason=reason)
            return JobState.FAILED

    def _load(self, series_uid: str) -> list[Dataset]:
        records = self.storage.index.instances_for_series(series_uid)
        if not records:
            raise ValueError(f"series {series_uid} has no stored instance")
        return [dcmread(self.storage.layout.resolve(r.path)) for r in records]

    def _segment(self, job: Job, datasets: Sequence[Dataset]) -> JobState:
        series = job.series_instance_uid
        self._pause("convert")
        t0 = time.perf_counter()
        converted = series_to_nifti(datasets)
        nifti_path = self.storage.layout.nifti_path(series)
        nifti_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(converted.image, str(nifti_path))
        t1 = time.perf_counter()
        self._pause("infer")
        predictor = self.predictor_factory()
        prediction = predictor.predict_array(
            np.asarray(converted.image.dataobj, dtype=np.float32), converted.image.affine
        )
        nib.save(
            nib.Nifti1Image(prediction.mask, converted.image.affine),
            str(nifti_path.with_name(nifti_path.name.replace(".nii.gz", "_myocardium.nii.gz"))),
        )
        if prediction.geometry:
            log.warning("series %s: %s", series, prediction.geometry)
        t2 = time.perf_counter()
        if not prediction.mask.any():
            raise NoMyocardiumError("no myocardium found in the volume; no SEG is made")
        self._pause("encode")
        sop_uid, series_uid = seg_uids(job)
        version = str(predictor.checkpoint.provenance.get("code_version", "seed"))
        seg = build_seg(
            datasets,
            prediction.mask,
            converted_series_refs=converted.references,
            series_number=self.settings.seg_series_number,
            series_description=with_research_marking(self.settings.seg_series_description),
            content_description=RESEARCH_CONTENT,
            algorithm_name=f"spect-node UNet3D {predictor.checkpoint.spec.describe(sep='')}",  # "f16", as before depth
            algorithm_version=version[:64],
            manufacturer="spect-node",
            software_versions=version[:64],
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
        )
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        record, _ = self.storage.store_instance(buffer.getvalue(), seg, calling_ae_title=None, is_result=True)
        t3 = time.perf_counter()
        spacing = voxel_spacing(converted.image.affine)
        volume_ml = float(prediction.mask.sum() * np.prod(spacing) / 1000.0)
        self.storage.index.finish_job_with_result(
            NewResult(
                job_id=job.id,
                study_instance_uid=record.study_instance_uid,
                source_series_instance_uid=series,
                seg_sop_instance_uid=sop_uid,
                seg_series_instance_uid=series_uid,
                path=record.path,
                myocardium_volume_ml=round(volume_ml, 2),
                model_name=predictor.description,
                model_version=version,
            ),
            list(self.settings.destinations),
            timings=JobTimings(convert_s=t1 - t0, infer_s=t2 - t1, encode_s=t3 - t2),
        )
        log.info(
            "job %d series=%s done: SEG %s, %.1f mL, convert %.2f s, infer %.2f s, encode %.2f s",
            job.id,
            series,
            sop_uid,
            volume_ml,
            t1 - t0,
            t2 - t1,
            t3 - t2,
        )
        return JobState.DONE
