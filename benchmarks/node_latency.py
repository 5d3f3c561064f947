"""Node latency and receive throughput, on 127.0.0.1.

1. Latency: for each of N phantom NM studies, the time from the last C-STORE response
   to the SEG acknowledged by the destination (a storage SCP standing in for the PACS),
   split into convert / infer / encode (the job's timings) and queue+send (the rest).
2. Throughput: DCMTK ``storescu`` sending the same files to the node and to DCMTK
   ``storescp`` in the same run (TCP_NODELAY=1 for DCMTK), instances per second and MB/s,
   and the node/storescp ratio.

    python benchmarks/node_latency.py [--studies 10] [--weights models/unet3d_weights.pth]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib

from config import load_config
from config.schema import PeerSection
from node.network import PeerAddress
from node.nm_writer import dataset_to_bytes, nifti_to_nm, nifti_to_nm_series
from node.scu import send_files
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs
from training.phantom import generate_case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def latency(studies: int, weights: Path, work: Path) -> None:
    pacs = StandInPacs(work / "pacs")
    config = load_config(
        overrides=[f"storage.root={work / 'node'}", "node.port=0", f"model.weights={weights}", "node.min_free_bytes=0"]
    )
    config.peers = [PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port)]
    node = Node.start(config)
    rows = []
    try:
        peer = PeerAddress(config.node.ae_title, "127.0.0.1", node.port)
        for index in range(studies):
            case = generate_case(4242, index)
            ds = nifti_to_nm(
                nib.Nifti1Image(case.volume, case.affine), patient_name="Bench^Latency", patient_id=f"BL{index}"
            )
            path = work / f"study{index}.dcm"
            path.write_bytes(dataset_to_bytes(ds))
            before = len(pacs.received)
            outcome = send_files([path], peer, "BENCH")
            sent = time.time()
            assert outcome.all_succeeded, outcome
            if not pacs.wait_for(before + 1, 300):
                raise RuntimeError("no SEG within 300 s")
            arrived = time.time()
            (job,) = node.storage.index.jobs_for_series(str(ds.SeriesInstanceUID))
            total = arrived - sent
            work_s = (job.convert_s or 0) + (job.infer_s or 0) + (job.encode_s or 0)
            rows.append((total, job.convert_s, job.infer_s, job.encode_s, total - work_s, case.volume.shape))
            print(
                f"  study {index}: {case.volume.shape} {total:.3f} s "
                f"(convert {job.convert_s:.3f}, infer {job.infer_s:.3f}, encode {job.encode_s:.3f})"
            )
    finally:
        node.stop()
        pacs.stop()
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    print(f"latency, last C-STORE response -> SEG acknowledged by the destination, median of {len(rows)} studies:")
    print(
        f"  total {med[0]:.3f} s = convert {med[1]:.3f} + infer {med[2]:.3f} + encode {med[3]:.3f} "
        f"+ queue/store/send {med[4]:.3f}"
    )


def _storescu(port: int, files: list[Path], aec: str) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - start


def throughput(work: Path, repeats: int) -> None:
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        print("throughput: DCMTK storescu/storescp not installed; skipped")
        return
    case = generate_case(4243, 0)
    image = nib.Nifti1Image(case.volume, case.affine)
    small = nifti_to_nm_series(image, patient_name="Bench^Small", patient_id="BS")
    files = []
    for i, ds in enumerate(small):
        path = work / "small" / f"{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dataset_to_bytes(ds))
        files.append(path)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    config = load_config(
        overrides=[
            f"storage.root={work / 'tnode'}",
            "node.port=0",
            "node.min_free_bytes=0",
            "node.series_idle_timeout=3600",
        ]
    )
    node = Node.start(config, load_model=False)
    node.worker.stop_event.set()  # receive only: no inference during the measurement
    port = _free_port()
    out = work / "storescp"
    out.mkdir()
    scp = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        node_times = [_storescu(node.port, files, config.node.ae_title) for _ in range(repeats)]
        dcmtk_times = [_storescu(port, files, "STORESCP") for _ in range(repeats)]
    finally:
        scp.terminate()
        scp.wait()
        node.stop()
    n = len(files)
    tn, td = statistics.median(node_times), statistics.median(dcmtk_times)
    print(f"C-STORE receive throughput, storescu -> receiver, {n} instances ({megabytes:.1f} MB), median of {repeats}:")
    print(f"  spect-node      {n / tn:8.1f} inst/s {megabytes / tn:7.1f} MB/s")
    print(f"  DCMTK storescp  {n / td:8.1f} inst/s {megabytes / td:7.1f} MB/s")
    print(f"  ratio node/storescp {td / tn:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        latency(args.studies, args.weights.resolve(), Path(tmp))
        throughput(Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
