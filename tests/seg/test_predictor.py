"""The Predictor: self-describing checkpoints in, masks on the input's own grid out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg.checkpoint import Checkpoint, load_checkpoint, provenance_record, save_checkpoint
from seg.inference import resolve_device
from seg.model import UNet3D, UNetSpec
from seg.postprocess import PostprocessSettings
from seg.predictor import Predictor, gated_soft_map
from seg.preprocess import PreprocessSettings


def _checkpoint(init_features: int = 4, crop_spacing_mm: float | None = None) -> Checkpoint:
    torch.manual_seed(0)
    model = UNet3D(UNetSpec(init_features=init_features))
    return Checkpoint(
        spec=model.spec,
        state_dict=model.state_dict(),
        preprocess=PreprocessSettings(target_shape=(32, 32, 28), crop_spacing_mm=crop_spacing_mm),
        postprocess={"enable": True, "min_comp_voxels": 10},
        metrics={"best_val_dice": 0.5},
        provenance=provenance_record({"train": {"epochs": 1}}, {"project.seed": 0}, ["spect-train", "train"]),
    )


def test_checkpoint_is_self_describing(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.pth")
    raw = torch.load(path, weights_only=True)  # data only: loads under the safe unpickler
    assert raw["format"] == "spect-node-checkpoint"
    assert raw["preprocess"]["target_shape"] == [32, 32, 28]
    assert raw["labels"] == {"1": "Left ventricle myocardium"}
    assert {"config", "code_version", "packages", "seeds", "command", "created"} <= set(raw["provenance"])
    assert "torch" in raw["provenance"]["packages"]
    loaded = load_checkpoint(path)
    assert loaded.spec == UNetSpec(init_features=4) and not loaded.is_seed_state_dict
    assert loaded.preprocess.target_shape == (32, 32, 28)
    assert loaded.postprocess["min_comp_voxels"] == 10


def _shell(shape, centre, radius, wall) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return ((r <= radius) & (r > radius - wall)).astype(np.uint8)


class _PerfectEngine:
    """Stands in for the network: 'probability' = the normalised input (the input is the truth)."""

    precision = "fp32"

    def warm_up(self, shape) -> None:
        return None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return batch.astype(np.float32)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-3.6, -3.6, 3.6, 1.0]),
        np.diag([-3.6, -3.6, -3.6, 1.0]),
        np.array([[0, 0, 3.6, 0], [-3.6, 0, 0, 0], [0, -3.6, 0, 0], [0, 0, 0, 1.0]]),
    ],
)
@pytest.mark.parametrize(("crop_spacing_mm", "min_dice"), [(None, 0.6), (4.0, 0.95)])
def test_predict_returns_mask_on_input_grid(affine: np.ndarray, crop_spacing_mm: float | None, min_dice: float) -> None:
    """With a perfect network, the mask lands on the input's voxels; the heart box sharpens it."""
    shape = (128, 128, 90)
    truth = _shell(shape, (62, 58, 47), 14, 4)  # a 4-voxel wall: 1 voxel on a 32-voxel whole-FOV grid
    predictor = Predictor(_checkpoint(crop_spacing_mm=crop_spacing_mm), device="cpu", precision="fp32")
    predictor.engine = _PerfectEngine()  # type: ignore[assignment]
    image = nib.Nifti1Image(truth.astype(np.float32), affine)
    out = predictor.predict(image)
    assert out.shape == shape and np.allclose(out.affine, affine)
    mask = np.asarray(out.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > min_dice


def test_real_network_runs_on_odd_input(tmp_path: Path) -> None:
    path = save_checkpoint(_checkpoint(), tmp_path / "m.pth")
    predictor = Predictor.from_file(path, device="cpu", precision="fp32")
    volume = np.random.default_rng(0).random((45, 50, 37)).astype(np.float32)
    result = predictor.predict_array(volume, np.diag([5.0, 5.0, 5.0, 1.0]))
    assert result.mask.shape == volume.shape and result.raw_mask.shape == volume.shape
    assert result.probability.shape == (32, 32, 28)
    assert set(result.timings) == {"preprocess", "infer", "postprocess"}
    with pytest.raises(ValueError, match="3D"):
        predictor.predict_array(volume[0], np.eye(4))
    with pytest.raises(ValueError, match="singular"):  # an sform with a zero slice vector
        predictor.predict_array(volume, np.diag([5.0, 5.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\d+ voxel\(s\) are NaN or infinite \(as float32\)"):
        predictor.predict_array(volume.astype(np.float64) * 1e39, np.diag([5.0, 5.0, 5.0, 1.0]))  # inf as float32


def test_gated_soft_map_thresholds_to_the_postprocessed_mask() -> None:
    rng = np.random.default_rng(3)
    probability = rng.random((10, 10, 10)).astype(np.float32)
    post = (probability > 0.5) & (rng.random((10, 10, 10)) > 0.3)  # some removed
    post[0, 0, 0] = True  # one added
    soft = gated_soft_map(probability, post, 0.5)
    assert np.array_equal(soft >= 0.5, post)
    kept = post & (probability >= 0.5)
    assert np.array_equal(soft[kept], probability[kept])


def test_postprocess_defaults_come_from_checkpoint() -> None:
    predictor = Predictor(_checkpoint(), device="cpu", precision="fp32")
    assert predictor.postprocess.min_comp_voxels == 10
    override = Predictor(_checkpoint(), PostprocessSettings(enable=False), device="cpu", precision="fp32")
    assert not override.postprocess.enable


def test_cuda_asked_for_without_a_gpu_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError, which every command reports on one line with exit 2 (a RuntimeError was a traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's state, made certain
    with pytest.raises(ValueError, match="model.device is 'cuda' but no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
