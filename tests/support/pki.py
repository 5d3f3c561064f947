"""A throwaway certificate authority for the TLS tests (openssl CLI): CA, server and client certificates."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # self-signed, not from the CA
    rogue_key: Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Pki:
    """CA-signed server (SAN IP 127.0.0.1, localhost) and client certificates, plus a rogue self-signed one."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    days = "2"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", days,
         "-subj", "/CN=spect-node test CA", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=spect-node test {name}", cwd=folder)  # fmt: skip
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", days, "-extfile", "san.ext", cwd=folder)  # fmt: skip
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem", "-days", days,
         "-subj", "/CN=rogue", "-addext", "subjectAltName=IP:127.0.0.1", cwd=folder)  # fmt: skip
    return Pki(*(folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                                       "rogue.pem", "rogue.key")))  # fmt: skip
