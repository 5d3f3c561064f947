"""Dataset discovery with the seed's rules, and a clear report of what did not pair.

A volume is ``<base><vol_suffix><ext>``, its mask ``<base><mask_suffix><ext>``, in
``vols_dir`` / ``masks_dir`` (default ``<data_root>/NIfTI``), searched recursively or
not. When a base exists with several extensions the first extension of the configured
list wins (``.nii.gz`` before ``.nii``; extensions match in any letter case). Volumes or masks of
the same name in different folders (per-patient folders) are different cases, each paired
with the mask in its own folder and named ``<folder>_<base>`` (``<base>`` in the searched
folder itself). Cases without a mask are reported, never trained on as empty masks; so
are files with a NIfTI extension that are neither a volume (``vol_suffix``) nor a mask,
and case names that two files would share.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One volume and (maybe) its mask.

    ``volume`` is the mask itself only in the explicit ``allow_mask_as_volume`` debug mode.
    """

    base: str
    volume: Path
    mask: Path | None
    patient_id: str | None = None


@dataclass
class DiscoveryReport:
    """What discovery found."""

    cases: list[Case] = field(default_factory=list)
    volumes_without_mask: list[str] = field(default_factory=list)
    masks_without_volume: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, Path, Path]] = field(default_factory=list)  # (base, kept, ignored)
    unrecognised: list[Path] = field(default_factory=list)  # NIfTI files neither volume nor mask

    @property
    def masked_cases(self) -> list[Case]:
        """Cases with a mask (the only ones training and evaluation use)."""
        return [c for c in self.cases if c.mask is not None]

    def summary(self) -> str:
        """Human-readable report, one line per kind of finding."""
        lines = [f"{len(self.cases)} cases ({len(self.masked_cases)} with a mask)"]
        if self.volumes_without_mask:
            lines.append(
                f"{len(self.volumes_without_mask)} volume(s) without a mask: {_preview(self.volumes_without_mask)}"
            )
        if self.masks_without_volume:
            lines.append(
                f"{len(self.masks_without_volume)} mask(s) without a volume: {_preview(self.masks_without_volume)}"
            )
        for base, kept, ignored in self.duplicates:
            lines.append(f"duplicate {base!r}: using {kept}, ignoring {ignored}")
        if self.unrecognised:
            names = [str(p) for p in self.unrecognised]
            lines.append(f"{len(names)} file(s) neither a volume nor a mask (suffixes): {_preview(names)}")
        return "\n".join(lines)


def _preview(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n})" if len(items) > n else "")


def _split_extension(name: str, extensions: Sequence[str]) -> tuple[str, str] | None:
    lowered = name.lower()
    for ext in sorted(extensions, key=len, reverse=True):  # .nii.gz before .nii
        if lowered.endswith(ext.lower()):
            return name[: -len(ext)], ext
    return None


