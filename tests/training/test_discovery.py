"""Dataset discovery with the seed's rules, and reproducible splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.discovery import Case, discover, read_demographics, read_patient_ids
from training.split import Split, make_split


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_pairs_and_reports_unmatched(tmp_path: Path) -> None:
    nifti = tmp_path / "NIfTI"
    _touch(nifti, "a.nii.gz", "a_mask.nii.gz", "b.nii", "b_mask.nii", "c.nii.gz", "d_mask.nii.gz", "notes.txt")
    report = discover(nifti)
    assert [c.base for c in report.cases] == ["a", "b", "c"]
    assert [c.base for c in report.masked_cases] == ["a", "b"]
    assert report.volumes_without_mask == ["c"]
    assert report.masks_without_volume == ["d"]
    assert "1 volume(s) without a mask: c" in report.summary()
    assert "1 mask(s) without a volume: d" in report.summary()


def test_nii_gz_wins_over_nii(tmp_path: Path) -> None:
    _touch(tmp_path, "a.nii", "a.nii.gz", "a_mask.nii", "a_mask.nii.gz")
    report = discover(tmp_path)
    (case,) = report.cases
    assert case.volume.name == "a.nii.gz" and case.mask is not None and case.mask.name == "a_mask.nii.gz"
    assert len(report.duplicates) == 2
    assert {d[2].name for d in report.duplicates} == {"a.nii", "a_mask.nii"}
    only_nii = discover(tmp_path, extensions=[".nii", ".nii.gz"])
    assert only_nii.cases[0].volume.name == "a.nii"


def test_recursive_and_suffixes(tmp_path: Path) -> None:
    _touch(tmp_path, "p1/x_vol.nii.gz", "p1/x_seg.nii.gz", "p2/y_vol.nii.gz", "p2/y_seg.nii.gz", "top_vol.nii.gz")
    flat = discover(tmp_path, vol_suffix="_vol", mask_suffix="_seg", recursive=False)
    assert [c.base for c in flat.cases] == ["top"] and flat.volumes_without_mask == ["top"]
    deep = discover(tmp_path, vol_suffix="_vol", mask_suffix="_seg", recursive=True)
    assert [c.base for c in deep.masked_cases] == ["x", "y"]


def test_per_patient_folders_with_the_same_file_names_are_separate_cases(tmp_path: Path) -> None:
    _touch(tmp_path, "P1/scan.nii.gz", "P1/scan_mask.nii.gz", "P2/scan.nii.gz", "P2/scan_mask.nii.gz", "P3/scan.nii")
    _touch(tmp_path, "P2/scan.nii", "images/solo.nii.gz", "labels/solo_mask.nii.gz")
    report = discover(tmp_path)
    pairs = {c.base: (c.volume.relative_to(tmp_path).as_posix(), c.mask and c.mask.parent.name) for c in report.cases}
    assert pairs == {
        "P1_scan": ("P1/scan.nii.gz", "P1"),
        "P2_scan": ("P2/scan.nii.gz", "P2"),  # each volume with the mask of its own folder
        "P3_scan": ("P3/scan.nii", None),
        "solo": ("images/solo.nii.gz", "labels"),  # a unique name pairs across folders, as before
    }
    assert report.volumes_without_mask == ["P3_scan"]
    assert [(base, ignored.name) for base, _kept, ignored in report.duplicates] == [("P2_scan", "scan.nii")]


def test_a_mask_is_never_borrowed_from_another_folder(tmp_path: Path) -> None:
    _touch(tmp_path, "P1/scan_mask.nii.gz", "P2/scan.nii.gz", "P2/scan_mask.nii.gz", "scan.nii.gz")
    report = discover(tmp_path)
    pairs = {c.base: (c.volume.relative_to(tmp_path).as_posix(), c.mask and c.mask.parent.name) for c in report.cases}
    assert pairs == {"P2_scan": ("P2/scan.nii.gz", "P2"), "scan": ("scan.nii.gz", None)}
    assert report.masks_without_volume == ["P1_scan"]  # P1's volume is missing: its mask is reported, not lent
    assert report.volumes_without_mask == ["scan"]


def test_two_files_claiming_one_case_name_are_reported(tmp_path: Path) -> None:
    _touch(tmp_path, "P1/scan.nii.gz", "P1/scan_mask.nii.gz", "P2/scan.nii.gz", "P1_scan.nii.gz")
    report = discover(tmp_path)
    assert [c.base for c in report.cases] == ["P1_scan", "P2_scan"]
    assert [(base, kept.name, ignored.name) for base, kept, ignored in report.duplicates] == [
        ("P1_scan", "P1_scan.nii.gz", "scan.nii.gz")
    ]
    assert "duplicate 'P1_scan'" in report.summary()


def test_files_neither_volume_nor_mask_are_reported(tmp_path: Path) -> None:
    _touch(tmp_path, "a_vol.NII.GZ", "a_seg.nii.gz", "b.nii.gz", "readme.txt")
    report = discover(tmp_path, vol_suffix="_vol", mask_suffix="_seg")
    assert [(c.base, c.volume.name) for c in report.masked_cases] == [("a", "a_vol.NII.GZ")]
    assert [p.name for p in report.unrecognised] == ["b.nii.gz"]
    assert "1 file(s) neither a volume nor a mask" in report.summary()


def test_separate_mask_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "vols", "a.nii.gz", "b.nii.gz")
    _touch(tmp_path / "labels", "a.nii.gz", "b_mask.nii.gz")  # either naming works in a masks folder
    report = discover(tmp_path / "vols", tmp_path / "labels")
    assert [(c.base, c.mask.parent.name if c.mask else None) for c in report.cases] == [
        ("a", "labels"),
        ("b", "labels"),
    ]


def test_masks_folder_inside_the_volumes_folder(tmp_path: Path) -> None:
    _touch(tmp_path / "vols", "a_ct.nii.gz", "masks/a_ct.nii.gz")  # the mask named exactly like its volume
    report = discover(tmp_path / "vols", tmp_path / "vols" / "masks", vol_suffix="_ct")
    assert [(c.base, c.volume.parent.name, c.mask and c.mask.parent.name) for c in report.cases] == [
        ("a", "vols", "masks")
    ]
    assert not report.masks_without_volume and not report.unrecognised


def test_mask_as_volume_only_when_asked(tmp_path: Path) -> None:
    _touch(tmp_path, "m_mask.nii.gz")
    assert discover(tmp_path).cases == []
    (case,) = discover(tmp_path, allow_mask_as_volume=True).cases
    assert case.volume == case.mask


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover(tmp_path / "nowhere")


def test_demographics(tmp_path: Path) -> None:
    csv_path = tmp_path / "demographics.csv"
    csv_path.write_text("file_base,patient_id,age\na,P1,60\nb,P1,61\nc,P2,70\n")
    assert read_patient_ids(csv_path) == {"a": "P1", "b": "P1", "c": "P2"}
    assert read_demographics(csv_path)["c"]["age"] == "70"
    assert read_patient_ids(tmp_path / "absent.csv") == {}
    csv_path.write_text("file_base,patient_id\na,P1\n", encoding="utf-8-sig")  # as a spreadsheet saves it
    assert read_patient_ids(csv_path) == {"a": "P1"}


def _cases(n: int, per_patient: int = 1) -> list[Case]:
    return [Case(f"c{i:03d}", Path(f"c{i:03d}.nii.gz"), Path("m"), f"P{i // per_patient}") for i in range(n)]


def test_split_is_reproducible_and_order_independent(tmp_path: Path) -> None:
    cases = _cases(40)
    a = make_split(cases, 0.15, 0.15, seed=7)
    b = make_split(list(reversed(cases)), 0.15, 0.15, seed=7)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (28, 6, 6)
    assert set(a.train) | set(a.val) | set(a.test) == {c.base for c in cases}
    assert make_split(cases, 0.15, 0.15, seed=8) != a
    saved = a.save(tmp_path / "split.json")
    assert Split.load(saved) == a


def test_split_keeps_patients_together() -> None:
    split = make_split(_cases(30, per_patient=3), 0.2, 0.2, seed=1)
    subsets = [set(split.train), set(split.val), set(split.test)]
    for patient in range(10):
        bases = {f"c{i:03d}" for i in range(patient * 3, patient * 3 + 3)}
        assert sum(bool(bases & s) for s in subsets) == 1
        assert any(bases <= s for s in subsets)


def test_split_always_leaves_cases_to_train_on() -> None:
    for n in (2, 3):
        split = make_split(_cases(n), val_size=0.3, test_size=0.3, seed=1)
        assert split.train and split.val  # the test set gave way first
        assert sorted(split.train + split.val + split.test) == [f"c{i:03d}" for i in range(n)]
