"""Training the U-Net: single process, or DistributedDataParallel under ``torchrun``."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from config import AppConfig
from seg.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_raw, provenance_record, save_checkpoint
from seg.inference import autocast_context, resolve_device
from seg.metrics import dice
from seg.model import UNet3D, UNetSpec
from seg.postprocess import PostprocessSettings
from seg.predictor import Predictor
from seg.preprocess import PreprocessSettings
from training.augment import AugmentSettings
from training.calibrate import calibrate_threshold
from training.data import DataSelection, preprocess_settings, select_cases
from training.dataset import PreparedCase, SegmentationDataset, prepare_cases
from training.discovery import Case
from training.figures import plot_curves
from training.losses import SegmentationLoss
from training.split import Split, make_split

log = logging.getLogger(__name__)


@dataclass
class RunPaths:
    """Where a training run writes: the checkpoint and the run folder beside it."""

    checkpoint: Path
    run_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = self.checkpoint.parent / f"{self.checkpoint.stem}_run"

    @property
    def split(self) -> Path:
        return self.run_dir / "split.json"

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pth"

    @property
    def log_jsonl(self) -> Path:
        return self.run_dir / "log.jsonl"

    @property
    def log_csv(self) -> Path:
        return self.run_dir / "log.csv"

    @property
    def curves(self) -> Path:
        return self.run_dir / "curves.png"


@dataclass
class TrainResult:
    """What a run produced."""

    paths: RunPaths
    best_val_dice: float | None
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]]
    weights_digest: str


@dataclass(frozen=True)
class Distributed:
    """Process-group facts (a single process is rank 0 of 1).

    ``joined`` is true under ``torchrun``, even with one process: the collective
    calls (nccl or gloo) then run as they would with several.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> Distributed:
        """Join the process group when launched by ``torchrun`` (nccl on GPUs, gloo on CPU)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 and "LOCAL_RANK" not in os.environ:
            return cls()
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        return cls(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, joined=True)


def training_precision(device: torch.device, requested: str) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for training (``auto``: bf16 where native, fp16 on older GPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def state_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights (to check that DDP ranks agree)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _foreground_prior(cases: Sequence[PreparedCase]) -> float:
    return float(np.mean([c.label.mean() for c in cases]))


def _out_of_time(max_minutes: float | None, started: float, distributed: Distributed, device: torch.device) -> bool:
    """Rank 0 decides, every rank follows (so no rank waits forever on the others).

    Collective tensors live on the training device: nccl has no CPU backend.
    """
    if max_minutes is None:
        return False
    stop = torch.tensor([int((time.monotonic() - started) / 60 >= max_minutes)], device=device)
    if distributed.joined:
        dist.broadcast(stop, src=0)
    return bool(stop.item())


def validate(
    model: torch.nn.Module,
    cases: Sequence[PreparedCase],
    settings: PreprocessSettings,
    device: torch.device,
    precision: str,
) -> float:
    """Mean Dice of the thresholded output against the labels, on the model grid.

    Two-pass models are scored on the heart box centred on the true heart; soft labels
    count as foreground from 0.5.
    """
    model.eval()
    scores = []
    with torch.inference_mode(), autocast_context(device, precision):
        for case in cases:
            image, label = case.centred_box(settings) if case.box_image is not None else (case.image, case.label)
            x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            pred = (model(x)[0, 0].float() >= 0).cpu().numpy()
            scores.append(dice(pred, label >= 0.5))
    model.train()
    return float(np.mean(scores)) if scores else float("nan")


def _write_logs(paths: RunPaths, history: Sequence[dict[str, Any]]) -> None:
    """Both logs rewritten from the run's history: a resumed run repeats no epoch's row."""
    paths.log_jsonl.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    with paths.log_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _make_checkpoint(
    model: UNet3D, config: AppConfig, metrics: dict[str, Any], command: Sequence[str] | None
) -> Checkpoint:
    return Checkpoint(
        spec=model.spec,
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        preprocess=preprocess_settings(config),
        postprocess=config.postprocess.model_dump(),
        threshold=config.test.threshold or 0.5,
        metrics=metrics,
        provenance=provenance_record(
            json.loads(config.model_dump_json()), {"project.seed": config.project.seed}, list(command or [])
        ),
    )


def _calibrate(checkpoint_path: Path, cases: Sequence[Case], config: AppConfig, progress: bool) -> None:
    """Record the Dice-optimal threshold on the validation cases in the best checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    predictor = Predictor(
        checkpoint, PostprocessSettings(**config.postprocess.model_dump()), device="cpu", precision="fp32"
    )
    best, table = calibrate_threshold(predictor, cases, progress=progress)
    checkpoint.threshold = best
    checkpoint.metrics["threshold_calibration"] = {f"{t:.2f}": round(d, 5) for t, d in table.items()}
    save_checkpoint(checkpoint, checkpoint_path)
    log.info(
        "calibrated threshold %.2f (validation Dice %.4f at 0.50, %.4f at %.2f)",
        best,
        table.get(0.5, 0),
        table[best],
        best,
    )


