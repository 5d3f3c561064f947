"""Finding the real DICOM peers the tests use (DCMTK, dicom3tools, openssl)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of a peer tool; a missing one fails when CI is set (``make peers`` installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI must have the real peers (make peers)")
        pytest.skip(f"{name} is not installed")
    return path
