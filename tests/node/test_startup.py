"""``spect-node serve`` that cannot start: a clear message naming the file, folder or port, and exit status 2.

The node runs as a real process (``python -m node.cli serve``) against real files and a
real socket on 127.0.0.1; what a user sees is its stderr, which must hold the reason and
no traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from studies import WEIGHTS, node_config

from node.service import Node

NOT_A_DATABASE = b"this is not an SQLite database\n" * 64


def _serve(*overrides: str) -> subprocess.CompletedProcess[str]:
    """``spect-node serve`` with the shipped model on the CPU; waits for it to exit (a guard against a hang)."""
    settings = [f"model.weights={WEIGHTS}", "model.device=cpu", "node.min_free_bytes=0", *overrides]
    command = [sys.executable, "-m", "node.cli", "serve", *(item for s in settings for item in ("--set", s))]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``spect-node serve: error:`` line; no traceback anywhere."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("spect-node serve: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_corrupt_index_stops_the_start_and_is_named(tmp_path: Path) -> None:
    root = tmp_path / "node"
    root.mkdir()
    index = root / "index.sqlite3"
    index.write_bytes(NOT_A_DATABASE)
    result = _serve(f"storage.root={root}", "node.port=0")
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    assert f"{index}: cannot open the index" in line and "not a database" in line, line
    assert index.read_bytes() == NOT_A_DATABASE  # left as it was, for whoever repairs it
    assert "listening" not in result.stdout


@pytest.mark.parametrize("case", ["under a regular file", "name too long"])
def test_a_storage_root_that_cannot_be_created_stops_the_start_and_is_named(tmp_path: Path, case: str) -> None:
    # real ways to make mkdir fail that hold even for root (which chmod does not stop)
    if case == "under a regular file":
        (tmp_path / "occupied").write_text("a file, not a folder\n")
        root = tmp_path / "occupied" / "node"
    else:
        root = tmp_path / ("n" * 300)  # longer than NAME_MAX (255)
    result = _serve(f"storage.root={root}", "node.port=0")
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    assert f"{root}: cannot use the storage folder" in line, line
    assert [path.name for path in tmp_path.iterdir()] == (["occupied"] if case == "under a regular file" else [])
    assert "listening" not in result.stdout


def test_a_port_in_use_stops_the_start_and_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(f"storage.root={tmp_path / 'node'}", "node.host=127.0.0.1", f"node.port={port}")
        assert result.returncode == 2, result.stderr
        line = _error_line(result)
        assert f"127.0.0.1:{port}: cannot listen for DICOM associations" in line, line
        assert "Address already in use" in line, line
        assert "listening" not in result.stdout

        config = node_config(tmp_path / "inproc", "node.host=127.0.0.1", f"node.port={port}")
        with pytest.raises(OSError, match=f"127.0.0.1:{port}: cannot listen"):  # the same from the library
            Node.start(config, load_model=False)
        # ...which let go of what it had opened: the index and the audit log
        held = {os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink()}
        opened = [str(config.storage.root), str(config.node.audit_log or config.storage.root)]
        assert not [path for path in held if path.startswith(tuple(opened))], held
    node = Node.start(config, load_model=False)  # the port is free again: the same configuration starts
    try:
        assert node.port == port
    finally:
        node.stop()