def train(
    config: AppConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    command: Sequence[str] | None = None,
    selection: DataSelection | None = None,
) -> TrainResult:
    """Train a model on the masked cases under ``config.paths.data_root``.

    Parameters
    ----------
    config
        The whole configuration (``train``, ``model``, ``preprocess``, ``data``, ``paths``).
    out
        Checkpoint file of the best epoch; the run folder ``<stem>_run/`` sits beside it
        (split, ``log.jsonl``/``log.csv``, ``curves.png``, ``last.pth`` for ``--resume``).
    resume
        Continue from ``last.pth`` (model, optimizer, scheduler, RNG, epoch, history).
    """
    cfg = config.train
    seed = config.project.seed
    distributed = Distributed.from_environment(config.model.device)
    device = resolve_device(config.model.device)
    if device.type == "cuda" and distributed.joined:
        device = torch.device("cuda", distributed.local_rank)
    precision = training_precision(device, cfg.precision)
    paths = RunPaths(Path(out))
    show = progress and distributed.is_main

    selection = selection or select_cases(config)
    cases = selection.report.masked_cases
    if len(cases) < 2:
        raise ValueError(f"{selection.vols_dir}: found {len(cases)} case(s) with a mask; training needs at least 2")
    if resume:
        for needed in (paths.last, paths.split):
            if not needed.exists():
                raise FileNotFoundError(f"{needed}: nothing to resume")
        split = Split.load(paths.split)
    else:
        split = make_split(cases, cfg.val_size, cfg.test_size, seed)
    by_base = {c.base: c for c in cases}
    missing = [b for b in (*split.train, *split.val) if b not in by_base]
    if missing:
        raise ValueError(
            f"{paths.split}: {len(missing)} training/validation case(s) of the run have no volume and mask under "
            f"{selection.vols_dir} any more (e.g. {', '.join(missing[:3])})"
        )
    settings = preprocess_settings(config)
    margin = 0 if settings.crop_spacing_mm is None else int(round(cfg.box_jitter_mm / settings.crop_spacing_mm))
    workers, soft = cfg.num_workers, cfg.soft_labels
    train_cases = prepare_cases(
        [by_base[b] for b in split.train], settings, show, "loading train", margin, workers, soft
    )
    val_cases = prepare_cases([by_base[b] for b in split.val], settings, show, "loading val", 0, workers, soft)
    if not resume and distributed.is_main:  # the data loaded: only now replace a previous run's files
        split.save(paths.split)
        for stale in (paths.log_jsonl, paths.log_csv, paths.last):  # a new run starts its own logs
            stale.unlink(missing_ok=True)
    log.info(
        "cases: %d train, %d val, %d test (split %s)",
        len(train_cases),
        len(val_cases),
        len(split.test),
        paths.split,
    )

    torch.manual_seed(seed)
    spec = UNetSpec(config.model.in_channels, config.model.out_channels, config.model.init_features, config.model.depth)
    model = UNet3D(spec)
    if cfg.init_weights is not None:
        start = load_checkpoint(cfg.init_weights)
        if start.spec != spec:
            raise ValueError(f"{cfg.init_weights}: architecture {start.spec} differs from model settings {spec}")
        model.load_state_dict(start.state_dict)
        log.info("starting from the weights of %s", cfg.init_weights)
    elif cfg.output_bias_prior is not None:
        model.init_output_bias(cfg.output_bias_prior)
    model = model.to(device).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.lr * 0.02)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    history: list[dict[str, Any]] = []
    best, best_epoch, start_epoch = -1.0, 0, 0
    if resume:
        state = load_raw(paths.last)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("scaler"):  # fp16 loss scale (CUDA); empty when the scaler was off
                scaler.load_state_dict(state["scaler"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            history, best, best_epoch, start_epoch = (
                state["history"],
                state["best"],
                state["best_epoch"],
                state["epoch"],
            )
        except torch.OutOfMemoryError:
            raise  # the device's trouble, not the file's
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{paths.last}: cannot resume from it ({type(exc).__name__}: {str(exc)[:300]}); it must be the "
                "run's own last.pth, with the model settings the run started with"
            ) from exc
        log.info("resuming at epoch %d (best val Dice %.4f at epoch %d)", start_epoch + 1, best, best_epoch)

    net: torch.nn.Module = model
    if distributed.joined:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    augment_settings = AugmentSettings() if cfg.augment else None
    dataset = SegmentationDataset(train_cases, settings, augment_settings, seed, cfg.full_view_fraction)
    criterion = SegmentationLoss(cfg.loss)
    started = time.monotonic()
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        dataset.set_epoch(epoch)
        if distributed.joined:
            sampler: Any = DistributedSampler(dataset, shuffle=cfg.shuffle, seed=seed, drop_last=False)
            sampler.set_epoch(epoch)
        elif cfg.shuffle:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        else:
            sampler = SequentialSampler(dataset)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
        net.train()
        losses: list[float] = []
        epoch_start = time.monotonic()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=not show, leave=False)
        for images, labels in bar:
            images = images.to(device).contiguous(memory_format=torch.channels_last_3d)
            labels = labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, precision):
                logits = net(images)
            loss = criterion(logits, labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            elapsed = time.monotonic() - epoch_start
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", vol_s=f"{len(losses) * cfg.batch_size / elapsed:.1f}")
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        scheduler.step()
        train_loss = float(np.mean(losses))
        if distributed.joined:
            # BatchNorm running statistics are per rank: take rank 0's so every rank validates
            # and finishes with the same model.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
            total = torch.tensor([train_loss], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            train_loss = float(total.item()) / distributed.world_size
        val_dice = validate(model, val_cases, settings, device, precision) if val_cases else None
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "val_dice": None if val_dice is None else round(val_dice, 6),
            "lr": lr,
            "epoch_seconds": round(time.monotonic() - epoch_start, 2),
            "elapsed_minutes": round((time.monotonic() - started) / 60, 3),
        }
        history.append(row)
        improved = val_dice is None or val_dice > best
        if improved:
            best, best_epoch = (val_dice if val_dice is not None else best), epoch
        stop = _out_of_time(cfg.max_minutes, started, distributed, device)
        if distributed.is_main:
            _write_logs(paths, history)
            plot_curves(history, paths.curves)
            if improved:
                metrics = {
                    "best_val_dice": None if val_dice is None else round(best, 6),
                    "best_epoch": best_epoch,
                    "epochs_planned": cfg.epochs,
                    "n_train": len(train_cases),
                    "n_val": len(val_cases),
                    "precision": precision,
                    "device": str(device),
                    "world_size": distributed.world_size,
                }
                save_checkpoint(_make_checkpoint(model, config, metrics, command), paths.checkpoint)
            # last.pth follows every new best and every stop, so a resume never rolls the best back
            if improved or stop or epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "scaler": scaler.state_dict(),
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    "history": history,
                    "best": best,
                    "best_epoch": best_epoch,
                    "epoch": epoch,
                }
                tmp = paths.last.with_suffix(".tmp")
                torch.save(state, tmp)
                os.replace(tmp, paths.last)
        log.info(
            "epoch %d/%d loss %.4f val Dice %s (%.1f s)",
            epoch,
            cfg.epochs,
            train_loss,
            "n/a" if val_dice is None else f"{val_dice:.4f}",
            row["epoch_seconds"],
        )
        if stop:
            log.info("stopping after %.1f minutes (train.max_minutes)", (time.monotonic() - started) / 60)
            break
    if distributed.is_main and cfg.calibrate_threshold and split.val and paths.checkpoint.exists():
        _calibrate(paths.checkpoint, [by_base[b] for b in split.val], config, show)
    digest = state_digest(model.state_dict())
    log.info("rank %d final weights sha256 %s", distributed.rank, digest)
    if distributed.joined:
        dist.barrier()
    return TrainResult(paths, None if best < 0 else best, best_epoch, epoch, history, digest)
