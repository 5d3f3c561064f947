"""Volume in, mask out: the one object the node and the training tools use for inference."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from seg.checkpoint import Checkpoint, load_checkpoint
from seg.inference import InferenceEngine, Precision, resolve_device
from seg.postprocess import Postprocessor, PostprocessSettings, keep_largest_component
from seg.preprocess import GridMap, Orientation, from_model_grid, prepare_input, voxel_spacing

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Everything one inference produced.

    Attributes
    ----------
    mask
        uint8 ``(I, J, K)`` post-processed mask on the input's own grid and voxel order.
    raw_mask
        uint8 ``(I, J, K)``: the thresholded network output on the input grid, no post-processing.
    probability
        float32 ``target_shape`` sigmoid output on the model grid (canonical order; the
        heart box when the model segments in two passes).
    grid, orientation
        Where the model grid lay in the input (to map other thresholds back, see :meth:`Predictor.masks`).
    timings
        Seconds per stage: ``preprocess``, ``infer``, ``postprocess``.
    """

    mask: np.ndarray
    raw_mask: np.ndarray
    probability: np.ndarray
    grid: GridMap
    orientation: Orientation
    timings: dict[str, float] = field(default_factory=dict)


def gated_soft_map(probability: np.ndarray, post_mask: np.ndarray, threshold: float) -> np.ndarray:
    """A soft map whose ``>= threshold`` set is exactly ``post_mask`` on the model grid.

    Voxels kept by post-processing keep their probability (at least ``threshold``),
    voxels it removed become 0, voxels it added become ``threshold``. Resampling this map
    linearly to a finer input grid keeps the network's sub-voxel boundary instead of a
    staircase of whole model-grid voxels.

    Parameters
    ----------
    probability
        float32 ``(I, J, K)`` in [0, 1].
    post_mask
        bool/uint8 ``(I, J, K)``, the post-processed binary mask.

    Returns
    -------
    numpy.ndarray
        float32 ``(I, J, K)`` in [0, 1].
    """
    post = post_mask.astype(bool)
    below = np.where(probability >= threshold, 0.0, probability)
    return np.where(post, np.maximum(probability, threshold), below).astype(np.float32)