def _list_files(folder: Path, recursive: bool, skip: Path | None = None) -> list[Path]:
    """Files of ``folder`` (and its sub-folders when ``recursive``), leaving out those under ``skip``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    skipped = skip.resolve() if skip is not None else None
    return sorted(p for p in pattern if p.is_file() and (skipped is None or not p.resolve().is_relative_to(skipped)))


def _without(stem: str, suffix: str) -> str:
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


Found = list[tuple[Path, str, str]]  # (path, extension, folder relative to the searched root)


def _pick(base: str, found: Found, extensions: Sequence[str], report: DiscoveryReport) -> Path | None:
    """The file of ``found`` with the preferred extension; the others are reported as duplicates."""
    if not found:
        return None
    candidates = sorted(found, key=lambda entry: (extensions.index(entry[1]), str(entry[0])))
    kept = candidates[0][0]
    for path, _ext, _folder in candidates[1:]:
        report.duplicates.append((base, kept, path))
    return kept


def _per_folder(base: str, volumes: Found, masks: Found) -> list[tuple[str, Found, Found]]:
    """``(case base, volumes, masks)``: one case, or one per folder when the volumes or the masks
    named ``base`` lie in several folders.

    Per-patient folders (``P1/scan.nii.gz``, ``P2/scan.nii.gz``) are different cases, each
    paired with the mask of its own folder and named after it (``P1_scan``, ``P2_scan``); a
    mask is never borrowed from another patient's folder. A volume and a mask each alone in
    its folder (``images/a.nii.gz``, ``labels/a_mask.nii.gz``) pair across folders.
    """
    volume_folders = {folder for _path, _ext, folder in volumes}
    mask_folders = {folder for _path, _ext, folder in masks}
    if len(volume_folders) <= 1 and len(mask_folders) <= 1:
        return [(base, volumes, masks)]
    return [
        (
            base if folder == "." else f"{folder.replace('/', '_')}_{base}",
            [v for v in volumes if v[2] == folder],
            [m for m in masks if m[2] == folder],
        )
        for folder in sorted(volume_folders | mask_folders)
    ]


def discover(
    vols_dir: Path,
    masks_dir: Path | None = None,
    *,
    vol_suffix: str = "",
    mask_suffix: str = "_mask",
    extensions: Sequence[str] = (".nii.gz", ".nii"),
    recursive: bool = True,
    allow_mask_as_volume: bool = False,
    patient_ids: dict[str, str] | None = None,
) -> DiscoveryReport:
    """Pair volumes with masks.

    Parameters
    ----------
    vols_dir
        Folder of volumes (and of masks when ``masks_dir`` is ``None`` or the same folder).
    masks_dir
        Separate folder of masks; there every file is a mask (its ``mask_suffix`` optional).
    allow_mask_as_volume
        Debug only: a mask without a volume becomes a case whose volume is the mask.
    patient_ids
        ``base -> patient_id`` (from ``demographics.csv``) to attach to the cases.
    """
    extensions = list(extensions)
    masks_root = Path(masks_dir) if masks_dir is not None else None
    if masks_root is not None and masks_root.resolve() == Path(vols_dir).resolve():
        masks_root = None
    volumes: dict[str, Found] = {}
    masks: dict[str, Found] = {}
    report = DiscoveryReport()

    def classify(root: Path, masks_only: bool, skip: Path | None = None) -> None:
        for path in _list_files(root, recursive, skip):
            split = _split_extension(path.name, extensions)
            if split is None:
                continue
            stem, ext = split
            entry = (path, ext, path.parent.relative_to(root).as_posix())
            if mask_suffix and stem.endswith(mask_suffix):
                masks.setdefault(_without(stem, mask_suffix), []).append(entry)
            elif masks_only:  # also a mask named exactly like its volume
                masks.setdefault(_without(stem, vol_suffix), []).append(entry)
            elif not vol_suffix or stem.endswith(vol_suffix):
                volumes.setdefault(_without(stem, vol_suffix), []).append(entry)
            else:
                report.unrecognised.append(path)

    classify(Path(vols_dir), masks_only=False, skip=masks_root)  # a masks folder inside holds no volumes
    if masks_root is not None:
        classify(masks_root, masks_only=True)

    ids = patient_ids or {}
    named: dict[str, Path] = {}  # case name -> the file that took it first
    for name in sorted(set(volumes) | set(masks)):
        for base, found_volumes, found_masks in _per_folder(name, volumes.get(name, []), masks.get(name, [])):
            volume = _pick(base, found_volumes, extensions, report)
            mask = _pick(base, found_masks, extensions, report)
            file = volume or mask
            assert file is not None  # every folder _per_folder returns holds one or the other
            if (first := named.setdefault(base, file)) != file:  # "P1/scan" and "P1_scan" both name P1_scan
                report.duplicates.append((base, first, file))
                continue
            if volume is None:
                report.masks_without_volume.append(base)
                if allow_mask_as_volume and mask is not None:
                    log.warning("%s: using the mask as its own volume (allow_mask_as_volume, debug only)", base)
                    report.cases.append(Case(base, mask, mask, ids.get(base)))
                continue
            if mask is None:
                report.volumes_without_mask.append(base)
            report.cases.append(Case(base, volume, mask, ids.get(base)))
    return report


def read_demographics(csv_path: Path) -> dict[str, dict[str, str]]:
    """Rows of a ``demographics.csv`` keyed by ``file_base`` (or ``base``); empty when absent."""
    if not csv_path.is_file():
        return {}
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's byte-order mark
        reader = csv.DictReader(handle)
        columns = {c.lower().strip(): c for c in (reader.fieldnames or [])}
        base_col = columns.get("file_base") or columns.get("base")
        if base_col is None:
            log.warning("%s: no file_base column; ignoring it", csv_path)
            return {}
        return {row[base_col]: dict(row) for row in reader if row.get(base_col)}


def read_patient_ids(csv_path: Path) -> dict[str, str]:
    """``file_base -> patient_id`` from a ``demographics.csv`` (``patient_id``/``PatientID`` column)."""
    ids = {}
    for base, row in read_demographics(csv_path).items():
        lowered = {k.lower().strip(): v for k, v in row.items() if k}
        pid = lowered.get("patient_id") or lowered.get("patientid")
        if pid:
            ids[base] = pid
    return ids
