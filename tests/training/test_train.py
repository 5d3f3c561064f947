"""Training, resume, DDP on two CPU processes, evaluate and predict, through the CLI on tiny phantoms."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from seg.checkpoint import load_checkpoint
from training.cli import main as spect_train
from training.phantom import write_dataset

TINY = [
    "--set", "preprocess.target_shape=[32, 32, 28]",
    "--set", "model.init_features=4",
    "--set", "train.augment=false",
    "--set", "train.val_size=0.25",
    "--set", "train.test_size=0.25",
    "--set", "train.lr=0.01",
    "--set", "preprocess.crop_spacing_mm=6.0",
    "-q",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, 8, seed=5, progress=False)
    return root


def _train(dataset: Path, out: Path, *extra: str) -> int:
    return spect_train(["train", "--data_root", str(dataset), "--out", str(out), *TINY, *extra])


def _history(out: Path) -> list[dict]:
    run = out.parent / f"{out.stem}_run"
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_epochs_lower_the_loss_and_write_a_loadable_checkpoint(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pth"
    assert _train(dataset, out, "--epochs", "2") == 0
    history = _history(out)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    run = tmp_path / "model_run"
    assert {"split.json", "log.jsonl", "log.csv", "curves.png", "last.pth"} <= {p.name for p in run.iterdir()}
    Image.open(run / "curves.png").verify()
    checkpoint = load_checkpoint(out)
    assert checkpoint.spec.init_features == 4 and checkpoint.preprocess.target_shape == (32, 32, 28)
    assert checkpoint.provenance["config"]["train"]["epochs"] == 2
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 8


@pytest.mark.slow
def test_resume_continues_where_the_run_stopped(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full.pth"
    assert _train(dataset, full, "--epochs", "3") == 0
    part = tmp_path / "part.pth"
    # stops after epoch 1, which is no checkpoint epoch: last.pth is written for the stop all the same
    assert _train(dataset, part, "--epochs", "3", "--max_minutes", "0.0001", "--set", "train.checkpoint_every=2") == 0
    assert [h["epoch"] for h in _history(part)] == [1]
    assert _history(part)[0]["lr"] == pytest.approx(0.01)  # the rate epoch 1 trained at, not the next one's
    capsys.readouterr()
    # other model settings than the run's: named, and the run's files stay resumable
    assert _train(dataset, part, "--epochs", "3", "--resume", "--set", "model.init_features=8") == 2
    err = capsys.readouterr().err
    assert "last.pth: cannot resume from it" in err and "Traceback" not in err
    assert _train(dataset, part, "--epochs", "3", "--resume") == 0
    resumed = _history(part)
    assert [h["epoch"] for h in resumed] == [1, 2, 3]
    with (tmp_path / "part_run" / "log.csv").open() as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2", "3"]  # no row twice
    # the interrupted-and-resumed run retraces the uninterrupted one
    assert [h["train_loss"] for h in resumed] == pytest.approx([h["train_loss"] for h in _history(full)], rel=1e-3)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "training.cli", "train", "--data_root", str(dataset), "--out", str(out), "--epochs", "2", *TINY,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) final weights sha256 (\w+)", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert [h["epoch"] for h in _history(out)] == [1, 2]  # one writer: no duplicated log lines
    with (tmp_path / "ddp_run" / "log.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert load_checkpoint(out).metrics["world_size"] == 2


@pytest.mark.slow
def test_evaluate_and_predict_outputs(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "m.pth"
    assert _train(dataset, weights, "--epochs", "1") == 0
    capsys.readouterr()
    assert spect_train(["evaluate", "--data_root", str(dataset), "--weights", str(weights),
                        "--out", str(tmp_path / "eval"), "--split", "test", "-q"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "dice_pp" in table and "hd95_mm_raw" in table
    with (tmp_path / "eval" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2  # the test split of 8 cases
    assert {"dice_raw", "iou_pp", "hd95_mm_pp", "msd_mm_raw", "geometry", "hot_extracardiac_adjacent"} <= set(rows[0])

    assert spect_train(["predict", "--data_root", str(dataset), "--weights", str(weights),
                        "--out", str(tmp_path / "outputs"), "--orientation_search", "false", "-q"]) == 0  # fmt: skip
    masks = sorted((tmp_path / "outputs" / "masks_test").glob("*_pred_pp.nii.gz"))
    figures = sorted((tmp_path / "outputs" / "viz_test").glob("*.png"))
    assert len(masks) == 8 and len(figures) == 8
    for mask_path in masks:
        base = mask_path.name.removesuffix("_pred_pp.nii.gz")
        source = nib.load(dataset / "NIfTI" / f"{base}.nii.gz")
        mask = nib.load(mask_path)
        assert mask.shape == source.shape
        assert np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    for figure in figures:
        with Image.open(figure) as image:
            image.verify()

    capsys.readouterr()
    calibrated, original = tmp_path / "calibrated.pth", weights.read_bytes()
    assert spect_train(["calibrate", "--data_root", str(dataset), "--weights", str(weights), "--split", "val",
                        "--out", str(calibrated), "-q"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    chosen = float(re.search(r"threshold (\d\.\d+): mean Dice [\d.]+  <- chosen", out).group(1))  # type: ignore[union-attr]
    assert load_checkpoint(calibrated).threshold == pytest.approx(chosen)
    assert load_checkpoint(calibrated).metrics["threshold_calibration"]
    assert weights.read_bytes() == original  # --out: the checkpoint calibrated is left alone


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert spect_train(["train", "--data_root", str(tmp_path / "none"), "--out", str(tmp_path / "w.pth"), "-q"]) == 2
    assert "none" in capsys.readouterr().err
    served = tmp_path / "served.pth"  # the default output (model.weights) exists: only --out replaces it
    served.write_bytes(b"the model the node serves")
    assert spect_train(["train", "--data_root", str(tmp_path), "--set", f"model.weights={served}", "-q"]) == 2
    assert f"{served} exists" in capsys.readouterr().err and served.read_bytes() == b"the model the node serves"
    assert spect_train(["evaluate", "--data_root", str(tmp_path), "--weights", str(tmp_path / "w.pth"), "-q"]) == 2
    assert spect_train(["train", "--data_root", str(tmp_path), "--bogus", "1"]) == 2
    assert "--bogus" in capsys.readouterr().err
    assert spect_train(["train", "--data_root", str(tmp_path), "--set", "train.epochs=0"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_a_bad_case_stops_a_new_run_before_it_touches_the_previous_one(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    for mask in (root / "NIfTI").glob("*_mask.nii.gz"):  # every volume, whichever subset it falls in
        volume = mask.with_name(mask.name.replace("_mask", ""))
        image = nib.load(volume)
        holed = np.asarray(image.dataobj, dtype=np.float32)
        holed[0, 0, 0] = np.inf
        nib.save(nib.Nifti1Image(holed, image.affine), str(volume))
    out = tmp_path / "m.pth"
    run = tmp_path / "m_run"
    run.mkdir()
    previous = {name: f"previous {name}" for name in ("split.json", "log.csv", "log.jsonl", "last.pth")}
    for name, text in previous.items():
        (run / name).write_text(text)
    assert _train(root, out) == 2
    assert re.search(r"phantom_\S+\.nii\.gz: 1 voxel\(s\) are NaN or infinite", capsys.readouterr().err)
    assert {name: (run / name).read_text() for name in previous} == previous  # nothing of the earlier run lost

    (run / "split.json").unlink()
    assert _train(root, out, "--resume") == 2
    assert "split.json: nothing to resume" in capsys.readouterr().err
    assert (run / "last.pth").read_text() == previous["last.pth"]
    (run / "split.json").write_text('{"train": ["ghost"], "val": [], "test": [], "seed": 42}')
    assert _train(root, out, "--resume") == 2
    assert "split.json: 1 training/validation case(s) of the run have no volume and mask" in capsys.readouterr().err
