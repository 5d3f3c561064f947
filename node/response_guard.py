"""A guard against a response race in pynetdicom's association requestor (seen with 3.0.4).

``Association.send_c_store`` (and the other ``send_*`` methods) pause the association's
reactor thread before sending a request, then wait for the response on the DIMSE
queue. The pause is not airtight: when the reactor thread is pre-empted between leaving
its checkpoint and marking itself running again, the caller takes it for paused, sends,
and the reactor takes the response off the queue, logs "Received unexpected C-STORE
service message" and drops it. The caller then waits for the DIMSE timeout and aborts
the association although the peer stored the instance, and a retry sends it a second
time. Measured on 2 cores: 16 threads each sending 60 C-STOREs to a pynetdicom SCP in
another process lost 6 to 12 responses per run; one thread lost none in 1,000.

:func:`keep_responses_for_the_caller` makes the reactor put such a response back on the
queue, once, where the waiting caller takes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

log = logging.getLogger(__name__)

_REQUEUED = "_spect_node_requeued"


def keep_responses_for_the_caller(assoc: Association) -> Association:
    """Return ``assoc`` with responses taken by its reactor handed back to the waiting caller.

    Call it on a requestor association right after it is established, before sending.
    A response the reactor sees twice (nobody waits for it: the caller gave up) is left
    to pynetdicom, which logs and drops it.
    """
    serve: Callable[[Any, int], None] | None = getattr(assoc, "_serve_request", None)
    queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if serve is None or queue is None:  # pynetdicom's internals changed: run unguarded
        log.warning("pynetdicom has no Association._serve_request/dimse.msg_queue: response race not guarded")
        return assoc

    def serve_request(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not getattr(msg, _REQUEUED, False):
            setattr(msg, _REQUEUED, True)
            log.debug("%s response taken by the reactor: handed back to the caller", msg.msg_type)
            queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]
    return assoc


def _guard_requestor(event: Any) -> None:
    if event.assoc.is_requestor:
        keep_responses_for_the_caller(event.assoc)


# Bind on the node's own requestor associations (result sending, C-MOVE sub-associations).
GUARD_HANDLERS = [(evt.EVT_ESTABLISHED, _guard_requestor)]
