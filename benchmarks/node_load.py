"""Node under load, on 127.0.0.1: studies per minute and the node's peak memory.

The scenario of ``tests/node/test_load.py`` (``tests/support/load_scenario.py``): K
associations held open at once send N studies (cycling multi-frame NM, NM one slice
per file, PET-like single-frame series); a destination counts every SEG arrival. The
node runs as ``spect-node serve`` in its own process, so its peak resident memory
(``VmHWM`` of ``/proc/<pid>/status``, Linux) is its own. The clock runs from the first
association to the last SEG acknowledged by the destination.

    python benchmarks/node_load.py [--studies 50] [--associations 16] [--weights models/unet3d_weights.pth]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from load_scenario import DESTINATION_AE, CountingDestination, make_studies, send_concurrently  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402
from studies import free_port  # noqa: E402

from storage import Index  # noqa: E402

NODE_AE = "SPECTNODE"


def _proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmHWM: peak resident set), or None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _echo(port: int) -> bool:
    ae = AE(ae_title="LOADECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def run(studies: int, associations: int, weights: Path, work: Path, seg_timeout: float) -> None:
    destination = CountingDestination()
    port = free_port()
    root = work / "node"
    config = {
        "node": {
            "ae_title": NODE_AE,
            "port": port,
            "max_associations": associations,
            "series_idle_timeout": 3,
            "min_free_bytes": 0,
        },
        "peers": [{"ae_title": DESTINATION_AE, "host": "127.0.0.1", "port": destination.port}],
        "storage": {"root": str(root)},
        "model": {"weights": str(weights), "device": "cpu"},
    }
    config_path = work / "node.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = work / "node.log"
    print(f"building {studies} studies ...", flush=True)
    load = make_studies(studies)
    n_instances = sum(len(s.datasets) for s in load)
    with log_path.open("wb") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(config_path)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 120
        while not _echo(port):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        idle_kib = _proc_status_kib(node.pid, "VmRSS")
        print(f"node ready (pid {node.pid}, {idle_kib or 0} KiB resident); sending ...", flush=True)
        start = time.monotonic()
        sent = send_concurrently(port, NODE_AE, load, associations)
        received_s = time.monotonic() - start
        if sent.errors or sent.failed or len(sent.statuses) != n_instances:
            raise RuntimeError(f"sending failed: {sent.errors or sent.failed}")
        if not destination.wait_for(studies, seg_timeout):
            raise RuntimeError(f"only {len(destination.arrivals)}/{studies} SEGs within {seg_timeout} s")
        total_s = time.monotonic() - start
        peak_kib = _proc_status_kib(node.pid, "VmHWM")
        time.sleep(0.5)
        per_study = destination.per_study()
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(timeout=120)
        destination.stop()
    with Index.open(root / "index.sqlite3") as index:
        jobs = index.jobs(limit=10 * studies)
    duplicates = sum(n - 1 for n in per_study.values())
    print(f"load: {studies} studies ({n_instances} instances) over {associations} associations open at once")
    print(f"  all sent in {received_s:.1f} s ({n_instances / received_s:.0f} inst/s while the node also segments)")
    print(f"  last SEG acknowledged after {total_s:.1f} s: {studies / total_s * 60:.1f} studies/min")
    print(
        f"  SEGs: {len(per_study)}/{studies} studies, {duplicates} duplicate(s); "
        f"jobs done {sum(j.state == 'done' for j in jobs)}/{len(jobs)}; node exit {code}"
    )
    for stage in ("convert_s", "infer_s", "encode_s"):
        values = [getattr(j, stage) for j in jobs if getattr(j, stage) is not None]
        if values:
            print(f"  {stage[:-2]:<8} median {statistics.median(values):.3f} s, max {max(values):.3f} s")
    if peak_kib is not None:
        print(f"  node peak resident memory (VmHWM) {peak_kib / 1024:.0f} MiB (after start {idle_kib / 1024:.0f} MiB)")
    else:
        print("  node peak memory: /proc not available on this system")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    parser.add_argument("--seg-timeout", type=float, default=900.0, help="seconds to wait for all SEGs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args.studies, args.associations, args.weights.resolve(), Path(tmp), args.seg_timeout)


if __name__ == "__main__":
    main()
