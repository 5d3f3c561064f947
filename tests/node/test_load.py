"""Load: 16 associations open at once send 50 mixed studies; every study gets exactly one SEG.

The node runs in-process with the shipped model on the CPU; the destination records
every C-STORE it receives (a SEG sent twice would show twice). The scenario lives in
``tests/support/load_scenario.py``; ``benchmarks/node_load.py`` times the same one
with the node in its own process.

Also the limit itself: with ``node.max_associations`` open, the next caller is rejected at
once (A-ASSOCIATE-RJ, "local limit exceeded"), and taken again when one closes.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_client import NODE_AE, associate, wait_for_event
from load_scenario import DESTINATION_AE, KINDS, CountingDestination, make_studies, send_concurrently
from peers import require_tool
from studies import WEIGHTS, node_config

from config.schema import PeerSection
from node.audit import read_audit
from node.service import Node
from storage import DeliveryState, JobState

N_STUDIES = 50
N_ASSOCIATIONS = 16
SEG_TIMEOUT = 240.0  # all 50 SEGs; ~1 min on 2 idle cores


@pytest.fixture
def destination() -> Iterator[CountingDestination]:
    server = CountingDestination()
    yield server
    server.stop()


@pytest.fixture
def node(tmp_path: Path, destination: CountingDestination) -> Iterator[Node]:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    peers = [PeerSection(ae_title=DESTINATION_AE, host="127.0.0.1", port=destination.port)]
    # The senders share the node's process and its 2 cores with inference: one of them was
    # once starved for 5.5 s mid-series, and a 3 s idle time then split a series of 28
    # slices into two jobs (two SEGs, each correct for what had arrived). 10 s is the default.
    config = node_config(
        tmp_path / "node", f"node.max_associations={N_ASSOCIATIONS}", "node.series_idle_timeout=10", peers=peers
    )
    running = Node.start(config)
    yield running
    running.stop()


@pytest.mark.slow
def test_sixteen_associations_fifty_studies_one_seg_each(node: Node, destination: CountingDestination) -> None:
    studies = make_studies(N_STUDIES)
    assert {s.kind for s in studies} == set(KINDS)
    n_instances = sum(len(s.datasets) for s in studies)

    start = time.monotonic()
    sent = send_concurrently(node.port, node.config.node.ae_title, studies, N_ASSOCIATIONS)
    assert sent.all_open_at_once, sent.errors
    assert len(sent.statuses) == n_instances and not sent.failed, sent.failed

    assert destination.wait_for(N_STUDIES, SEG_TIMEOUT), (
        f"{len(destination.arrivals)}/{N_STUDIES} SEGs after {SEG_TIMEOUT} s; jobs: "
        f"{[(j.id, j.state, j.reason) for j in node.storage.index.jobs(limit=N_STUDIES) if j.state != 'done']}"
    )
    elapsed = time.monotonic() - start
    index = node.storage.index
    deadline = time.monotonic() + 30  # the last delivery is recorded just after its C-STORE response
    while any(d.state != DeliveryState.DONE for d in index.deliveries()) and time.monotonic() < deadline:
        time.sleep(0.1)

    per_study = destination.per_study()
    assert set(per_study) == {s.study_instance_uid for s in studies}  # every study's SEG arrived...
    assert set(per_study.values()) == {1}  # ...exactly once
    assert len({sop for sop, _ in destination.arrivals}) == N_STUDIES
    jobs = index.jobs(limit=10 * N_STUDIES)
    assert len(jobs) == N_STUDIES and {j.state for j in jobs} == {JobState.DONE}
    assert {j.series_instance_uid for j in jobs} == {s.series_instance_uid for s in studies}
    assert all(j.attempts == 1 for j in jobs)
    deliveries = index.deliveries()
    assert len(deliveries) == N_STUDIES
    assert all(d.state == DeliveryState.DONE and d.attempts == 1 for d in deliveries)
    # inference is serialised: no two jobs ran at the same time
    spans = sorted((j.started_at, j.finished_at) for j in jobs)
    assert all(previous[1] <= following[0] for previous, following in zip(spans, spans[1:], strict=False))
    print(f"\n{N_STUDIES} studies ({n_instances} instances) over {N_ASSOCIATIONS} associations: {elapsed:.1f} s")


def _echoscu(port: int) -> subprocess.CompletedProcess[str]:
    command = [require_tool("echoscu"), "-aet", "ECHOSCU", "-aec", NODE_AE, "-to", "30", "-ta", "30", "-td", "30"]
    return subprocess.run([*command, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120)


@pytest.mark.peers
def test_the_association_beyond_the_limit_is_rejected_until_one_closes(tmp_path: Path, stop_later: list) -> None:
    limit = 2
    node = Node.start(node_config(tmp_path / "node", f"node.max_associations={limit}"), load_model=False)
    stop_later.append(node)
    held = [associate(node.port, calling=f"HOLD{n}") for n in range(limit)]
    assert all(assoc.is_established for assoc in held)

    refused = _echoscu(node.port)  # one more, from DCMTK: refused at once, not left waiting
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "Association Rejected" in output and "Rejected Transient" in output, output
    assert "Local Limit Exceeded" in output, output
    extra = associate(node.port, calling="EXTRA")  # and from pynetdicom, with the reason's codes
    assert extra.is_rejected
    rejection = extra.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
    # recorded by the node's thread just after the A-ASSOCIATE-RJ has gone out: waited for
    rejected = wait_for_event(tmp_path / "node" / "audit.jsonl", "association-rejected", count=2)
    assert sorted(e["calling_ae"] for e in rejected) == ["ECHOSCU", "EXTRA"]
    assert {e["reason"] for e in rejected} == {"local limit exceeded (too many associations)"}
    assert all(assoc.is_established for assoc in held)  # the associations already open are untouched
    assert int(held[0].send_c_echo().Status) == 0

    held.pop().release()
    deadline = time.monotonic() + 60  # a guard: the node's thread of the released association ends
    while sum(a.is_acceptor for a in node.server.ae.active_associations) >= limit and time.monotonic() < deadline:
        time.sleep(0.05)
    accepted = _echoscu(node.port)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    for assoc in held:
        assoc.release()
    accepted_events = [e for e in read_audit(tmp_path / "node" / "audit.jsonl") if e["event"] == "association-accepted"]
    assert sorted(e["calling_ae"] for e in accepted_events) == ["ECHOSCU", "HOLD0", "HOLD1"]
