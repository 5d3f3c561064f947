"""The load scenario shared by ``tests/node/test_load.py`` and ``benchmarks/node_load.py``.

N studies (mixed: multi-frame NM, NM one slice per file, PET-like single-frame series)
sent to the node over K associations held open at the same time (one thread each,
pynetdicom SCUs, guarded against pynetdicom's response race: see
:mod:`node.response_guard`), and a destination that records *every* C-STORE it receives, so a
SEG sent twice shows as two arrivals.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SegmentationStorage,
    Verification,
)
from studies import spect_like_volume

from node.network import NODELAY_HANDLERS
from node.nm_writer import nifti_to_nm, nifti_to_nm_series, nifti_to_pet_like_series
from node.response_guard import keep_responses_for_the_caller

DESTINATION_AE = "LOADPACS"
KINDS = ("nm-multiframe", "nm-slices", "pet-like")


def half_resolution(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The volume at half the matrix (2x2x2 block means): fewer, smaller single-frame files.

    Array contract: ``(i, j, k)`` float volume with even sizes -> ``(i/2, j/2, k/2)`` float32;
    the affine doubles the voxel size and moves the origin to the first block's centre.
    """
    data = np.asarray(image.dataobj, dtype=np.float32)
    ni, nj, nk = (n // 2 for n in data.shape)
    blocks = data[: 2 * ni, : 2 * nj, : 2 * nk].reshape(ni, 2, nj, 2, nk, 2).mean(axis=(1, 3, 5))
    affine = np.array(image.affine, dtype=np.float64)
    affine[:3, 3] = affine[:3, :3] @ np.full(3, 0.5) + affine[:3, 3]
    affine[:3, :3] *= 2.0
    return nib.Nifti1Image(blocks.astype(np.float32), affine)


@dataclass(frozen=True)
class LoadStudy:
    """One study of the scenario: its kind and the instances to send."""

    kind: str
    study_instance_uid: str
    series_instance_uid: str
    datasets: tuple[Dataset, ...]


def make_studies(n_studies: int) -> list[LoadStudy]:
    """``n_studies`` distinct studies cycling through :data:`KINDS`.

    Multi-frame NM studies hold the full phantom (64x64x56, one instance); the
    single-frame series hold it at half resolution (28 instances of 32x32).
    """
    full = spect_like_volume()
    small = half_resolution(full)
    studies = []
    for number in range(n_studies):
        kind = KINDS[number % len(KINDS)]
        identity = {"patient_name": f"Load^{number:03d}", "patient_id": f"LOAD{number:03d}"}
        if kind == "nm-multiframe":
            datasets = [nifti_to_nm(full, **identity)]
        elif kind == "nm-slices":
            datasets = nifti_to_nm_series(small, **identity)
        else:
            datasets = nifti_to_pet_like_series(small, modality="NM", **identity)
        first = datasets[0]
        studies.append(LoadStudy(kind, str(first.StudyInstanceUID), str(first.SeriesInstanceUID), tuple(datasets)))
    return studies


@dataclass
class SendReport:
    """What the concurrent senders achieved."""

    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    errors: list[str] = field(default_factory=list)
    all_open_at_once: bool = False

    @property
    def failed(self) -> dict[str, int]:
        return {uid: status for uid, status in self.statuses.items() if status != 0}


def send_concurrently(
    port: int, called_ae_title: str, studies: Sequence[LoadStudy], n_associations: int, timeout: float = 60.0
) -> SendReport:
    """Open ``n_associations`` associations, wait until all are open, then send study ``i`` on association ``i % n``."""
    report = SendReport()
    lock = threading.Lock()
    barrier = threading.Barrier(n_associations, timeout=timeout)

    def sender(slot: int) -> None:
        ae = AE(ae_title=f"LOADSCU{slot:02d}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class in (NuclearMedicineImageStorage, PositronEmissionTomographyImageStorage):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = keep_responses_for_the_caller(
            ae.associate("127.0.0.1", port, ae_title=called_ae_title, evt_handlers=NODELAY_HANDLERS)
        )
        try:
            barrier.wait()  # every association is established before any study is sent
        except threading.BrokenBarrierError:
            with lock:
                report.errors.append(f"association {slot}: not all {n_associations} associations opened")
            if assoc.is_established:
                assoc.abort()
            return
        if not assoc.is_established:
            with lock:
                report.errors.append(f"association {slot} refused")
            return
        try:
            for study in studies[slot::n_associations]:
                for ds in study.datasets:
                    response = assoc.send_c_store(ds)
                    status = int(response.Status) if response and "Status" in response else -1
                    with lock:
                        report.statuses[str(ds.SOPInstanceUID)] = status
        finally:
            assoc.release()

    def guarded(slot: int) -> None:
        try:
            sender(slot)
        except Exception as exc:  # a sender thread must report, not vanish
            barrier.abort()
            with lock:
                report.errors.append(f"association {slot}: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=guarded, args=(slot,), name=f"load-scu-{slot}") for slot in range(n_associations)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.all_open_at_once = not barrier.broken and not report.errors
    return report


class CountingDestination:
    """A storage SCP standing in for the PACS that records every SEG arrival, duplicates included."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, str]] = []  # (SEG SOP Instance UID, referenced StudyInstanceUID)
        self.arrived = threading.Condition()
        ae = AE(ae_title=DESTINATION_AE)
        ae.add_supported_context(Verification)
        ae.add_supported_context(SegmentationStorage, ExplicitVRLittleEndian)
        ae.maximum_associations = 32
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[*NODELAY_HANDLERS, (evt.EVT_C_STORE, self._on_store)]
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        seg = dcmread(io.BytesIO(event.encoded_dataset(include_meta=True)), stop_before_pixels=True)
        with self.arrived:
            self.arrivals.append((str(seg.SOPInstanceUID), str(seg.StudyInstanceUID)))
            self.arrived.notify_all()
        return 0x0000

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once ``count`` SEGs have arrived; False after ``timeout`` seconds."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.arrivals) >= count, timeout)

    def per_study(self) -> Counter[str]:
        """Arrivals per StudyInstanceUID."""
        with self.arrived:
            return Counter(study for _, study in self.arrivals)

    def stop(self) -> None:
        self.server.shutdown()
