"""Orthanc as the PACS in tests and benchmarks: a throw-away server with its own storage.

:class:`OrthancServer` writes an Orthanc configuration into a folder (its own storage
and index, free HTTP and DICOM ports, basic-auth REST user, remote access off, the
node and query tools registered as DICOM modalities), starts ``Orthanc <config>``
with ``TCP_NODELAY=1`` (Nagle off: Orthanc links DCMTK), waits for ``GET /system``,
and stops it by its PID. Orthanc listens on all interfaces, so start it only for a
test or a benchmark and stop it after. The settings follow the measurements in the
project's notes on real DICOM peers (``SyncStorageArea: false``, small ``StableAge``,
``OverwriteInstances: true``).

Imported by the tests as ``orthanc`` (``tests/support`` is on pytest's path) and by
``benchmarks/pacs_roundtrip.py`` after it puts ``tests/support`` on ``sys.path``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from studies import free_port

log = logging.getLogger(__name__)

ORTHANC_AE = "ORTHANC"
_EXECUTABLE = "Orthanc"
_SBIN = "/usr/sbin"  # where Debian installs it; not on a normal user's PATH


def orthanc_executable() -> str | None:
    """The ``Orthanc`` binary on ``PATH`` (or in sbin), or ``None``."""
    return shutil.which(_EXECUTABLE) or shutil.which(_EXECUTABLE, path=_SBIN)


def require_orthanc() -> str:
    """The ``Orthanc`` binary; a missing one skips the test, or fails it when the environment sets ``CI``."""
    import pytest  # only the tests need it

    executable = orthanc_executable()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("Orthanc (Debian package orthanc) is required when CI is set")
        pytest.skip("Orthanc (Debian package orthanc) not installed")
    return executable


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (the message holds Orthanc's answer)."""


@dataclass(frozen=True)
class Modality:
    """A DICOM peer registered in Orthanc's ``DicomModalities`` (as ``[aet, host, port]``)."""

    ae_title: str
    host: str
    port: int


@dataclass
class OrthancServer:
    """One Orthanc process with its own storage under ``folder``.

    Ports are chosen when the object is built, so that a peer (the node) can be
    configured with ``dicom_port`` before Orthanc starts; register modalities in
    ``modalities`` (symbolic name -> :class:`Modality`) before :meth:`start`.

    Parameters
    ----------
    folder
        Holds ``orthanc.json``, ``storage/`` and ``orthanc.log``; created if needed.
    ae_title
        Orthanc's own AE title (``DicomAet``).
    concurrent_jobs
        ``ConcurrentJobs``: synchronous REST stores run as jobs, so this bounds how many
        stores to modalities run at the same time.
    settings
        Further configuration keys, applied last (they override the ones above).
    """

    folder: Path
    ae_title: str = ORTHANC_AE
    concurrent_jobs: int = 4
    modalities: dict[str, Modality] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    user: str = "spect"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.folder / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``."""
        storage = self.folder / "storage"
        config: dict[str, Any] = {
            "Name": "spect-node-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomModalities": {name: [m.ae_title, m.host, m.port] for name, m in self.modalities.items()},
            "SyncStorageArea": False,
            "StableAge": 1,
            "OverwriteInstances": True,
            "ConcurrentJobs": self.concurrent_jobs,
            "SaveJobs": False,
            "DicomScuTimeout": 30,
        }
        config.update(self.settings)
        return config

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0, executable: str | None = None) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers.

        Raises
        ------
        OrthancError
            No binary, the process exited, or it did not answer within ``timeout`` seconds
            (the message ends with the tail of Orthanc's log).
        """
        if self.process is not None:
            raise OrthancError("already started")
        binary = executable or orthanc_executable()
        if binary is None:
            raise OrthancError("the Orthanc binary is not installed (Debian package orthanc)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [binary, str(self.config_path)], stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise OrthancError(f"Orthanc exited with status {code} at start-up:\n{self._log_tail()}")
            try:
                system = self.rest("GET", "/system", timeout=2.0)
                log.info("Orthanc %s up: HTTP %d, DICOM %s:%d", system.get("Version"), *self._ports())
                return self
            except (urllib.error.URLError, ConnectionError, OrthancError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(f"Orthanc did not answer within {timeout} s:\n{self._log_tail()}") from None
                time.sleep(0.05)

    def _ports(self) -> tuple[int, str, int]:
        return self.http_port, self.ae_title, self.dicom_port

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc by its PID (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("Orthanc (pid %d) ignored SIGTERM for %.0f s: killing it", process.pid, timeout)
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> OrthancServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    # ------------------------------------------------------------------ REST

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120.0) -> bytes:
        """One REST call with basic auth; returns the raw answer.

        Raises
        ------
        OrthancError
            Orthanc answered with an HTTP error (the message holds its answer).
        urllib.error.URLError
            Orthanc could not be reached.
        """
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            self.base_url + path, data=body, method=method, headers={"Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    def rest(self, method: str, path: str, payload: Any = None, timeout: float = 120.0) -> Any:
        """A REST call with a JSON body (``payload``, if any) and a JSON answer."""
        body = None if payload is None else json.dumps(payload).encode()
        return json.loads(self.request(method, path, body, timeout=timeout) or b"null")

    def upload(self, data: bytes) -> dict[str, str]:
        """``POST /instances`` one DICOM Part 10 file.

        Returns
        -------
        dict
            Orthanc's answer: ``ID`` (the instance), ``ParentSeries``, ``ParentStudy``,
            ``ParentPatient``, ``Status``.
        """
        answer = json.loads(self.request("POST", "/instances", data))
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload refused: {answer}")
        return {str(key): str(value) for key, value in answer.items()}

    def store_to_modality(self, modality: str, resources: list[str], synchronous: bool = True) -> dict[str, Any]:
        """``POST /modalities/<modality>/store``: Orthanc C-STOREs the resources (any level) to the peer."""
        return self.rest("POST", f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": synchronous})

    def find(self, level: str, query: dict[str, str], expand: bool = False) -> list[Any]:
        """``POST /tools/find``: Orthanc IDs (or expanded resources) at ``level`` (Patient/Study/Series/Instance)."""
        return self.rest("POST", "/tools/find", {"Level": level, "Query": query, "Expand": expand})

    def wait_for_find(
        self, level: str, query: dict[str, str], count: int = 1, timeout: float = 120.0, interval: float = 0.02
    ) -> list[str]:
        """Poll :meth:`find` until it returns at least ``count`` IDs or ``timeout`` seconds pass.

        Returns the IDs of the last answer (fewer than ``count`` on time-out).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [str(item) for item in self.find(level, query)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(interval)

    def series_instances(self, series_id: str) -> list[str]:
        """The instance IDs of one series."""
        return [str(item["ID"]) for item in self.rest("GET", f"/series/{series_id}/instances")]

    def instance_file(self, instance_id: str) -> bytes:
        """``GET /instances/<id>/file``: the stored DICOM file, as received."""
        return self.request("GET", f"/instances/{instance_id}/file")
