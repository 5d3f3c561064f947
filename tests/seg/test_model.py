"""The seed's U-Net: key layout, odd shapes, seed checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seg.checkpoint import CheckpointError, load_checkpoint
from seg.model import UNet3D, UNetSpec, count_parameters

SEED_PREFIXES = {"encoder1", "encoder2", "bottleneck", "up2", "decoder2", "up1", "decoder1", "conv_last"}


def test_seed_layout_and_size() -> None:
    model = UNet3D()
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == SEED_PREFIXES
    assert "encoder1.0.weight" in keys and "encoder1.1.running_mean" in keys
    assert model.encoder1[0].bias is None  # bias-free convolutions
    assert round(count_parameters(model) / 1e6, 3) == 1.356  # the seed's f=32 network (notes/ml.md)


@pytest.mark.parametrize("shape", [(64, 64, 56), (33, 47, 29), (20, 21, 22)])
def test_any_shape_round_trips(shape: tuple[int, int, int]) -> None:
    model = UNet3D(UNetSpec(init_features=4)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, *shape))
    assert out.shape == (1, 1, *shape)


def test_plain_seed_state_dict_loads_unchanged(tmp_path: Path) -> None:
    seed_model = UNet3D(UNetSpec(init_features=8))
    path = tmp_path / "unet3d_weights.pth"
    torch.save(seed_model.state_dict(), path)  # what the seed's train.py wrote
    ckpt = load_checkpoint(path)
    assert ckpt.is_seed_state_dict
    assert ckpt.spec.init_features == 8
    assert not ckpt.preprocess.reorient and ckpt.preprocess.normalization == "minmax"
    loaded = ckpt.build_model()
    x = torch.rand(1, 1, 16, 16, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), seed_model.eval()(x))


def test_output_bias_prior() -> None:
    model = UNet3D(UNetSpec(init_features=4))
    model.init_output_bias(0.0025)
    assert model.conv_last.bias.item() == pytest.approx(-5.99, abs=0.01)


def test_unusable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(corrupt)
    code = tmp_path / "code.pth"
    torch.save({"x": Path("pickled-object")}, code)  # arbitrary objects are refused by weights_only
    with pytest.raises(CheckpointError):
        load_checkpoint(code)
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder1.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError):
        load_checkpoint(wrong)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["model"]["spec"].update(depth=3), "unusable checkpoint settings: TypeError"),
        (lambda raw: raw["preprocess"].update(window=1), "unusable checkpoint settings: TypeError"),
        (lambda raw: raw["preprocess"].update(normalization="zscore"), "unknown normalization 'zscore'"),
        (lambda raw: raw["preprocess"].update(percentile_high=0.0), "percentiles 0.0..0.0 must rise"),
        (lambda raw: raw["postprocess"].update(bogus=1), "unusable checkpoint settings: TypeError"),
        (lambda raw: raw.update(threshold=5.0), "threshold 5.0 is not a probability"),
        (lambda raw: raw.update(format_version=raw["format_version"] + 1), "is newer than this code"),
        (lambda raw: raw["model"]["spec"].update(init_features=8), "weights do not fit the recorded architecture"),
    ],
)
def test_checkpoint_settings_this_code_cannot_use_are_named(tmp_path: Path, edit, message: str) -> None:
    shipped = Path(__file__).resolve().parents[2] / "models" / "unet3d_weights.pth"
    raw = torch.load(shipped, weights_only=True)
    edit(raw)
    edited = tmp_path / "edited.pth"
    torch.save(raw, edited)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(edited)
