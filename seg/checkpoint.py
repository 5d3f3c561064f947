"""Self-describing model checkpoints (and the seed's plain state_dicts).

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)``
and holds only tensors, numbers, strings, lists and dicts:

- ``format``/``format_version``: identify the file;
- ``model``: architecture name and :class:`~seg.model.UNetSpec`;
- ``state_dict``: the weights;
- ``preprocess``: the :class:`~seg.preprocess.PreprocessSettings` the model was trained with;
- ``postprocess``: the post-processing defaults chosen for it;
- ``threshold``, ``labels``: how to read the output;
- ``metrics``: training/validation figures;
- ``provenance``: configuration, code and package versions, seeds, command, dates.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from seg.model import UNet3D, UNetSpec
from seg.postprocess import PostprocessSettings
from seg.preprocess import PreprocessSettings

log = logging.getLogger(__name__)

FORMAT = "spect-node-checkpoint"
FORMAT_VERSION = 1
MYOCARDIUM_LABEL = "Left ventricle myocardium"
_SEED_KEY_PREFIXES = (
    "encoder1.",
    "encoder2.",
    "bottleneck.",
    "up2.",
    "decoder2.",
    "up1.",
    "decoder1.",
    "conv_last.",
)


class CheckpointError(ValueError):
    """The file is not a usable checkpoint; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A trained model as a self-describing artefact.

    Attributes
    ----------
    spec, state_dict
        Architecture and weights.
    preprocess
        Preprocessing the network expects.
    postprocess
        Post-processing defaults (a plain dict of :class:`seg.postprocess.PostprocessSettings` fields).
    threshold
        Probability threshold of the raw output.
    metrics, provenance
        Free-form, JSON-like records.
    is_seed_state_dict
        True when loaded from a plain seed ``state_dict`` (no metadata in the file).
    """

    spec: UNetSpec
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessSettings
    postprocess: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    labels: dict[str, str] = field(default_factory=lambda: {"1": MYOCARDIUM_LABEL})
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    is_seed_state_dict: bool = False

    def build_model(self) -> UNet3D:
        """A model with the weights loaded, in eval mode, on the CPU."""
        model = UNet3D(self.spec)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        """The serialisable form written by :func:`save_checkpoint`."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": "UNet3D", "spec": self.spec.to_dict()},
            "state_dict": self.state_dict,
            "preprocess": self.preprocess.to_dict(),
            "postprocess": dict(self.postprocess),
            "threshold": float(self.threshold),
            "labels": dict(self.labels),
            "metrics": dict(self.metrics),
            "provenance": dict(self.provenance),
        }


def save_checkpoint(checkpoint: Checkpoint, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    ``extra`` adds top-level entries (e.g. the resumable training state).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = checkpoint.to_dict()
    payload["state_dict"] = {k: v.detach().cpu() for k, v in checkpoint.state_dict.items()}
    if extra:
        payload.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _spec_from_state_dict(state_dict: dict[str, torch.Tensor], source: Path) -> UNetSpec:
    try:
        first = state_dict["encoder1.0.weight"]
        last = state_dict["conv_last.weight"]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a UNet3D state_dict (missing {exc.args[0]})") from None
    depth = sum(1 for key in state_dict if key.startswith("encoder") and key.endswith(".0.weight"))
    return UNetSpec(
        in_channels=int(first.shape[1]),
        out_channels=int(last.shape[0]),
        init_features=int(first.shape[0]),
        depth=depth,
    )


def _one_line(text: str, limit: int | None = 300) -> str:
    """Torch's multi-line message on one line, colour codes removed, trimmed in the middle past ``limit``."""
    line = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
    return line if limit is None or len(line) <= limit else f"{line[: limit - 100]} ... {line[-90:]}"


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed, in one line: not a torch file, an unsafe object, or torch's own reason."""
    try:
        with path.open("rb") as head:
            magic = head.read(4)
    except OSError:
        magic = b""
    if not magic.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive (torch >= 1.6) or a pickle
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    text = _one_line(str(exc), limit=None)
    unsafe = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text)
    if unsafe:  # torch's advice to load unsafely is not passed on
        return f"holds objects other than tensors and plain values ({unsafe.group(1)})"
    return "cannot read checkpoint: " + (_one_line(text) or type(exc).__name__)


