"""Regression test of pynetdicom's response race (see node.response_guard).

16 threads, each on its own association, send small C-STOREs to a storage SCP in
another process. Unguarded, pynetdicom 3.0.4 loses about 1 % of the responses here
(the sender then waits for the DIMSE timeout); guarded, every response reaches its caller.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage

from node.network import NODELAY_HANDLERS
from node.response_guard import keep_responses_for_the_caller

N_THREADS = 16
PER_THREAD = 50
DIMSE_TIMEOUT = 10.0

_SCP = """
import sys
from pynetdicom import AE, evt
from pynetdicom.sop_class import NuclearMedicineImageStorage
from node.network import NODELAY_HANDLERS
ae = AE(ae_title="RACESCP")
ae.maximum_associations = 32
ae.add_supported_context(NuclearMedicineImageStorage)
server = ae.start_server(
    ("127.0.0.1", 0), block=False, evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_STORE, lambda event: 0x0000)]
)
print(server.server_address[1], flush=True)
sys.stdin.read()  # serve until the test closes stdin
server.shutdown()
"""


@pytest.fixture
def scp_port() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-c", _SCP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    port = int(process.stdout.readline())
    yield port
    process.stdin.close()
    assert process.wait(timeout=30) == 0


def _tiny_nm() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "RACE"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_every_c_store_response_reaches_its_caller(scp_port: int) -> None:
    failures: list[str] = []
    lock = threading.Lock()

    def sender(slot: int) -> None:
        ae = AE(ae_title=f"RACE{slot:02d}")
        ae.dimse_timeout = DIMSE_TIMEOUT
        ae.add_requested_context(NuclearMedicineImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp_port, ae_title="RACESCP", evt_handlers=NODELAY_HANDLERS)
        if not assoc.is_established:
            with lock:
                failures.append(f"association {slot} not established")
            return
        keep_responses_for_the_caller(assoc)
        for number in range(PER_THREAD):
            response = assoc.send_c_store(_tiny_nm())
            if not response or response.Status != 0:
                with lock:
                    failures.append(f"association {slot}, C-STORE {number}: {response or 'no response'}")
                return
        assoc.release()

    threads = [threading.Thread(target=sender, args=(slot,)) for slot in range(N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
