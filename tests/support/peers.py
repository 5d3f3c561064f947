"""The real DICOM peers the tests use (DCMTK, dicom3tools, openssl): finding them, running a DCMTK storescp."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from node_process import wait_until
from pynetdicom import AE
from pynetdicom.sop_class import Verification

STORESCP_AE = "DESTSCP"  # the AE title of the storescp the node tests send to


def require_tool(name: str) -> str:
    """The path of a peer tool; a missing one fails when CI is set (``make peers`` installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI must have the real peers (make peers)")
        pytest.skip(f"{name} is not installed")
    return path


def answers(port: int, ae_title: str) -> bool:
    """Whether a DICOM application listens on 127.0.0.1:``port`` (it accepts or rejects an association)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.connection_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return assoc.is_rejected


@contextmanager
def storescp(folder: Path, port: int, ae_title: str, *options: str) -> Iterator[Path]:
    """DCMTK ``storescp`` as ``ae_title`` on ``port``, storing into ``folder`` (yielded); stopped afterwards.

    Its output goes to ``<folder>.log``; ``options`` are storescp's own (``--refuse``, ...).
    """
    executable = require_tool("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder.parent / f"{folder.name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [executable, "-aet", ae_title, "-od", str(folder), *options, str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def listening() -> bool:
        if process.poll() is not None:  # it gave up (the port taken meanwhile, say): say why at once
            output = log_path.read_text(errors="replace")[-2000:]
            raise AssertionError(f"storescp {options} on {port} exited with {process.returncode}:\n{output}")
        return answers(port, ae_title)

    try:
        wait_until(listening, 30, f"storescp {options} on {port}")
        yield folder
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
