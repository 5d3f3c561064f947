"""A minimal storage SCP standing in for the PACS (demo and tests): keeps every SEG, NM or PET instance it receives."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    EnhancedPETImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
    Verification,
)

from node.network import NODELAY_HANDLERS
from node.scp import SUCCESS, TRANSFER_SYNTAXES

PACS_AE = "DEMOPACS"


class StandInPacs:
    """A minimal storage SCP standing in for the PACS: keeps every SEG (or NM/PET, e.g. moved to it) it receives."""

    def __init__(self, folder: Path, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.folder = folder
        self.received: dict[str, bytes] = {}
        self.arrived = threading.Condition()
        ae = AE(ae_title=PACS_AE)
        ae.add_supported_context(Verification, TRANSFER_SYNTAXES)
        for sop_class in (
            SegmentationStorage,
            NuclearMedicineImageStorage,
            PositronEmissionTomographyImageStorage,
            EnhancedPETImageStorage,
        ):
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", port),
            block=False,
            evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        data = event.encoded_dataset(include_meta=True)
        uid = str(event.request.AffectedSOPInstanceUID)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{uid}.dcm").write_bytes(data)
        with self.arrived:
            self.received[uid] = data
            self.arrived.notify_all()
        return SUCCESS

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.received) >= count, timeout)

    def stop(self) -> None:
        self.server.shutdown()
