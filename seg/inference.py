"""Running the network fast: device choice and the CPU/GPU execution path.

On CPUs with native bfloat16 (AVX-512 BF16/AMX), bf16 autocast with channels-last-3d
memory runs faster than float32 (1.7x for the shipped f=16 network on 2 cores,
``benchmarks/inference_speed.py``), with logits off by up to ~0.2 and slightly different
masks; on CPUs without it bf16 can be slower. ``precision="auto"`` therefore times both paths on the
warm-up input and keeps bf16 only when it takes under 0.85x the fp32 time (else fp32).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but no CUDA device is available (set model.device=cpu or auto)")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """The autocast context for a precision (``fp32`` = none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class InferenceEngine:
    """Wraps a model for batched inference on one device at one precision.

    Parameters
    ----------
    model
        A trained network in eval mode (moved to ``device`` here).
    device
        Where to run.
    precision
        ``fp32``, ``bf16``, or ``auto`` (decided by :meth:`warm_up`; fp32 until then).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: Precision = "auto") -> None:
        self.device = device
        self.requested_precision = precision
        self.precision: str = "fp32" if precision == "auto" else precision
        # channels-last-3d: oneDNN's fast 3D convolutions on CPU, tensor cores on GPU
        self.model = model.to(device).eval().to(memory_format=torch.channels_last_3d)
        self.channels_last = True

    @contextlib.contextmanager
    def _mode(self, precision: str) -> Iterator[None]:
        with torch.inference_mode(), autocast_context(self.device, precision):
            yield

    def logits(self, batch: np.ndarray, precision: str | None = None) -> np.ndarray:
        """Network logits.

        Parameters
        ----------
        batch
            float32 ``(N, I, J, K)`` normalised volumes on the model grid.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, I, J, K)`` logits of the myocardium channel.
        """
        precision = precision or self.precision
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None].to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self._mode(precision):
            out = self.model(x)
        return out[:, 0].float().contiguous().cpu().numpy()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Sigmoid of :meth:`logits`; float32 ``(N, I, J, K)`` in [0, 1]."""
        return 1.0 / (1.0 + np.exp(-self.logits(batch)))

    def time_path(self, batch: np.ndarray, precision: str, repeats: int = 3) -> float:
        """Median seconds per call of one path (after one untimed call)."""
        self.logits(batch, precision)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.logits(batch, precision)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def warm_up(self, shape: tuple[int, int, int]) -> None:
        """Run once (first-call costs) and, for ``auto``, keep the faster precision."""
        batch = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
        if self.requested_precision != "auto" or not _bf16_supported(self.device):
            self.logits(batch)
            return
        fp32 = self.time_path(batch, "fp32")
        bf16 = self.time_path(batch, "bf16")
        self.precision = "bf16" if bf16 < 0.85 * fp32 else "fp32"
        log.info("inference path: %s (fp32 %.3f s, bf16 %.3f s per volume)", self.precision, fp32, bf16)


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # every x86-64/arm64 CPU can run it; auto still times it against fp32
