"""DICOM TLS on the node's listening port and on its outgoing associations.

Real peers on 127.0.0.1: DCMTK ``storescu +tls``, ``movescu`` and ``storescp +tls``, and
pynetdicom on both sides; certificates come from a throwaway CA made with the openssl CLI
(:mod:`pki`), valid for two days.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from dicom_client import NODE_AE, associate, c_store, tls_client_context, wait_for_event
from peers import require_tool
from pki import Pki, make_pki
from pydicom import Dataset
from studies import WEIGHTS, free_port, nm_study_file, node_config

from config import ConfigError, load_config
from config.schema import PeerSection, TlsSection
from node.audit import read_audit
from node.cli import main as spect_node
from node.network import PeerAddress
from node.scu import send_datasets
from node.service import Node
from node.standin_pacs import PACS_AE, StandInPacs
from node.tls import TlsConfigError, client_context, server_context

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    return nm_study_file(tmp_path_factory.mktemp("study"), "Tls^Test", "TLS-0001")


def _listening(pki: Pki, require_client: bool = True) -> list[str]:
    """Overrides for a TLS-only listening port with the test server certificate."""
    return [
        "node.tls.enabled=true",
        f"node.tls.certificate={pki.server_cert}",
        f"node.tls.private_key={pki.server_key}",
        f"node.tls.ca_certificates={pki.ca}",
        f"node.tls.require_client_certificate={str(require_client).lower()}",
    ]


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    command = [require_tool("storescu"), "-aet", "TLSSCU", "-aec", NODE_AE, "-to", "10", "-ta", "10", "-td", "10"]
    return subprocess.run(
        [*command, *tls, "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60
    )


def test_tls_settings_are_checked_at_load_and_at_start(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    for overrides, message in (
        (["node.tls.enabled=true"], "enabled needs certificate and private_key"),
        ([f"node.tls.certificate={pki.server_cert}"], "certificate and private_key go together"),
        (
            [
                "node.tls.enabled=true",
                f"node.tls.certificate={pki.server_cert}",
                f"node.tls.private_key={pki.server_key}",
            ],
            "require_client_certificate needs ca_certificates",
        ),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(overrides=overrides)
        assert "node.tls" in str(info.value)

    missing = tmp_path / "missing.pem"
    settings = TlsSection(
        enabled=True, certificate=missing, private_key=pki.server_key, require_client_certificate=False
    )
    with pytest.raises(TlsConfigError, match=str(missing)):
        server_context(settings)
    mismatched = TlsSection(
        enabled=True, certificate=pki.server_cert, private_key=pki.client_key, require_client_certificate=False
    )
    with pytest.raises(TlsConfigError, match="server.pem: cannot load the certificate and private key"):
        server_context(mismatched)
    # the CLI says which file, and the node does not start
    code = spect_node(
        ["serve", "--set", f"storage.root={tmp_path / 'node'}", "--set", "node.port=0"]
        + [item for o in _listening(pki) for item in ("--set", o)]
        + ["--set", f"node.tls.ca_certificates={missing}"]
    )
    assert code == 2
    assert f"{missing}: cannot load the CA certificates" in capsys.readouterr().err


def test_storescu_over_tls_and_what_the_tls_port_refuses(
    tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list
) -> None:
    node = Node.start(node_config(tmp_path / "node", *_listening(pki)), load_model=False)
    stop_later.append(node)
    ds, path = study

    sent = _storescu(node.port, path, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is not None

    refused = {
        "plain TCP": _storescu(node.port, path),
        "TLS without a client certificate": _storescu(node.port, path, "+tla", "+cf", str(pki.ca)),
        "certificate not from the CA": _storescu(
            node.port, path, "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca)
        ),
        "node not trusted by the caller": _storescu(
            node.port, path, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.rogue_cert)
        ),
    }
    for case, result in refused.items():
        assert result.returncode != 0, f"{case}: storescu succeeded"

    assoc = associate(node.port, tls_args=(tls_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    assert not associate(node.port).is_established  # pynetdicom, plain TCP
    anonymous = tls_client_context(pki, with_certificate=False)
    assert not associate(node.port, tls_args=(anonymous, "127.0.0.1")).is_established

    events = read_audit(tmp_path / "node" / "audit.jsonl")
    accepted = [e for e in events if e["event"] == "association-accepted"]
    assert accepted and all(e["tls"] and e["tls_client"] == "spect-node test client" for e in accepted)
    handshakes = [e for e in events if e["event"] == "association-rejected" and "TLS handshake" in e["reason"]]
    assert len(handshakes) >= 5  # storescu: plain, anonymous, rogue; pynetdicom: plain, anonymous
    assert all(e["address"] == "127.0.0.1" for e in handshakes)


def test_client_certificate_optional(tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list) -> None:
    node = Node.start(node_config(tmp_path / "node", *_listening(pki, require_client=False)), load_model=False)
    stop_later.append(node)
    _, path = study
    anonymous = _storescu(node.port, path, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    rogue = _storescu(node.port, path, "+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca))
    assert rogue.returncode != 0  # a certificate that is shown is still verified


def test_a_silent_connection_does_not_hold_up_the_tls_port(tmp_path: Path, pki: Pki, stop_later: list) -> None:
    # pynetdicom shakes hands inside its accept loop: without the node's deferred handshake,
    # this idle connection would keep every later caller waiting until the node gave up on it
    # (measured: the association below then timed out)
    node = Node.start(node_config(tmp_path / "node", *_listening(pki), "node.acse_timeout=10"), load_model=False)
    stop_later.append(node)
    audit_path = tmp_path / "node" / "audit.jsonl"

    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as silent:
        # connections are accepted in the order they arrive: the silent one is taken up first
        assoc = associate(node.port, tls_args=(tls_client_context(pki), "127.0.0.1"))
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        # ...and this association was served while the node still waited on the silent caller
        assert not [e for e in read_audit(audit_path) if e["event"] == "association-rejected"]
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # open, nothing to read: not yet closed by the node
            silent.recv(1)
        silent.settimeout(60)  # a guard against a hang; node.acse_timeout is 10 s
        # the node gives up on the silent caller: it closes the connection (end of stream here)...
        assert silent.recv(1) == b"", "the node sent data to a caller that never spoke"
    # ...and records why, with the caller's address
    (event,) = wait_for_event(audit_path, "association-rejected")
    assert "TLS handshake failed" in event["reason"] and "timed out" in event["reason"], event
    assert event["address"] == "127.0.0.1"


def test_seg_is_sent_to_a_tls_peer(tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list) -> None:
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is missing: the shipped model is part of the repository")
    pacs_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pacs_context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    pacs_context.load_verify_locations(cafile=str(pki.ca))
    pacs_context.verify_mode = ssl.CERT_REQUIRED  # the PACS checks the node's certificate
    pacs = StandInPacs(tmp_path / "pacs", ssl_context=pacs_context)
    stop_later.append(pacs)
    peer = PeerSection(ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, tls=True)
    node_identity = [  # listening stays plain TCP; the certificate identifies the node to TLS peers
        f"node.tls.certificate={pki.client_cert}",
        f"node.tls.private_key={pki.client_key}",
        f"node.tls.ca_certificates={pki.ca}",
    ]
    node = Node.start(node_config(tmp_path / "node", *node_identity, peers=[peer]))
    stop_later.append(node)
    ds, _ = study
    assert int(c_store(node.port, ds).Status) == 0
    assert pacs.wait_for(1, timeout=120), "no SEG reached the TLS peer"
    sent = wait_for_event(tmp_path / "node" / "audit.jsonl", "seg-sent")
    assert sent[0]["destination"] == f"{PACS_AE}@127.0.0.1:{pacs.port}"
    assert sent[0]["seg_sop_instance_uid"] in pacs.received


def test_the_node_refuses_a_tls_peer_it_cannot_verify(
    tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list
) -> None:
    impostor_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor_context.load_cert_chain(str(pki.rogue_cert), str(pki.rogue_key))  # not from the node's CA
    impostor = StandInPacs(tmp_path / "impostor", ssl_context=impostor_context)
    stop_later.append(impostor)
    identity = TlsSection(certificate=pki.client_cert, private_key=pki.client_key, ca_certificates=pki.ca)
    peer = PeerAddress(PACS_AE, "127.0.0.1", impostor.port)
    ds, _ = study
    outcome = send_datasets([ds], peer, NODE_AE, tls_args=(client_context(identity), "127.0.0.1"))
    assert outcome.error is not None and not outcome.statuses
    assert impostor.received == {}


def test_c_move_to_a_dcmtk_tls_storescp(
    tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list
) -> None:
    storescp, movescu = require_tool("storescp"), require_tool("movescu")
    port, received = free_port(), tmp_path / "storescp"
    received.mkdir()
    command = [storescp, "-aet", "TLSDEST", "-od", str(received), "+tls", str(pki.server_key), str(pki.server_cert)]
    destination = subprocess.Popen(
        [*command, "+cf", str(pki.ca), str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        peer = PeerSection(ae_title="TLSDEST", host="127.0.0.1", port=port, tls=True, send_results=False)
        node_identity = [
            f"node.tls.certificate={pki.client_cert}",
            f"node.tls.private_key={pki.client_key}",
            f"node.tls.ca_certificates={pki.ca}",
        ]
        node = Node.start(node_config(tmp_path / "node", *node_identity, peers=[peer]), load_model=False)
        stop_later.append(node)
        ds, _ = study
        assert int(c_store(node.port, ds).Status) == 0
        deadline = time.monotonic() + 30
        while not _accepts_tls(port, pki) and time.monotonic() < deadline:
            time.sleep(0.2)
        move = subprocess.run(
            [movescu, "-aet", "MOVER", "-aec", NODE_AE, "-aem", "TLSDEST", "-S", "-to", "10", "-ta", "10"]
            + ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
            + ["127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert move.returncode == 0, move.stdout + move.stderr
        files = list(received.iterdir())
        assert [f.name for f in files] == [f"NM.{ds.SOPInstanceUID}"], move.stderr
        retrieve = wait_for_event(tmp_path / "node" / "audit.jsonl", "retrieve")[0]
        assert (retrieve["destination"], retrieve["count"], retrieve["calling_ae"]) == ("TLSDEST", 1, "MOVER")
    finally:
        destination.terminate()
        destination.wait(timeout=30)


def _accepts_tls(port: int, pki: Pki) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with tls_client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1"):
                return True
    except OSError:
        return False


def test_spect_node_send_over_tls(tmp_path: Path, pki: Pki, study: tuple[Dataset, Path], stop_later: list) -> None:
    node = Node.start(node_config(tmp_path / "node", *_listening(pki)), load_model=False)
    stop_later.append(node)
    ds, path = study
    to = ["--to", f"{NODE_AE}@127.0.0.1:{node.port}", str(path)]
    assert spect_node(["send", *to]) == 1  # plain TCP to a TLS port
    identity = [
        f"node.tls.certificate={pki.client_cert}",
        f"node.tls.private_key={pki.client_key}",
        f"node.tls.ca_certificates={pki.ca}",
    ]
    assert spect_node(["send", "--tls", *to, *[item for o in identity for item in ("--set", o)]]) == 0
    assert node.storage.index.instance(str(ds.SOPInstanceUID)) is not None


def test_pki_tools_present() -> None:
    # the TLS tests need the openssl CLI (make peers installs it); DCMTK must be built with OpenSSL
    require_tool("openssl")
    help_text = subprocess.run([require_tool("storescu"), "--help"], capture_output=True, text=True, timeout=30)
    assert "+tls" in help_text.stdout, "this DCMTK was built without OpenSSL (no +tls)"


def test_failed_handshakes_do_not_hold_association_slots(tmp_path: Path, pki: Pki, stop_later: list) -> None:
    """Four callers that are not TLS (an HTTP request) on a node of 2 association slots and a 20 s
    ACSE timeout: each is refused at once, and a real TLS caller right after them gets in
    (pynetdicom started an association for each that waited 20 s for a request that cannot come)."""
    overrides = [*_listening(pki), "node.acse_timeout=20", "node.max_associations=2"]
    node = Node.start(node_config(tmp_path / "node", *overrides), load_model=False)
    stop_later.append(node)
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as junk:
            junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
    wait_for_event(tmp_path / "node" / "audit.jsonl", "association-rejected", count=4)
    time.sleep(0.5)
    assoc = associate(node.port, tls_args=(tls_client_context(pki), "127.0.0.1"))
    assert assoc.is_established
    assoc.release()


def test_outgoing_tls_trusts_only_the_configured_ca(pki: Pki) -> None:
    """With tls.ca_certificates set, a publicly issued certificate for a peer's host is no proof."""
    context = client_context(TlsSection(ca_certificates=pki.ca))
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
