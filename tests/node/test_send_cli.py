"""``spect-node send`` on files and export folders, to a DCMTK ``storescp`` on 127.0.0.1.

An export folder holds more than DICOM instances (a README, a DICOMDIR): those are
skipped with a warning naming each, and counted; a file named explicitly must be DICOM.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from peers import STORESCP_AE
from pydicom.fileset import FileSet
from studies import spect_like_volume

from node.cli import main as spect_node
from node.nm_writer import dataset_to_bytes, nifti_to_nm_series


@pytest.fixture
def instances(tmp_path: Path) -> list[Path]:
    """Two NM slice instances of one series, written as Part 10 files under ``tmp_path/study``."""
    folder = tmp_path / "study"
    folder.mkdir()
    paths = []
    for n, ds in enumerate(nifti_to_nm_series(spect_like_volume(), patient_name="Send^Cli", patient_id="SENDCLI")[:2]):
        path = folder / f"slice{n}.dcm"
        path.write_bytes(dataset_to_bytes(ds))
        paths.append(path)
    return paths


def _to(port: int) -> list[str]:
    return ["--to", f"{STORESCP_AE}@127.0.0.1:{port}", "--aet", "TESTSCU"]


def _received_uids(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(path).SOPInstanceUID) for path in folder.iterdir()}


def test_an_export_folder_with_a_readme_and_a_dicomdir_is_sent_without_them(
    tmp_path: Path, instances: list[Path], destination_scp: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A media export (DICOMDIR + instances in sub-folders) plus a README: the instances go, the rest is named."""
    export = tmp_path / "export"
    file_set = FileSet()
    for path in instances:
        file_set.add(path)
    file_set.write(export)
    (export / "README.txt").write_text("Exported by a viewer. Open DICOMDIR to view.\n")
    port, received = destination_scp

    assert spect_node(["send", str(export), *_to(port)]) == 0
    captured = capsys.readouterr()
    assert "sent 2/2 instance(s)" in captured.out and "skipped 2 non-DICOM file(s)" in captured.out
    assert f"{export / 'README.txt'}: not a DICOM file" in captured.err
    assert f"{export / 'DICOMDIR'}: a DICOMDIR" in captured.err
    assert _received_uids(received) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in instances}


def test_a_non_dicom_file_named_explicitly_is_an_error_naming_it(
    tmp_path: Path, instances: list[Path], destination_scp: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.txt"
    readme.write_text("not DICOM\n")
    port, received = destination_scp

    assert spect_node(["send", str(instances[0]), str(readme), *_to(port)]) == 2
    assert f"{readme}: not a DICOM file" in capsys.readouterr().err
    assert list(received.iterdir()) == []  # nothing sent: the command stopped before associating


def test_a_folder_without_any_dicom_instance_is_an_error(
    tmp_path: Path, destination_scp: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("nothing to see\n")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n")
    port, received = destination_scp

    assert spect_node(["send", str(folder), *_to(port)]) == 2
    err = capsys.readouterr().err
    assert f"no DICOM instance to send in {folder} (2 non-DICOM file(s))" in err
    assert f"{folder / 'README.txt'}: not a DICOM file" in err and f"{folder / 'report.pdf'}: not a DICOM file" in err
    assert list(received.iterdir()) == []


def test_a_damaged_instance_in_a_folder_stops_the_send_naming_it(
    tmp_path: Path, instances: list[Path], destination_scp: tuple[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An instance cut short (an interrupted copy) is not skipped as 'not DICOM': a series without it is worse."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in instances:
        (folder / path.name).write_bytes(path.read_bytes())
    whole = instances[1].read_bytes()
    cut = folder / instances[1].name
    cut.write_bytes(whole[:200])  # the Part 10 header survives, the data set does not
    port, received = destination_scp

    assert spect_node(["send", str(folder), *_to(port)]) == 2
    err = capsys.readouterr().err
    assert str(cut) in err and ("damaged DICOM file" in err or "without SOP Class/Instance UID" in err)
    assert "Traceback" not in err
    assert list(received.iterdir()) == []  # nothing sent


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("PACS127.0.0.1:4242", "expected AE_TITLE@host:port"),
        ("PACS@127.0.0.1:70000", "port 70000 is not in 1..65535"),
        ("SEVENTEEN_LETTERS@127.0.0.1:4242", "the AE title 'SEVENTEEN_LETTERS' is longer than 16 characters"),
        ("PACS@::1:4242", "expected AE_TITLE@host:port"),  # an IPv6 address needs its brackets
        ("PACS@[1.2.3.4]:4242", "'1.2.3.4' in brackets is not an IPv6 address"),
        ("PACS@[:]:4242", "':' in brackets is not an IPv6 address"),
    ],
)
def test_a_bad_destination_is_named(tmp_path: Path, to: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert spect_node(["send", str(tmp_path), "--to", to]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("PACS@127.0.0.1:4242", "127.0.0.1", 4242), ("PACS@pacs.example:104", "pacs.example", 104),
     ("PACS@[::1]:11112", "::1", 11112), ("PACS@[fe80::1%eth0]:104", "fe80::1%eth0", 104)],
)  # fmt: skip
def test_destinations_parse_and_print_back(text: str, host: str, port: int) -> None:
    from node.network import PeerAddress

    peer = PeerAddress.parse(text)
    assert (peer.ae_title, peer.host, peer.port) == ("PACS", host, port)
    assert str(peer) == text