def locate_heart(mask: np.ndarray, grid: GridMap) -> np.ndarray | None:
    """Centre of the largest connected component of ``mask``, in input voxel coordinates.

    Parameters
    ----------
    mask
        bool ``grid.shape`` mask on the whole field of view (canonical order).

    Returns
    -------
    numpy.ndarray or None
        ``(3,)`` float centre of the mask voxels in the largest cluster (pieces closer than
        ~4 voxels count as one), or ``None`` when the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    # a thin wall can break into pieces on a coarse grid: merge nearby pieces before choosing
    merged = keep_largest_component(ndimage.binary_dilation(mask, iterations=2))
    return grid.to_input(np.argwhere(mask & merged).mean(axis=0))


class Predictor:
    """A segmentation model loaded once, ready to segment volumes on their own grid.

    Parameters
    ----------
    checkpoint
        The model and the preprocessing it expects.
    postprocess
        Post-processing settings; ``None`` = the defaults recorded in the checkpoint.
    device, precision
        ``auto`` picks CUDA when available and the faster of bf16/fp32 at warm-up.
    threshold
        Probability threshold; ``None`` = the checkpoint's.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        postprocess: PostprocessSettings | None = None,
        device: str = "auto",
        precision: Precision = "auto",
        threshold: float | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.preprocess = checkpoint.preprocess
        self.postprocess = postprocess or PostprocessSettings(**checkpoint.postprocess)
        self.threshold = checkpoint.threshold if threshold is None else threshold
        self.engine = InferenceEngine(checkpoint.build_model(), resolve_device(device), precision)
        self._postprocessor = Postprocessor(self.postprocess)
        self._warm = False

    @classmethod
    def from_file(
        cls,
        weights: str | Path,
        postprocess: PostprocessSettings | None = None,
        device: str = "auto",
        precision: Precision = "auto",
        threshold: float | None = None,
        seed_target_shape: tuple[int, int, int] = (64, 64, 56),
    ) -> Predictor:
        """Load a checkpoint (or a plain seed ``state_dict``) from a file."""
        checkpoint = load_checkpoint(weights, seed_target_shape=seed_target_shape)
        return cls(checkpoint, postprocess=postprocess, device=device, precision=precision, threshold=threshold)

    def warm_up(self) -> Predictor:
        """Pay first-call costs now and choose the execution path; returns ``self``."""
        if not self._warm:
            self.engine.warm_up(self.preprocess.target_shape)
            self._warm = True
        return self

    @property
    def description(self) -> str:
        """Short human-readable identity of the model (architecture, width, version)."""
        version = self.checkpoint.provenance.get("code_version", "seed")
        return f"UNet3D f={self.checkpoint.spec.init_features} ({version})"

    def predict_array(self, volume: np.ndarray, affine: np.ndarray) -> Prediction:
        """Segment one volume.

        Parameters
        ----------
        volume
            ``(I, J, K)`` real array in the file's voxel order.
        affine
            Its 4x4 RAS+ affine (used for reorientation only; the output is on the same grid).
        """
        if volume.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
        if min(volume.shape) < 1 or not np.all(np.isfinite(affine)):
            raise ValueError(f"unusable volume: shape {volume.shape}, affine finite={np.all(np.isfinite(affine))}")
        self.warm_up()
        settings = self.preprocess
        t0 = time.perf_counter()
        orientation = settings.orientation_for(affine)
        canonical = orientation.apply(np.asarray(volume, dtype=np.float32))
        grid = GridMap.full_fov(canonical.shape, settings.target_shape)
        model_input = prepare_input(canonical, grid, settings)
        t1 = time.perf_counter()
        probability = self.engine.probabilities(model_input[None])[0]
        if settings.crop_spacing_mm is not None:
            centre = locate_heart(probability >= self.threshold, grid)
            if centre is None:
                log.warning("no myocardium found on the whole field of view; segmenting without the heart box")
            else:
                grid = GridMap.box(
                    centre,
                    orientation.apply_spacing(voxel_spacing(affine)),
                    settings.target_shape,
                    settings.crop_spacing_mm,
                )
                probability = self.engine.probabilities(prepare_input(canonical, grid, settings)[None])[0]
        t2 = time.perf_counter()
        shape = tuple(int(s) for s in volume.shape)
        mask, raw_mask = self.masks(probability, grid, orientation, shape)  # type: ignore[arg-type]
        t3 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "infer": t2 - t1, "postprocess": t3 - t2}
        return Prediction(mask, raw_mask, probability, grid, orientation, timings)

    def masks(
        self,
        probability: np.ndarray,
        grid: GridMap,
        orientation: Orientation,
        shape: tuple[int, int, int],
        threshold: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Post-processed and raw uint8 masks on the input grid from a model-grid probability map.

        ``threshold`` defaults to the predictor's; calibration calls this with other values
        without running the network again.
        """
        level = self.threshold if threshold is None else threshold
        raw = probability >= level
        final, final_level = probability, level
        if self.postprocess.enable:
            soft = self._postprocessor(raw)
            if self.postprocess.smoothing_sigma > 0:  # the seed's way: threshold the smoothed mask
                final, final_level = soft, self.postprocess.threshold
            else:
                final = gated_soft_map(probability, soft >= self.postprocess.threshold, level)
        mask = from_model_grid(final, shape, orientation, final_level, grid)
        raw_mask = from_model_grid(probability, shape, orientation, level, grid)
        return mask, raw_mask

    def predict(self, image: nib.Nifti1Image) -> nib.Nifti1Image:
        """Segment a NIfTI image; the mask comes back on the input's own grid and affine.

        Returns
        -------
        nibabel.Nifti1Image
            uint8 0/1 mask, same shape and affine as ``image``.
        """
        volume = np.asanyarray(image.dataobj, dtype=np.float32)
        if volume.ndim == 4 and volume.shape[3] == 1:
            volume = volume[..., 0]
        result = self.predict_array(volume, image.affine)
        out = nib.Nifti1Image(result.mask, image.affine)
        out.set_qform(image.affine, code=1)
        out.set_sform(image.affine, code=1)
        return out
