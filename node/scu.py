"""Sending DICOM files to a peer (C-STORE SCU): the node's results and the user-side sender."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
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

    def failure(self) -> str | None:
        """Why not everything was stored, statuses in hex (``"... answered 0xA700 ..."``); None if it was."""
        if self.all_succeeded:
            return None
        if self.error is not None:
            return self.error
        refused = [f"0x{status:04X} for {uid}" for uid, status in self.statuses.items() if not stored(status)]
        return f"peer answered {', '.join(refused)} (not stored)" if refused else "nothing was sent"


class NotSendableError(ValueError):
    """A file that is not meant to be sent: not DICOM at all (no Part 10 header), or a DICOMDIR."""


_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (a DICOMDIR)


def read_sendable(path: Path) -> Dataset:
    """Read one file to send.

    Raises
    ------
    NotSendableError
        Not a DICOM file, or a DICOMDIR: what an export folder holds besides its instances.
    ValueError
        A DICOM file that cannot be sent: damaged (cut short, say) or without SOP Class
        and Instance UIDs; or unreadable (``OSError``). Each message names the file.
    """
    try:
        ds = dcmread(path)
    except InvalidDicomError as exc:  # pydicom's text says "use force=True": not for a user
        raise NotSendableError(f"{path}: not a DICOM file (no Part 10 header)") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises many kinds for a damaged file
        raise ValueError(f"{path}: damaged DICOM file ({type(exc).__name__}: {exc})") from exc
    if str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY:
        raise NotSendableError(f"{path}: a DICOMDIR (an index of the export, not an instance)")
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise ValueError(f"{path}: DICOM file without SOP Class/Instance UID (cut short?)")
    return ds


def read_for_sending(paths: Iterable[Path]) -> list[Dataset]:
    """Read DICOM files, raising ``ValueError`` naming the first one that cannot be sent."""
    return [read_sendable(path) for path in paths]


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, in name order; a sub-folder that cannot be listed is an error."""

    def refuse(exc: OSError) -> None:
        raise ValueError(f"{exc.filename}: cannot list the folder: {exc.strerror or exc}") from exc

    found = [Path(top) / name for top, _, names in os.walk(folder, onerror=refuse) for name in names]
    return sorted(p for p in found if p.is_file())


@dataclass
class FilesToSend:
    """What ``spect-node send`` found: the instances to send and the non-DICOM files skipped in folders."""

    datasets: list[Dataset]
    skipped: list[Path]


def collect_for_sending(paths: Sequence[Path]) -> FilesToSend:
    """Read the files named and those in the folders named (recursively, in name order).

    Export folders hold other files too (a README, a viewer, a DICOMDIR): such a file in a
    folder is skipped with a warning naming it. A file named explicitly must be an
    instance, and a damaged DICOM file stops everything (nothing is sent): a series sent
    without one of its instances is worse than one not sent.

    Raises
    ------
    FileNotFoundError
        A path that is neither a file nor a folder.
    ValueError
        A file named explicitly that is not a DICOM instance, a file or folder that
        cannot be read, a damaged DICOM file, or no DICOM instance at all among ``paths``.
    """
    datasets: list[Dataset] = []
    skipped: list[Path] = []
    for path in paths:
        if path.is_dir():
            for candidate in _files_under(path):
                try:
                    datasets.append(read_sendable(candidate))
                except NotSendableError as exc:
                    log.warning("skipped %s", exc)
                    skipped.append(candidate)
        elif path.is_file():
            datasets.append(read_sendable(path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not datasets:
        named = ", ".join(str(p) for p in paths)
        raise ValueError(
            f"no DICOM instance to send in {named}" + (f" ({len(skipped)} non-DICOM file(s))" if skipped else "")
        )
    return FilesToSend(datasets, skipped)


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


class _AssociationTrace:
    """Event handlers noting how far an association request got, to say why it failed.

    Read from the events themselves: when a peer rejects and closes at once, pynetdicom
    may report the association aborted rather than rejected.
    """

    def __init__(self) -> None:
        self.connected = False
        self.accepted = False
        self.rejection: str | None = None

    def on_connection_open(self, event: evt.Event) -> None:
        self.connected = True

    def on_pdu_received(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_AC):
            self.accepted = True
        elif isinstance(event.pdu, A_ASSOCIATE_RJ):
            primitive = event.pdu.to_primitive()
            self.rejection = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"

    def handlers(self) -> list:
        return [(evt.EVT_CONN_OPEN, self.on_connection_open), (evt.EVT_PDU_RECV, self.on_pdu_received)]

    def failure(self, peer: PeerAddress, rejected: bool) -> str:
        """Why the association with ``peer`` was not established."""
        if self.rejection is not None or rejected:
            return f"association rejected by {peer} ({self.rejection or 'no reason received'})"
        if not self.connected:
            return f"cannot connect to {peer} (nothing listening there, or unreachable)"
        if self.accepted:
            return f"{peer} accepted none of the presentation contexts (SOP class / transfer syntax) offered"
        return f"no association answer from {peer} (it closed the connection, or timed out)"


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
    trace = _AssociationTrace()
    handlers = [*NODELAY_HANDLERS, *trace.handlers()]
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers, tls_args=tls_args)
    if not assoc.is_established:
        outcome.error = trace.failure(peer, assoc.is_rejected)
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
