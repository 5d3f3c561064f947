"""The node as a service: start, serve, stop accepting on SIGTERM, drain, exit.

Threads: pynetdicom's association threads (receive only), one segmentation worker
(inference serialised), one result sender, one series-assembly sweeper, and with
``storage.retention_days`` set one retention thread (a purge shortly after the start,
then every ``storage.purge_every_hours``).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from dataclasses import dataclass, field

from pynetdicom import _config as pynetdicom_config
from pynetdicom.transport import ThreadedAssociationServer

from config import AppConfig
from node.audit import AuditLog, record_study_purged
from node.network import PeerAddress, configure_timeouts
from node.policy import AccessPolicy, PeerRule
from node.receiver import Receiver
from node.scp import build_ae, server_handlers
from node.scu import Timeouts
from node.sender import ResultSender, RetryPolicy
from node.tls import client_context, server_context
from node.worker import SegmentationWorker, WorkerSettings
from seg.postprocess import PostprocessSettings
from seg.predictor import Predictor
from storage import Storage
from storage.retention import SECONDS_PER_DAY, StudySummary, purge

log = logging.getLogger(__name__)


def node_timeouts(config: AppConfig) -> Timeouts:
    """The configured association/DIMSE/network timeouts and PDU size."""
    node = config.node
    return Timeouts(node.acse_timeout, node.dimse_timeout, node.network_timeout, node.maximum_pdu_size)


class PredictorHolder:
    """Loads the model once (at start-up) and hands it to the worker.

    A model that cannot be loaded is remembered as an error: each job then fails with
    that reason, and the node keeps receiving.
    """

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._predictor: Predictor | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            model = self.config.model
            try:
                self._predictor = Predictor.from_file(
                    model.weights,
                    postprocess=PostprocessSettings(**self.config.postprocess.model_dump()),
                    device=model.device,
                    precision=model.precision,
                    seed_target_shape=self.config.preprocess.target_shape,
                ).warm_up()
                self._error = None
                log.info("model %s loaded from %s", self._predictor.description, model.weights)
            except Exception as exc:  # any load failure: jobs fail with the reason, receiving goes on
                self._predictor = None
                self._error = f"model unavailable ({model.weights}): {exc}"
                log.error("%s", self._error)

    @property
    def error(self) -> str | None:
        """Why the model could not be loaded (None when loaded or not tried yet)."""
        return self._error

    def __call__(self) -> Predictor:
        if self._predictor is None:
            self.load()
        if self._predictor is None:
            raise RuntimeError(self._error or "model unavailable")
        return self._predictor


@dataclass
class Node:
    """One running node (build with :meth:`start`)."""

    config: AppConfig
    storage: Storage
    server: ThreadedAssociationServer
    worker: SegmentationWorker
    sender: ResultSender
    receiver: Receiver
    audit: AuditLog
    model: PredictorHolder
    threads: list[threading.Thread] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        """The port actually listened on (useful with ``node.port: 0``)."""
        return int(self.server.server_address[1])

    @classmethod
    def start(cls, config: AppConfig, load_model: bool = True) -> Node:
        """Open storage (re-queueing work a crash left running), load the model, start serving."""
        node_cfg = config.node
        # pynetdicom writes Q/R identifiers (patient IDs and names) to its INFO log unless told not to;
        # they belong in the audit log only
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        # certificates first: a TLS file that cannot be used stops the start, naming the file
        listening_tls = server_context(node_cfg.tls)
        outgoing_tls = client_context(node_cfg.tls) if any(p.tls for p in config.peers) else None
        storage = Storage.open(
            config.storage.root,
            min_free_bytes=node_cfg.min_free_bytes,
            recover=True,
            job_max_attempts=node_cfg.job_max_attempts,
        )
        try:
            return cls._start_serving(config, storage, listening_tls, outgoing_tls, load_model)
        except BaseException:
            storage.close()
            raise

    @classmethod
    def _start_serving(
        cls,
        config: AppConfig,
        storage: Storage,
        listening_tls: ssl.SSLContext | None,
        outgoing_tls: ssl.SSLContext | None,
        load_model: bool,
    ) -> Node:
        """Everything after the storage is open (the caller closes it if this raises)."""
        node_cfg = config.node
        predictor = PredictorHolder(config)
        if load_model:
            predictor.load()
        destinations = tuple(p.ae_title for p in config.peers if p.send_results)
        cleanup = contextlib.ExitStack()  # what to undo if the start fails half-way
        audit = AuditLog(node_cfg.audit_log or config.storage.root / "audit.jsonl", fsync=node_cfg.audit_fsync)
        cleanup.callback(audit.close)
        with cleanup:
            policy = AccessPolicy(
                [PeerRule(p.ae_title, p.host, frozenset(p.services), p.check_host) for p in config.peers],
                node_cfg.unlisted_services,
            )
            worker = SegmentationWorker(
                storage,
                predictor,
                WorkerSettings(
                    accept_pet_like=node_cfg.accept_pet_like,
                    seg_series_number=node_cfg.seg_series_number,
                    seg_series_description=node_cfg.seg_series_description,
                    destinations=destinations,
                    pause_at=node_cfg.test_pause_at,
                    max_attempts=node_cfg.job_max_attempts,
                    retry_delay_s=node_cfg.job_retry_delay,
                ),
                worker_id=f"{node_cfg.ae_title}-worker",
                audit=audit,
            )
            peers = {
                p.ae_title: PeerAddress(
                    p.ae_title, p.host, p.port, (outgoing_tls, p.host) if p.tls and outgoing_tls is not None else None
                )
                for p in config.peers
            }
            sender = ResultSender(
                storage,
                peers,
                node_cfg.ae_title,
                node_timeouts(config),
                RetryPolicy(
                    node_cfg.send_max_attempts,
                    node_cfg.send_retry_window,
                    node_cfg.send_backoff_base,
                    node_cfg.send_backoff_max,
                ),
                audit=audit,
            )
            worker.on_result = sender.wake.set
            receiver = Receiver(storage, on_job_queued=worker.wake.set, audit=audit)
            ae = build_ae(node_cfg.ae_title, node_cfg.max_associations, node_cfg.allowed_calling_ae_titles)
            t = node_timeouts(config)
            configure_timeouts(ae, t.acse, t.dimse, t.network, t.maximum_pdu_size)
            try:
                server = ae.start_server(
                    (node_cfg.host, node_cfg.port),
                    block=False,
                    evt_handlers=server_handlers(receiver, storage, peers, policy, audit, tls_handshake_timeout=t.acse),
                    ssl_context=listening_tls,
                )
            except OSError as exc:  # the port is taken, or the host is not an address of this machine
                raise OSError(
                    f"{node_cfg.host}:{node_cfg.port}: cannot listen for DICOM associations (node.host, node.port): "
                    f"{exc.strerror or exc}"
                ) from exc
            cleanup.callback(server.shutdown)
            node = cls(config, storage, server, worker, sender, receiver, audit, predictor)
            node._start_threads()
            cleanup.pop_all()  # started: from now on Node.stop() undoes it all
        log.info(
            "node %s listening on %s:%d%s (storage %s)",
            node_cfg.ae_title,
            node_cfg.host,
            node.port,
            " (DICOM TLS)" if listening_tls is not None else "",
            config.storage.root,
        )
        return node

    def _start_threads(self) -> None:
        idle, incomplete = self.config.node.series_idle_timeout, self.config.node.series_incomplete_timeout

        def sweep() -> None:
            while not self.stop_event.wait(min(1.0, idle / 4)):
                try:
                    self.receiver.sweep_idle(idle, incomplete_timeout=incomplete)
                except Exception:  # keep sweeping; the next round retries
                    log.exception("series sweep failed")

        services = [("worker", self.worker.run), ("sender", self.sender.run), ("sweeper", sweep)]
        storage_cfg = self.config.storage
        if storage_cfg.retention_days is not None and storage_cfg.purge_every_hours is not None:
            services.append(("retention", self._retention))
        for name, target in services:
            thread = threading.Thread(target=target, name=f"spect-node-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _retention(self) -> None:
        """Apply ``storage.retention_days`` shortly after the start, then every ``purge_every_hours``."""
        days, hours = self.config.storage.retention_days, self.config.storage.purge_every_hours
        assert days is not None and hours is not None
        interval = hours * 3600.0

        def audited(study: StudySummary, _dry_run: bool) -> None:
            record_study_purged(self.audit, study, days, by="node")

        wait = min(interval, 60.0)  # a node restarted more often than the interval still purges
        while not self.stop_event.wait(wait):
            wait = interval
            try:
                report = purge(self.storage, days * SECONDS_PER_DAY, on_study=audited)
            except Exception:  # keep the node serving; the next round retries
                log.exception("retention purge failed; next try in %g h", hours)
                continue
            if report.removed or report.file_errors:
                log.info(
                    "retention (%g days): removed %d studies (%d instances), kept %d (work in flight), %d file errors",
                    days,
                    len(report.removed),
                    report.instances_removed,
                    len(report.held),
                    len(report.file_errors),
                )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting associations, let the job in hand finish, stop the threads, close storage."""
        log.info("stopping: no new associations; finishing the job in hand")
        self.server.shutdown()
        self.stop_event.set()
        for service in (self.worker, self.sender):
            service.stop_event.set()
            service.wake.set()
        for thread in self.threads:
            thread.join(timeout)
        self.storage.close()
        self.audit.close()
        log.info("stopped")
