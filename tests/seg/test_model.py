"""The seed's U-Net: key layout, odd shapes, depth, seed checkpoints."""

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


def test_seed_key_order() -> None:
    """The seed's registration order: state_dict keys list in the same order as its file."""
    order = list(dict.fromkeys(k.split(".")[0] for k in UNet3D(UNetSpec(init_features=4)).state_dict()))
    assert order == ["encoder1", "encoder2", "bottleneck", "up2", "decoder2", "up1", "decoder1", "conv_last"]


@pytest.mark.parametrize("depth, params", [(1, 73_937), (3, 1_401_265), (4, 5_646_385)])
def test_depth_adds_levels(depth: int, params: int) -> None:
    model = UNet3D(UNetSpec(init_features=16, depth=depth))
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    levels = [str(level) for level in range(1, depth + 1)]
    assert prefixes == {"bottleneck", "conv_last"} | {f"{p}{n}" for p in ("encoder", "up", "decoder") for n in levels}
    assert model.bottleneck[0].out_channels == 16 * 2**depth
    assert count_parameters(model) == params
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="depth"):
            UNetSpec(depth=bad)  # type: ignore[arg-type]
    # at the seed's depth the checkpoint omits it: code from before the setting reads the file
    assert "depth" not in UNetSpec(init_features=16).to_dict()


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(64, 64, 56), (33, 47, 29), (20, 21, 22)])
def test_any_shape_round_trips(shape: tuple[int, int, int], depth: int) -> None:
    model = UNet3D(UNetSpec(init_features=4, depth=depth)).eval()
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


@pytest.mark.parametrize("depth", [1, 3])
def test_deeper_checkpoints_load(tmp_path: Path, depth: int) -> None:
    """A deeper network round-trips as a project checkpoint and as a plain state_dict."""
    from seg.checkpoint import Checkpoint, save_checkpoint
    from seg.preprocess import PreprocessSettings

    model = UNet3D(UNetSpec(init_features=4, depth=depth)).eval()
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    assert load_checkpoint(plain).spec == UNetSpec(init_features=4, depth=depth)
    full = save_checkpoint(
        Checkpoint(spec=model.spec, state_dict=model.state_dict(), preprocess=PreprocessSettings()),
        tmp_path / "full.pth",
    )
    loaded = load_checkpoint(full)
    assert loaded.spec.depth == depth and loaded.spec.describe() == f"f=4 depth {depth}"
    assert torch.load(full, weights_only=True)["model"]["spec"]["depth"] == depth
    x = torch.rand(1, 1, 24, 20, 16)
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(x), model(x))


def test_output_bias_prior() -> None:
    model = UNet3D(UNetSpec(init_features=4))
    model.init_output_bias(0.0025)
    assert model.conv_last.bias.item() == pytest.approx(-5.99, abs=0.01)


def test_unusable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(corrupt)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((Path(__file__).resolve().parents[2] / "models" / "unet3d_weights.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint: "):
        load_checkpoint(cut)
    code = tmp_path / "code.pth"
    torch.save({"x": Path("pickled-object")}, code)  # arbitrary objects are refused by weights_only
    with pytest.raises(CheckpointError, match=r"holds objects other than tensors .*Unsupported global") as refused:
        load_checkpoint(code)
    assert "weights_only" not in str(refused.value) and "\x1b" not in str(refused.value)
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder1.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError):
        load_checkpoint(wrong)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["model"]["spec"].update(kernel=5), "unusable checkpoint settings: TypeError"),
        (lambda raw: raw["model"]["spec"].update(depth=3), "weights do not fit the recorded architecture .*depth 3"),
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
