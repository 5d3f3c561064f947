"""Delivering SEG results to the configured peers, with retries that survive restarts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from node.audit import AuditLog
from node.network import PeerAddress
from node.scu import Timeouts, send_files
from storage import DeliveryRecord, Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts, up to a count and a time window."""

    max_attempts: int = 10
    window_s: float = 3600.0
    base_s: float = 2.0
    max_s: float = 300.0


class ResultSender:
    """Sends due deliveries (one C-STORE association per delivery) until stopped.

    Parameters
    ----------
    peers
        AE title -> address of every destination.
    audit
        Where each SEG sent (or given up on) is recorded.
    """

    def __init__(
        self,
        storage: Storage,
        peers: Mapping[str, PeerAddress],
        calling_ae_title: str,
        timeouts: Timeouts,
        policy: RetryPolicy,
        audit: AuditLog | None = None,
    ) -> None:
        self.storage = storage
        self.peers = dict(peers)
        self.calling_ae_title = calling_ae_title
        self.timeouts = timeouts
        self.policy = policy
        self.audit = audit or AuditLog(None)
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # set when a result awaits delivery (and on stop)

    def run(self, poll_interval: float = 0.5) -> None:
        """Deliver until :attr:`stop_event` is set; sleeps until woken or a retry may be due."""
        while not self.stop_event.is_set():
            self.wake.clear()
            try:
                if not self.send_due():
                    self.wake.wait(poll_interval)
            except Exception:  # the index unavailable, say: log it and go on; the sender never dies
                log.exception("result sender loop error")
                self.stop_event.wait(poll_interval)

    def send_due(self, now: float | None = None) -> int:
        """Attempt every delivery that is due now; returns how many were attempted.

        Stops early when :attr:`stop_event` is set: the deliveries claimed and not yet
        attempted stay ``sending`` and are requeued when the node starts again.
        """
        deliveries = self.storage.index.claim_due_deliveries(now=now if now is not None else time.time())
        attempted = 0
        for delivery in deliveries:
            if self.stop_event.is_set():
                log.info("stopping: %d claimed delivery(ies) left for the next start", len(deliveries) - attempted)
                break
            self.attempt(delivery)
            attempted += 1
        return attempted

    def attempt(self, delivery: DeliveryRecord) -> bool:
        """One C-STORE attempt of one delivery; records success or schedules the retry."""
        index = self.storage.index
        result = index.result(delivery.result_id)
        peer = self.peers.get(delivery.peer_ae_title)
        if result is None or peer is None:
            error = "result not found" if result is None else f"peer {delivery.peer_ae_title} is not configured"
            index.mark_delivery(delivery.id, success=False, error=error, max_attempts=1)
            log.error("delivery %d failed: %s", delivery.id, error)
            return False
        try:
            outcome = send_files(
                [self.storage.layout.resolve(result.path)],
                peer,
                self.calling_ae_title,
                self.timeouts,
                tls_args=peer.tls_args,
            )
            error = outcome.failure()
        except Exception as exc:  # an unreadable SEG file, say: a failed attempt, retried by the policy
            log.exception("delivery %d: cannot send", delivery.id)
            error = f"{type(exc).__name__}: {exc}"
        record = index.mark_delivery(
            delivery.id,
            success=error is None,
            error=error,
            base_s=self.policy.base_s,
            max_s=self.policy.max_s,
            max_attempts=self.policy.max_attempts,
            retry_window_s=self.policy.window_s,
        )
        self.audit.record(
            "seg-sent" if error is None else "seg-send-failed",
            destination=str(peer),
            seg_sop_instance_uid=result.seg_sop_instance_uid,
            study_instance_uid=result.study_instance_uid,
            attempt=record.attempts,
            state=str(record.state),
            error=error,
        )
        if error is None:
            log.info(
                "SEG %s sent to %s (study=%s series=%s)",
                result.seg_sop_instance_uid,
                peer,
                result.study_instance_uid,
                result.source_series_instance_uid,
            )
        else:
            log.warning(
                "SEG %s to %s: attempt %d failed: %s (now %s)",
                result.seg_sop_instance_uid,
                peer,
                record.attempts,
                error,
                record.state,
            )
        return error is None
