"""Synthetic myocardial perfusion SPECT phantoms, deterministic by ``(seed, index)``.

Each case is built analytically in patient coordinates (RAS+, mm; see
``training.phantom_anatomy`` and ``training.phantom_organs``) and sampled on a
camera-like grid (``training.phantom_grid``): 64x64 at 6.25-7 mm or 128x128 at
3.2-4.3 mm in-plane (a 40-55 cm field of view), 56-128 slices, stored mostly in LPS
voxel order as the node's NM reader produces, sometimes with the slices reversed,
sometimes in RAS order. The camera blurs with a 12-16 mm FWHM Gaussian PSF, scales
to clinical counts (myocardial peak ~15-400 counts per voxel), draws Poisson noise,
optionally smooths like a reconstruction post-filter, may zero the outside of a
circular reconstruction field of view, and applies an arbitrary unit scale. The mask
is the LV myocardium (defects included) before blurring, on the same grid.

Datasets use the seed pipeline's layout: ``<root>/NIfTI/<base>.nii.gz``,
``<root>/NIfTI/<base>_mask.nii.gz`` and ``<root>/demographics.csv``.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from training.phantom_grid import CameraGrid, Canvas, sample_grid
from training.phantom_organs import Scene, build_scene

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
ADJACENT_MM = 15.0  # extracardiac activity this close to the myocardium counts as adjacent
HOT_IMAGE_RATIO = 1.0  # ... and as hot when its blurred peak reaches the myocardial peak


@dataclass(frozen=True)
class PhantomSettings:
    """Probabilities (``p_*``) and ranges of the phantom population; the defaults give a wide realistic mix.

    Uptakes are relative to normal myocardium (1.0); ranges are ``(low, high)``.

    Parameters
    ----------
    p_matrix_128, axial_extent_mm, p_anisotropic_slices
        Grid: 128x128 (else 64x64) matrices, the axial extent the slice count aims at,
        slices thicker or thinner (+-15%) than the pixel size.
    p_slices_reversed, p_ras_order
        Voxel order: LPI (negative slice spacing) or RAS; LPS otherwise.
    pixel_mm
        A fixed in-plane pixel size (mm) instead of the camera's draw, e.g. 2.46 (a CZT
        camera's): the same field of view on a finer matrix, every other draw unchanged.
    wall_mm
        Left-ventricular wall thickness (mm), drawn uniformly per case.
    p_defect, p_second_defect, defect_severity
        Perfusion defects in the LAD, LCX and RCA territories (a second one given a
        first) and their uptake reduction.
    p_apical_thinning, p_attenuation_pattern
        Apical thinning; mild inferior (diaphragm) or anterior (breast) reduction.
    p_hot_adjacent, hot_uptake, extracardiac_scale
        The hard case: a gut loop, the liver's left lobe or the stomach against the
        inferior/inferolateral wall, the gut and stomach with ``hot_uptake`` (the liver with
        its own 0.9-1.6); a factor on every abdominal uptake.
    p_stomach, p_spleen, p_kidneys, p_gallbladder
        Optional abdominal organs.
    p_attenuation_corrected
        Otherwise counts fall off with depth (non-attenuation-corrected reconstruction).
    fwhm_mm, myo_peak_counts, p_low_counts, low_counts
        Gaussian PSF; the myocardial peak of the noise-free image in counts per voxel
        (log-uniform), from ``low_counts`` for low-count cases.
    p_postfilter, postfilter_sigma_vox, p_circular_fov, p_outside_counts
        Reconstruction look: a Gaussian post-filter (voxels), zeros outside the inscribed
        circle, a low count level added over the whole reconstruction circle (body and air
        alike; ``total_counts`` in the parameters is counted before the circle is applied).
    p_unit_scale, unit_scale_log10
        An arbitrary global scale (reconstructions come in arbitrary units).
    noise
        ``False`` returns the expected counts; the Poisson draw has its own random
        stream, so every other parameter of the case stays the same.
    """

    p_matrix_128: float = 0.5
    axial_extent_mm: tuple[float, float] = (300.0, 450.0)
    p_anisotropic_slices: float = 0.15
    p_slices_reversed: float = 0.2
    p_ras_order: float = 0.2
    pixel_mm: float | None = None
    wall_mm: tuple[float, float] = (8.0, 12.0)
    p_defect: float = 0.55
    p_second_defect: float = 0.3
    defect_severity: tuple[float, float] = (0.3, 0.9)
    p_apical_thinning: float = 0.25
    p_attenuation_pattern: float = 0.25
    p_hot_adjacent: float = 0.25
    hot_uptake: tuple[float, float] = (1.0, 2.0)
    extracardiac_scale: float = 1.0
    p_stomach: float = 0.4
    p_spleen: float = 0.5
    p_kidneys: float = 0.5
    p_gallbladder: float = 0.15
    p_attenuation_corrected: float = 0.4
    fwhm_mm: tuple[float, float] = (12.0, 16.0)
    myo_peak_counts: tuple[float, float] = (50.0, 400.0)
    p_low_counts: float = 0.2
    low_counts: tuple[float, float] = (15.0, 50.0)
    p_postfilter: float = 0.5
    postfilter_sigma_vox: tuple[float, float] = (0.3, 1.0)
    p_circular_fov: float = 0.5
    p_outside_counts: float = 0.5
    p_unit_scale: float = 0.7
    unit_scale_log10: tuple[float, float] = (-2.0, 3.0)
    noise: bool = True

    @classmethod
    def hard(cls) -> PhantomSettings:
        """A hard-case-heavy mix: hot organs against the heart, severe and multiple defects, low counts."""
        return cls(
            p_defect=0.8,
            p_second_defect=0.5,
            defect_severity=(0.5, 0.9),
            p_hot_adjacent=0.6,
            extracardiac_scale=1.3,
            p_low_counts=0.4,
            p_attenuation_pattern=0.4,
            p_apical_thinning=0.4,
        )


@dataclass
class PhantomCase:
    """One generated case.

    ``volume`` float32 counts (non-negative) and ``mask`` uint8 0/1, both ``(I, J, K)`` in
    the stored voxel order of ``affine`` (float64 ``(4, 4)``, RAS+); ``params`` holds the
    flat values written to ``demographics.csv``.
    """

    base: str
    patient_id: str
    volume: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    params: dict[str, object]


def case_base(seed: int, index: int) -> str:
    """File base name of case ``index`` of population ``seed``."""
    return f"phantom_s{seed}_{index:04d}"


def patient_id(seed: int, index: int) -> str:
    """Stable patient ID of case ``index`` of population ``seed`` (one case per patient)."""
    return f"PH{seed}-{index:05d}"


def _adjacency(scene: Scene, canvas: Canvas, blurred: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """(uptake ratio, image ratio) of the hottest extracardiac activity within ``ADJACENT_MM`` of the mask.

    The uptake ratio compares the organ's uptake with the median myocardial uptake; the
    image ratio compares the blurred organ alone with the blurred myocardial peak.
    """
    margin = ADJACENT_MM + 3.0 * float(np.max(sigma * np.asarray(canvas.grid.spacing))) + 5.0
    found = canvas.region(*scene.lv.bounds(margin))
    if found is None:
        return 0.0, 0.0
    slices = found[0]
    mask = scene.mask[slices] > 0
    distance = ndimage.distance_transform_edt(~mask, sampling=canvas.grid.spacing)
    shell = (distance > 0) & (distance <= ADJACENT_MM)
    extra = scene.extracardiac[slices]
    if not shell.any() or not mask.any():
        return 0.0, 0.0
    uptake_ratio = float(extra[shell].max() / np.median(scene.activity[slices][mask]))
    image = ndimage.gaussian_filter(extra, sigma, mode="constant")
    image_ratio = float(image[shell].max() / blurred[slices][mask].max())
    return uptake_ratio, image_ratio


def _camera(
    scene: Scene, grid: CameraGrid, rng: np.random.Generator, noise_rng: np.random.Generator, s: PhantomSettings
) -> tuple[np.ndarray, dict[str, object], np.ndarray, np.ndarray]:
    """Blur, count scaling, noise, post-filter, FOV and unit scale.

    Returns the float32 volume ``(I, J, K)`` (RAS order), the camera's parameters, the
    noise-free blurred activity and the PSF sigma per axis (voxels). Every random value
    is drawn whatever the settings, so that a knob changes only what it controls.
    """
    fwhm = rng.uniform(*s.fwhm_mm)
    fwhm_z = rng.uniform(max(s.fwhm_mm[0], 0.9 * fwhm), min(s.fwhm_mm[1], 1.15 * fwhm))  # axial resolution differs
    low = rng.random() < s.p_low_counts
    peak_counts = float(np.exp(rng.uniform(*np.log(s.low_counts if low else s.myo_peak_counts))))
    radius_frac = rng.uniform(0.92, 1.0)
    outside_level, post, log_scale = (
        rng.uniform(0.002, 0.01),
        rng.uniform(*s.postfilter_sigma_vox),
        rng.uniform(*s.unit_scale_log10),
    )
    chances = [s.p_outside_counts, s.p_postfilter, s.p_circular_fov, s.p_unit_scale]
    use_outside, use_post, circular, use_scale = (bool(r < p) for r, p in zip(rng.random(4), chances, strict=True))
    outside = outside_level * peak_counts if use_outside else 0.0
    post = post if use_post else 0.0
    scale = float(10**log_scale) if use_scale else 1.0

    sigma = np.array([fwhm, fwhm, fwhm_z]) * FWHM_TO_SIGMA / np.asarray(grid.spacing)
    blurred = ndimage.gaussian_filter(scene.activity, sigma, mode="constant")
    expected = np.clip(blurred, 0.0, None) * np.float32(peak_counts / float(blurred[scene.mask > 0].max()))
    n = grid.shape[0]
    offsets = np.arange(n) - (n - 1) / 2
    in_circle = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= (radius_frac * n / 2) ** 2)[:, :, None]
    if outside:
        expected += np.float32(outside) * in_circle
    counts = noise_rng.poisson(expected).astype(np.float32) if s.noise else expected.astype(np.float32)
    if post:
        counts = ndimage.gaussian_filter(counts, post)
    if circular:
        counts *= in_circle
    volume = np.clip(counts * np.float32(scale), 0.0, None).astype(np.float32)
    params = {
        "fwhm_mm": round(fwhm, 2),
        "fwhm_z_mm": round(fwhm_z, 2),
        "myo_peak_counts": round(peak_counts, 1),
        "low_counts": low,
        "total_counts": int(round(float(counts.sum(dtype=np.float64)))),
        "postfilter_sigma_vox": round(post, 3),
        "circular_fov": circular,
        "outside_counts": round(outside, 3),
        "unit_scale": scale,
    }
    return volume, params, blurred, sigma


def generate_case(seed: int, index: int, settings: PhantomSettings = PhantomSettings()) -> PhantomCase:
    """Generate case ``index`` of population ``seed``: bit-identical for the same pair and settings.

    Parameters
    ----------
    seed, index
        Population and case; every random draw comes from ``default_rng([seed, index])``
        (the Poisson noise from ``default_rng([seed, index, 1])``), no global state.
    settings
        The population's knobs.

    Returns
    -------
    PhantomCase
        ``volume`` float32 ``(I, J, K)`` counts (non-negative) and ``mask`` uint8 0/1 (the
        LV myocardium, defects included, before blurring) in the stored voxel order of
        ``affine`` (RAS+, float64 ``(4, 4)``), and the flat ``params`` of ``demographics.csv``.
    """
    rng = np.random.default_rng([seed, index])
    noise_rng = np.random.default_rng([seed, index, 1])
    s = settings
    grid = sample_grid(
        rng, s.p_matrix_128, s.p_slices_reversed, s.p_ras_order, s.axial_extent_mm, s.p_anisotropic_slices, s.pixel_mm
    )
    canvas = Canvas(grid)
    scene = build_scene(rng, canvas, s)
    volume, camera, blurred, sigma = _camera(scene, grid, rng, noise_rng, s)
    uptake_ratio, image_ratio = _adjacency(scene, canvas, blurred, sigma)
    affine = grid.affine()
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    n_mask = int(scene.mask.sum())
    params: dict[str, object] = {
        "seed": seed,
        "index": index,
        "matrix": grid.shape[0],
        "n_slices": grid.shape[2],
        "spacing_mm": round(grid.spacing[0], 3),
        "slice_mm": round(grid.spacing[2], 3),
        "fov_mm": round(float(grid.fov_mm[0]), 1),
        "axial_fov_mm": round(float(grid.fov_mm[2]), 1),
        "orientation": "".join(nib.aff2axcodes(affine)),
        **camera,
        **scene.params,
        "adjacent_uptake_ratio": round(uptake_ratio, 3),
        "adjacent_image_ratio": round(image_ratio, 3),
        "hot_extracardiac_adjacent": image_ratio >= HOT_IMAGE_RATIO,
        "myocardium_ml": round(n_mask * voxel_ml, 1),
        "mask_voxels": n_mask,
        "mask_fraction": round(n_mask / scene.mask.size, 6),
    }
    return PhantomCase(
        case_base(seed, index), patient_id(seed, index), grid.store(volume), grid.store(scene.mask), affine, params
    )


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` ``(I, J, K)`` with its RAS+ ``affine`` as NIfTI-1 (qform and sform set, mm)."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


FAMILIES = ("anatomical", "basic")


def _write_case(
    root: Path, seed: int, index: int, settings: PhantomSettings, family: str = "anatomical"
) -> dict[str, object]:
    if family == "basic":
        from training.phantom_basic import generate_basic_case  # the second, independent family

        case = generate_basic_case(seed, index)
    else:
        case = generate_case(seed, index, settings)
    save_nifti(case.volume, case.affine, root / "NIfTI" / f"{case.base}.nii.gz")
    save_nifti(case.mask, case.affine, root / "NIfTI" / f"{case.base}_mask.nii.gz")
    return {"file_base": case.base, "patient_id": case.patient_id, **case.params}


def write_dataset(
    root: Path,
    n_cases: int,
    seed: int,
    settings: PhantomSettings = PhantomSettings(),
    start_index: int = 0,
    progress: bool = True,
    workers: int = 1,
    family: str = "anatomical",
) -> list[dict[str, object]]:
    """Write ``<root>/NIfTI/<base>.nii.gz``, ``<base>_mask.nii.gz`` and ``<root>/demographics.csv``.

    Parameters
    ----------
    root
        Dataset root (created if needed); an existing ``demographics.csv`` is replaced.
    n_cases, seed, start_index
        Cases ``start_index .. start_index + n_cases - 1`` of population ``seed``.
    settings
        The population's knobs.
    progress
        Show a tqdm progress bar.
    workers
        Processes sharing the work; the output does not depend on it.
    family
        ``anatomical`` (this module, the default) or ``basic`` (:mod:`training.phantom_basic`,
        a simpler independent generator; ``settings`` do not apply to it).

    Returns
    -------
    list of dict
        The CSV rows, one per case: ``file_base``, ``patient_id``, then the case's parameters.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown phantom family {family!r}; expected one of {', '.join(FAMILIES)}")
    root = Path(root)
    (root / "NIfTI").mkdir(parents=True, exist_ok=True)
    indices = range(start_index, start_index + n_cases)
    bar = tqdm(total=n_cases, desc="phantoms", unit="case", disable=not progress)
    rows: list[dict[str, object]] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            jobs = ([root] * n_cases, [seed] * n_cases, indices, [settings] * n_cases, [family] * n_cases)
            for row in pool.map(_write_case, *jobs):
                rows.append(row)
                bar.update()
    else:
        for index in indices:
            rows.append(_write_case(root, seed, index, settings, family))
            bar.update()
    bar.close()
    fields = list(rows[0]) if rows else ["file_base", "patient_id"]
    with (root / "demographics.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %d phantom case(s) under %s (settings %s)", len(rows), root, asdict(settings))
    return rows
