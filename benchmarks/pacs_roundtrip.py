"""PACS-to-PACS round trip with Orthanc as the PACS, on 127.0.0.1.

1. Latency: for each of N distinct phantom NM studies held by Orthanc, Orthanc sends
   the study to the node (REST ``/modalities/<node>/store``, synchronous); the clock
   runs from that call until the node's SEG is queryable in Orthanc (``/tools/find``
   for Modality SEG in the study, polled every 20 ms). Medians, with the store call and
   the node's convert / infer / encode times.
2. Concurrency: K studies (default 4) sent at once, each by its own thread calling
   Orthanc's REST store (so K associations from Orthanc to the node); all SEGs must
   come back to Orthanc, none lost, none twice; aggregate studies per minute.

Orthanc (``TCP_NODELAY=1``, own storage in a temporary folder) and the node run for
the duration of the script; the runner is ``tests/support/orthanc.py``.

    python benchmarks/pacs_roundtrip.py [--studies 10] [--concurrent 4] [--weights models/unet3d_weights.pth]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from orthanc import ORTHANC_AE, Modality, OrthancServer  # noqa: E402  (after the path insert)

from config import load_config  # noqa: E402
from config.schema import PeerSection  # noqa: E402
from node.nm_writer import dataset_to_bytes, nifti_to_nm  # noqa: E402
from node.service import Node  # noqa: E402
from training.phantom import generate_case  # noqa: E402

NODE_MODALITY = "spectnode"
POPULATION_SEED = 4245  # phantom population of this benchmark (distinct from the other benchmarks')
SEG_TIMEOUT = 600.0


def _seg_query(study_uid: str) -> dict[str, str]:
    return {"Modality": "SEG", "StudyInstanceUID": study_uid}


def _upload_study(orthanc: OrthancServer, index: int) -> tuple[str, str, str, tuple[int, ...]]:
    """Upload phantom case ``index`` as an NM study.

    Returns (Orthanc study ID, StudyInstanceUID, SeriesInstanceUID, volume shape).
    """
    case = generate_case(POPULATION_SEED, index)
    ds = nifti_to_nm(nib.Nifti1Image(case.volume, case.affine), patient_name="Bench^Pacs", patient_id=f"BP{index:03d}")
    answer = orthanc.upload(dataset_to_bytes(ds))
    return answer["ParentStudy"], str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), tuple(case.volume.shape)


def _check_store(answer: dict[str, Any]) -> None:
    if answer.get("FailedInstancesCount") or not answer.get("InstancesCount"):
        raise RuntimeError(f"Orthanc's store to the node failed: {answer}")


def latency(node: Node, orthanc: OrthancServer, studies: int) -> None:
    rows = []
    for index in range(studies):
        study_id, study_uid, series_uid, shape = _upload_study(orthanc, index)
        start = time.perf_counter()
        _check_store(orthanc.store_to_modality(NODE_MODALITY, [study_id]))
        stored = time.perf_counter() - start
        if not orthanc.wait_for_find("Series", _seg_query(study_uid), timeout=SEG_TIMEOUT):
            raise RuntimeError(f"no SEG for study {study_uid} in Orthanc within {SEG_TIMEOUT} s")
        total = time.perf_counter() - start
        (job,) = node.storage.index.jobs_for_series(series_uid)
        work = (job.convert_s or 0.0) + (job.infer_s or 0.0) + (job.encode_s or 0.0)
        parts = (job.convert_s or 0.0, job.infer_s or 0.0, job.encode_s or 0.0)
        rows.append((total, stored, *parts, total - stored - work))
        print(
            f"  study {index}: {shape} {total:.3f} s (store call {stored:.3f}, convert {job.convert_s:.3f}, "
            f"infer {job.infer_s:.3f}, encode {job.encode_s:.3f})"
        )
    med = [statistics.median(row[i] for row in rows) for i in range(6)]
    print(f"latency, Orthanc REST store to the node -> SEG queryable in Orthanc, median of {len(rows)} studies:")
    print(
        f"  total {med[0]:.3f} s; parts (each its own median): store call {med[1]:.3f}, convert {med[2]:.3f}, "
        f"infer {med[3]:.3f}, encode {med[4]:.3f}, rest (queue, send back, Orthanc indexing, polling) {med[5]:.3f}"
    )


def concurrent(node: Node, orthanc: OrthancServer, count: int, first_index: int) -> None:
    uploaded = [_upload_study(orthanc, first_index + i) for i in range(count)]
    barrier = threading.Barrier(count)
    answers: dict[int, dict[str, Any] | Exception] = {}

    def send(slot: int) -> None:
        barrier.wait()
        try:
            answers[slot] = orthanc.store_to_modality(NODE_MODALITY, [uploaded[slot][0]])
        except Exception as exc:  # reported below: the benchmark must say which send failed
            answers[slot] = exc

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = time.perf_counter() - start
    failed = {slot: answer for slot, answer in answers.items() if isinstance(answer, Exception)}
    if failed:
        raise RuntimeError(f"stores failed: {failed}")
    for answer in answers.values():
        _check_store(answer)  # type: ignore[arg-type]
    found = []
    for _, study_uid, _, _ in uploaded:
        remaining = max(1.0, SEG_TIMEOUT - (time.perf_counter() - start))
        found.append(orthanc.wait_for_find("Series", _seg_query(study_uid), timeout=remaining))
    elapsed = time.perf_counter() - start
    segs_per_study = [len(ids) for ids in found]
    lost = sum(1 for n in segs_per_study if n == 0)
    doubled = sum(1 for n in segs_per_study if n > 1)
    jobs = [node.storage.index.jobs_for_series(series_uid) for _, _, series_uid, _ in uploaded]
    print(f"{count} studies sent at once (one Orthanc REST store per thread, {count} associations to the node):")
    print(f"  all stores acknowledged after {sent:.3f} s; all SEGs queryable in Orthanc after {elapsed:.3f} s")
    print(f"  SEGs back: {sum(segs_per_study)} for {count} studies (lost {lost}, more than one {doubled}); ", end="")
    print(f"jobs per series {[len(j) for j in jobs]}")
    print(f"  aggregate {count / elapsed * 60:.1f} studies/minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10, help="studies for the latency median (>= 10 for figures)")
    parser.add_argument("--concurrent", type=int, default=4, help="studies sent at once in part 2")
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        orthanc = OrthancServer(work / "orthanc", concurrent_jobs=max(4, args.concurrent))
        config = load_config(
            overrides=[
                f"storage.root={work / 'node'}",
                "node.port=0",
                f"model.weights={args.weights.resolve()}",
                "node.min_free_bytes=0",
            ]
        )
        config.peers = [PeerSection(ae_title=ORTHANC_AE, host="127.0.0.1", port=orthanc.dicom_port)]
        node = Node.start(config)
        try:
            orthanc.modalities[NODE_MODALITY] = Modality(config.node.ae_title, "127.0.0.1", node.port)
            with orthanc:
                latency(node, orthanc, args.studies)
                concurrent(node, orthanc, args.concurrent, first_index=args.studies)
        finally:
            node.stop()


if __name__ == "__main__":
    main()
