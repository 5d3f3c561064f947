"""Query/Retrieve SCP: thin C-FIND, C-MOVE and C-GET handlers over the index.

Matching runs in SQL (:meth:`storage.Index.find` / :meth:`storage.Index.retrieve`);
these handlers translate identifiers into :class:`storage.Query` objects and
matches back into identifiers, and read the files to send. They never raise:
a bad identifier is answered with a failure status and a log line.

C-MOVE sends to configured peers only (by AE title), over a sub-association that
pynetdicom opens with the handler's ``(host, port, kwargs)``: the kwargs carry
the presentation contexts of the instances to send, the TCP_NODELAY handler and,
for a peer reached over TLS, its ``tls_args``. A retrieve that is refused (bad
identifier, caller not authorised) still opens (and at once releases) that
sub-association, because pynetdicom asks for the destination and the number of
sub-operations, and associates, before it takes a status (so a refused caller whose
destination is unreachable gets 0xA801 instead of the refusal).

A caller whose peer rule lacks ``query`` or ``retrieve`` (:mod:`node.policy`) is
refused with an Error Comment: C-MOVE and C-GET with 0x0124 (Refused: Not
Authorized), C-FIND with 0xC124 (Failed: Unable to process), as PS3.7 lists "Not
Authorized" among the C-MOVE and C-GET statuses but not among those of C-FIND.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from node.audit import AuditLog, identifier_keys
from node.network import NODELAY_HANDLERS, PeerAddress
from node.policy import AccessPolicy, record_refusal, refuse_unless_allowed
from node.response_guard import GUARD_HANDLERS
from storage import InformationModel, InstanceRecord, Match, Query, QueryError, QueryLevel, Storage, StorageError
from storage.query import UNIQUE_KEYS, supported_keys

log = logging.getLogger(__name__)

# DIMSE statuses of the Query/Retrieve service class (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # pending; one or more optional keys not supported
CANCEL = 0xFE00
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

FIND_MODELS: Mapping[str, InformationModel] = {
    PatientRootQueryRetrieveInformationModelFind: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: InformationModel.STUDY_ROOT,
}
MOVE_MODELS: Mapping[str, InformationModel] = {
    PatientRootQueryRetrieveInformationModelMove: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: InformationModel.STUDY_ROOT,
}
GET_MODELS: Mapping[str, InformationModel] = {
    PatientRootQueryRetrieveInformationModelGet: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelGet: InformationModel.STUDY_ROOT,
}
#: The Query/Retrieve SOP classes the node accepts.
QR_SOP_CLASSES: tuple[str, ...] = (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)

_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
_MAX_CONTEXTS = 128  # presentation contexts one association may propose
# VRs whose values are encoded with the Specific Character Set
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


class IdentifierError(ValueError):
    """The identifier cannot be turned into a query (answered with IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)."""


def query_from_identifier(identifier: Dataset, model: InformationModel) -> Query:
    """Turn a C-FIND/C-MOVE/C-GET identifier into an index query.

    Sequences, private and unknown elements are not matching keys; values
    become DICOM strings (multi-values joined by a backslash).

    Raises
    ------
    IdentifierError
        If the Query/Retrieve Level is missing or unknown.
    QueryError
        If the level is not part of ``model`` (raised by :class:`storage.Query`).
    """
    level_text = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        level = QueryLevel(level_text)
    except ValueError as exc:
        raise IdentifierError(f"QueryRetrieveLevel {level_text!r} is missing or unknown") from exc
    keys: dict[str, str] = {}
    for element in identifier:
        if element.tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET) or element.VR == "SQ":
            continue
        if element.keyword:
            keys[element.keyword] = _as_text(element.value)
    return Query(model, level, keys)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item) for item in value)
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return str(value)


def unsupported_keys(request: Dataset, level: QueryLevel) -> list[str]:
    """Keys of a C-FIND request the index cannot match or return at ``level`` (PS3.4 C.2.2.1.3).

    They are left out of the responses, whose status is then :data:`PENDING_WARNING`.
    Sequences, private and unknown elements are among them.
    """
    supported = supported_keys(level)
    return [
        element.keyword or str(element.tag)
        for element in request
        if element.tag not in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET, _RETRIEVE_AE_TITLE)
        and element.keyword not in supported
    ]


def response_identifier(request: Dataset, query: Query, match: Match, retrieve_ae_title: str) -> Dataset:
    """The C-FIND response identifier of one match.

    Holds the request's supported keys (same tags and VRs) filled from the
    match, empty when the entity has no value; adds the unique keys of the
    query level and the levels above it, Retrieve AE Title (always: the node
    offers no storage media, PS3.4 C.4.1.1.3.2), and Specific Character Set
    (UTF-8) when a value is not ASCII. Unsupported keys
    (:func:`unsupported_keys`) are not returned.
    """
    supported = supported_keys(query.level)
    response = Dataset()
    response.QueryRetrieveLevel = query.level.value
    for element in request:
        if element.keyword in supported:
            response.add_new(element.tag, element.VR, _dicom_value(match.value(element.keyword)))
    response.RetrieveAETitle = retrieve_ae_title
    for level in query.model.levels[: query.model.levels.index(query.level) + 1]:
        keyword = UNIQUE_KEYS[level]
        if keyword not in response:
            setattr(response, keyword, _dicom_value(match.value(keyword)))
    if any(_is_non_ascii_text(element) for element in response):
        response.SpecificCharacterSet = "ISO_IR 192"
    return response


def _is_non_ascii_text(element: DataElement) -> bool:
    if element.VR not in _TEXT_VRS or element.value is None:
        return False
    values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
    return any(not str(value).isascii() for value in values)


def _dicom_value(value: str | int | tuple[str, ...] | None) -> str | int | list[str] | None:
    return list(value) if isinstance(value, tuple) else value


def _refuse(event: evt.Event, audit: AuditLog, service: str, status: int, reason: str, **extra: object) -> int:
    """:func:`~node.policy.record_refusal` of a query or retrieve, with its keys and status; returns ``status``."""
    kind = "query-refused" if service == "C-FIND" else "retrieve-refused"
    keys = identifier_keys(event.identifier)
    record_refusal(event, audit, kind, service, reason, keys=keys, status=f"0x{status:04X}", **extra)
    return status


def _parse(event: evt.Event, models: Mapping[str, InformationModel], service: str, audit: AuditLog) -> Query | int:
    """The query of a request, or the failure status to answer (logged and audited)."""
    model = models.get(str(event.request.AffectedSOPClassUID))
    if model is None:  # cannot happen: pynetdicom routes by SOP class
        return _refuse(event, audit, service, UNABLE_TO_PROCESS, f"SOP class {event.request.AffectedSOPClassUID}")
    try:
        return query_from_identifier(event.identifier, model)
    except (IdentifierError, QueryError) as exc:
        return _refuse(event, audit, service, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except (InvalidDicomError, ValueError, TypeError, AttributeError, KeyError, EOFError) as exc:
        reason = f"cannot decode the identifier ({type(exc).__name__})"
        return _refuse(event, audit, service, UNABLE_TO_PROCESS, reason)


def _audit_request(event: evt.Event, audit: AuditLog, kind: str, dimse: str, count: int, **extra: object) -> None:
    audit.record(
        kind,
        service=dimse,
        calling_ae=event.assoc.requestor.ae_title.strip(),
        address=event.assoc.requestor.address,
        keys=identifier_keys(event.identifier),
        count=count,
        **extra,
    )


def handle_find(
    event: evt.Event, storage: Storage, policy: AccessPolicy, audit: AuditLog
) -> Iterator[tuple[int, Dataset | None]]:
    """``EVT_C_FIND``: yield ``(PENDING, identifier)`` per match; stop with CANCEL on C-CANCEL.

    A caller not allowed to ``query`` gets 0xC124 (Failed: Unable to process) with an Error Comment.
    """
    try:
        if (refused := refuse_unless_allowed(event, policy, audit, "query", "C-FIND")) is not None:
            yield refused, None
            return
        query = _parse(event, FIND_MODELS, "C-FIND", audit)
        if isinstance(query, int):
            yield query, None
            return
        try:
            matches = storage.index.find(query)
        except QueryError as exc:
            yield _refuse(event, audit, "C-FIND", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
            return
        log.info(
            "C-FIND %s %s from %s: %d match(es)",
            query.model,
            query.level,
            event.assoc.requestor.ae_title.strip(),
            len(matches),
        )
        _audit_request(event, audit, "query", "C-FIND", len(matches), level=query.level)
        request = event.identifier
        ae_title = event.assoc.acceptor.ae_title.strip()
        pending = PENDING
        if unsupported := unsupported_keys(request, query.level):
            log.info("C-FIND keys not supported at %s level (not returned): %s", query.level, ", ".join(unsupported))
            pending = PENDING_WARNING
        for match in matches:
            if event.is_cancelled:
                log.info("C-FIND cancelled by the requestor")
                yield CANCEL, None
                return
            yield pending, response_identifier(request, query, match, ae_title)
    except (StorageError, OSError) as exc:
        log.error("C-FIND failed: the index cannot be read: %s", exc)
        yield UNABLE_TO_PROCESS, None
    except Exception:  # the handler must answer, whatever went wrong
        log.exception("C-FIND handling failed")
        yield UNABLE_TO_PROCESS, None


def _instances(
    event: evt.Event, storage: Storage, models: Mapping[str, InformationModel], service: str, audit: AuditLog
) -> list[InstanceRecord] | int:
    """The instances a C-MOVE/C-GET asks for, or the failure status to answer (logged and audited)."""
    query = _parse(event, models, service, audit)
    if isinstance(query, int):
        return query
    try:
        instances = storage.index.retrieve(query)
    except QueryError as exc:
        return _refuse(event, audit, service, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    except (StorageError, OSError) as exc:
        log.error("%s failed: the index cannot be read: %s", service, exc)
        return UNABLE_TO_PROCESS
    log.info(
        "%s %s %s from %s: %d instance(s)",
        service,
        query.model,
        query.level,
        event.assoc.requestor.ae_title.strip(),
        len(instances),
    )
    return instances


def _retrieval(
    event: evt.Event, storage: Storage, policy: AccessPolicy, audit: AuditLog, dimse: str, destination: str
) -> list[InstanceRecord] | int | Dataset:
    """:func:`_instances` behind the ``retrieve`` permission (else the refusal to answer), audited."""
    if (refused := refuse_unless_allowed(event, policy, audit, "retrieve", dimse)) is not None:
        return refused
    instances = _instances(event, storage, MOVE_MODELS if dimse == "C-MOVE" else GET_MODELS, dimse, audit)
    if isinstance(instances, list):
        studies = sorted({r.study_instance_uid for r in instances})
        _audit_request(event, audit, "retrieve", dimse, len(instances), destination=destination, studies=studies)
    return instances


def _read(storage: Storage, record: InstanceRecord) -> Dataset:
    """The stored dataset of an instance, or a stub that pynetdicom counts as a failed sub-operation.

    The stub holds only the SOP Instance UID: sending it fails before anything
    goes on the wire, and pynetdicom lists the UID among the failed ones.
    """
    try:
        return dcmread(storage.layout.resolve(record.path))
    except (OSError, StorageError, InvalidDicomError, ValueError, EOFError) as exc:
        log.error("cannot read stored instance %s (%s): %s", record.sop_instance_uid, record.path, exc)
    except Exception:  # a sub-operation fails; the retrieve goes on
        log.exception("cannot read stored instance %s (%s)", record.sop_instance_uid, record.path)
    stub = Dataset()
    stub.SOPInstanceUID = record.sop_instance_uid
    return stub


def _sub_operations(
    event: evt.Event, storage: Storage, instances: Sequence[InstanceRecord], service: str
) -> Iterator[tuple[int, Dataset | None]]:
    for record in instances:
        if event.is_cancelled:
            log.info("%s cancelled by the requestor", service)
            yield CANCEL, None
            return
        yield PENDING, _read(storage, record)


def storage_contexts(instances: Sequence[InstanceRecord]) -> list[PresentationContext]:
    """Presentation contexts to send ``instances``: one per SOP class, their own transfer syntaxes first."""
    syntaxes: dict[str, list[str]] = {}
    for record in instances:
        offered = syntaxes.setdefault(record.sop_class_uid, [])
        for uid in (record.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in offered:
                offered.append(uid)
    if len(syntaxes) > _MAX_CONTEXTS:
        log.warning("%d SOP classes to send: only the first %d can be proposed", len(syntaxes), _MAX_CONTEXTS)
    return [build_context(sop_class, ts) for sop_class, ts in list(syntaxes.items())[:_MAX_CONTEXTS]]


def handle_move(
    event: evt.Event, storage: Storage, peers: Mapping[str, PeerAddress], policy: AccessPolicy, audit: AuditLog
) -> Iterator[Any]:
    """``EVT_C_MOVE``: destination, number of sub-operations, then each dataset.

    The destination must be a configured peer (else MOVE_DESTINATION_UNKNOWN);
    pynetdicom sends the datasets over the sub-association and computes the
    final status (0xB000 when some sub-operations failed, 0xA702 when all did).
    """
    peer: PeerAddress | None = None
    try:
        destination = str(event.move_destination or "").strip()
        peer = peers.get(destination)
        if peer is None:
            reason = f"move destination {destination!r} is not a configured peer"
            instances: list[InstanceRecord] | int | Dataset = _refuse(
                event, audit, "C-MOVE", MOVE_DESTINATION_UNKNOWN, reason, destination=destination
            )
        else:
            instances = _retrieval(event, storage, policy, audit, "C-MOVE", destination)
    except Exception:  # the handler must answer, whatever went wrong
        log.exception("C-MOVE handling failed")
        instances = UNABLE_TO_PROCESS
    if peer is None:
        yield None, None  # pynetdicom answers MOVE_DESTINATION_UNKNOWN
        return
    handlers = [*NODELAY_HANDLERS, *GUARD_HANDLERS]  # pynetdicom's response race (node.response_guard)
    if not isinstance(instances, list):
        # pynetdicom associates before it takes a status: propose Verification only.
        verification: dict[str, Any] = {"contexts": [build_context(Verification)], "evt_handlers": handlers}
        if peer.tls_args is not None:
            verification["tls_args"] = peer.tls_args
        yield peer.host, peer.port, verification
        yield 1
        yield instances, None
        return
    association_args = {
        "contexts": storage_contexts(instances),
        "evt_handlers": handlers,
        "max_pdu": event.assoc.ae.maximum_pdu_size,
    }
    if peer.tls_args is not None:
        association_args["tls_args"] = peer.tls_args
    yield peer.host, peer.port, association_args
    yield len(instances)
    yield from _sub_operations(event, storage, instances, "C-MOVE")


def handle_get(event: evt.Event, storage: Storage, policy: AccessPolicy, audit: AuditLog) -> Iterator[Any]:
    """``EVT_C_GET``: number of sub-operations, then each dataset (sent on the same association).

    The requestor must have proposed a storage context for each SOP class with
    the SCP role; instances without one count as failed sub-operations.
    """
    try:
        instances = _retrieval(event, storage, policy, audit, "C-GET", event.assoc.requestor.ae_title.strip())
    except Exception:  # the handler must answer, whatever went wrong
        log.exception("C-GET handling failed")
        instances = UNABLE_TO_PROCESS
    if not isinstance(instances, list):
        yield 1
        yield instances, None
        return
    yield len(instances)
    yield from _sub_operations(event, storage, instances, "C-GET")