def load_raw(path: str | Path) -> dict[str, Any]:
    """``torch.load`` the file safely (``weights_only=True``) and check it is a mapping."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for corrupt or unsafe files
        raise CheckpointError(f"{path}: {_unreadable(path, exc)}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(raw).__name__}")
    return raw


def load_checkpoint(path: str | Path, seed_target_shape: tuple[int, int, int] = (64, 64, 56)) -> Checkpoint:
    """Load a project checkpoint or a plain seed ``state_dict``.

    Parameters
    ----------
    path
        The file.
    seed_target_shape
        Model grid assumed for a plain seed ``state_dict`` (it records none).

    Raises
    ------
    CheckpointError
        Missing, unreadable, unsafe or incompatible file.
    """
    path = Path(path)
    raw = load_raw(path)
    if raw.get("format") == FORMAT:
        if int(raw.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {raw['format_version']} is newer than this code")
        try:  # settings this code does not know (a newer or edited file) are named, not a TypeError
            spec = UNetSpec(**raw["model"]["spec"])
            ckpt = Checkpoint(
                spec=spec,
                state_dict=raw["state_dict"],
                preprocess=PreprocessSettings.from_dict(raw["preprocess"]),
                postprocess=dict(raw.get("postprocess", {})),
                threshold=float(raw.get("threshold", 0.5)),
                labels=dict(raw.get("labels", {"1": MYOCARDIUM_LABEL})),
                metrics=dict(raw.get("metrics", {})),
                provenance=dict(raw.get("provenance", {})),
            )
            PostprocessSettings(**ckpt.postprocess)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: unusable checkpoint settings: {type(exc).__name__}: {exc}") from exc
        if not 0.0 < ckpt.threshold < 1.0:
            raise CheckpointError(f"{path}: threshold {ckpt.threshold} is not a probability in (0, 1)")
    elif (
        raw
        and all(isinstance(v, torch.Tensor) for v in raw.values())
        and any(k.startswith(_SEED_KEY_PREFIXES) for k in raw)
    ):
        spec = _spec_from_state_dict(raw, path)
        log.info(
            "%s: plain seed state_dict (init_features=%d): file voxel order, min-max",
            path,
            spec.init_features,
        )
        ckpt = Checkpoint(
            spec=spec,
            state_dict=raw,
            preprocess=PreprocessSettings.seed(seed_target_shape),
            provenance={"source": "seed state_dict"},
            is_seed_state_dict=True,
        )
    else:
        raise CheckpointError(f"{path}: neither a spect-node checkpoint nor a UNet3D state_dict")
    try:
        ckpt.build_model()
    except RuntimeError as exc:
        architecture = f"UNet3D {ckpt.spec.describe()}"  # torch's message lists every key: one readable line
        raise CheckpointError(
            f"{path}: weights do not fit the recorded architecture ({architecture}): {_one_line(str(exc))}"
        ) from exc
    return ckpt


def code_version() -> str:
    """The installed package version, plus the git commit when run from a checkout."""
    try:
        version = metadata.version("spect-node")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def provenance_record(
    config: dict[str, Any], seeds: dict[str, int], command: list[str] | None = None
) -> dict[str, Any]:
    """Everything needed to say where a checkpoint came from."""
    packages = {}
    for name in ("torch", "numpy", "scipy", "nibabel", "scikit-image", "pydicom", "highdicom"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "config": config,
        "code_version": code_version(),
        "packages": packages,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seeds": seeds,
        "command": list(command or []),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
