"""Sending DICOM files to a peer (C-STORE SCU): the node's results and the user-side sender."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from tqdm import tqdm

from node.network import NODELAY_HANDLERS, PeerAddress, configure_timeouts
from node.response_guard import keep_responses_for_the_caller

log = logging.getLogger(__name__)

SUCCESS = 0x0000
_MAX_CONTEXTS = 128


def stored(status: int) -> bool:
    """Whether a C-STORE status means the peer kept the object: success, or a warning.

    PS3.4 B.2.3: the warnings 0xB000 (elements coerced), 0xB006 (elements discarded) and
    0xB007 (data set does not match the SOP class) all mean the object was stored.
    """
    return status == SUCCESS or status & 0xF000 == 0xB000


@dataclass(frozen=True)
class Timeouts:
    """Association, DIMSE and network timeouts (s) and the maximum PDU size (0 = unlimited)."""

    acse: float = 30.0
    dimse: float = 30.0
    network: float = 60.0
    maximum_pdu_size: int = 0


@dataclass
class SendOutcome:
    """What a C-STORE session achieved.

    ``statuses`` maps each SOP Instance UID to the peer's status (absent when not sent);
    ``error`` says why the association failed, if it did.
    """

    statuses: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def all_succeeded(self) -> bool:
        """Every object sent and stored by the peer (success or a warning status)."""
        return self.error is None and bool(self.statuses) and all(stored(s) for s in self.statuses.values())

    @property
    def n_failed(self) -> int:
        return sum(1 for s in self.statuses.values() if not stored(s))


def read_for_sending(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files, raising ``ValueError`` naming the first unreadable file."""
    datasets = []
    for path in paths:
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            raise ValueError(f"{path}: not a readable DICOM file: {exc}") from exc
    return datasets


def _contexts(datasets: Sequence[Dataset]) -> list:
    pairs: dict[str, set[str]] = {}
    for ds in datasets:
        syntaxes = pairs.setdefault(str(ds.SOPClassUID), set())
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    contexts = []
    for sop_class, syntaxes in pairs.items():
        wanted = sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        contexts.append(build_context(sop_class, wanted))
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"too many SOP classes for one association ({len(contexts)} > {_MAX_CONTEXTS})")
    return contexts


def send_datasets(
    datasets: Sequence[Dataset],
    peer: PeerAddress,
    calling_ae_title: str,
    timeouts: Timeouts = Timeouts(),
    progress: bool = False,
    tls_args: tuple | None = None,
) -> SendOutcome:
    """C-STORE each dataset to ``peer`` over one association.

    Returns
    -------
    SendOutcome
        Per-instance statuses; a failed association or a network error is reported in
        ``error`` (nothing is raised), so callers can retry.
    """
    outcome = SendOutcome()
    if not datasets:
        return outcome
    ae = configure_timeouts(
        AE(ae_title=calling_ae_title), timeouts.acse, timeouts.dimse, timeouts.network, timeouts.maximum_pdu_size
    )
    ae.requested_contexts = _contexts(datasets)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=NODELAY_HANDLERS, tls_args=tls_args)
    if not assoc.is_established:
        outcome.error = f"association with {peer} failed (rejected, aborted or unreachable)"
        return outcome
    keep_responses_for_the_caller(assoc)  # pynetdicom's response race: no lost C-STORE response, no double SEG
    try:
        for ds in tqdm(datasets, desc=f"C-STORE -> {peer.ae_title}", unit="inst", disable=not progress):
            status = assoc.send_c_store(ds)
            uid = str(ds.SOPInstanceUID)
            if not status or "Status" not in status:
                outcome.error = f"no C-STORE response from {peer} for {uid} (timeout or abort)"
                break
            outcome.statuses[uid] = int(status.Status)
            if int(status.Status) != SUCCESS:
                kept = "stored with a warning" if stored(int(status.Status)) else "not stored"
                log.warning("%s answered 0x%04X for %s (%s)", peer, int(status.Status), uid, kept)
    except (OSError, RuntimeError, ValueError) as exc:
        outcome.error = f"sending to {peer} failed: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def send_files(
    paths: Sequence[Path],
    peer: PeerAddress,
    calling_ae_title: str,
    timeouts: Timeouts = Timeouts(),
    progress: bool = False,
    tls_args: tuple | None = None,
) -> SendOutcome:
    """Read ``paths`` and :func:`send_datasets` them."""
    return send_datasets(read_for_sending(paths), peer, calling_ae_title, timeouts, progress, tls_args)
