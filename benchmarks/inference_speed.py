"""Inference time per volume: eager float32 against the faster CPU paths.

Prints, for each execution path, the median of N timed forward passes on the model
grid (after warm-up), the speed-up over eager float32, the largest logit difference,
and whether the final masks on phantom cases are identical to the float32 ones.

    python benchmarks/inference_speed.py [--weights models/unet3d_weights.pth] [--repeats 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from seg.checkpoint import Checkpoint, load_checkpoint
from seg.inference import InferenceEngine
from seg.model import UNet3D, UNetSpec
from seg.predictor import Predictor
from seg.preprocess import PreprocessSettings
from training.phantom import generate_case

PATHS = {
    "eager fp32": ("fp32", False),
    "channels_last_3d fp32": ("fp32", True),
    "bf16 autocast + channels_last_3d": ("bf16", True),
}


def _engine(checkpoint: Checkpoint, precision: str, channels_last: bool) -> InferenceEngine:
    engine = InferenceEngine(checkpoint.build_model(), torch.device("cpu"), precision)  # type: ignore[arg-type]
    if not channels_last:  # the benchmark pins the plain layout for the eager baseline
        engine.model = engine.model.to(memory_format=torch.contiguous_format)
        engine.channels_last = False
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("models/unet3d_weights.pth"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", type=int, default=6, help="phantom cases for the mask-identity check")
    args = parser.parse_args()

    if args.weights.is_file():
        checkpoint = load_checkpoint(args.weights)
        source = str(args.weights)
    else:
        torch.manual_seed(0)
        model = UNet3D(UNetSpec(init_features=16))
        checkpoint = Checkpoint(model.spec, model.state_dict(), PreprocessSettings())
        source = "random f=16 weights (no checkpoint found)"
    shape = checkpoint.preprocess.target_shape
    batch = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    print(f"model: {source}, init_features={checkpoint.spec.init_features}, grid {shape}")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")

    reference = None
    base_time = None
    cases = [generate_case(12345, i) for i in range(args.cases)]
    ref_masks = None
    print(f"{'path':<36}{'median s':>10}{'speed-up':>10}{'max |dlogit|':>14}{'masks identical':>18}")
    for name, (precision, channels_last) in PATHS.items():
        engine = _engine(checkpoint, precision, channels_last)
        engine.logits(batch)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            logits = engine.logits(batch)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        if reference is None:
            reference, base_time = logits, median
        diff = float(np.abs(logits - reference).max())
        predictor = Predictor(checkpoint, device="cpu", precision="fp32")
        predictor.engine = engine
        predictor._warm = True  # noqa: SLF001 - keep the pinned path
        masks = [predictor.predict_array(c.volume, c.affine).mask for c in cases]
        if ref_masks is None:
            ref_masks = masks
        differing = sum(int((a != b).sum()) for a, b in zip(masks, ref_masks, strict=True))
        identical = "yes" if differing == 0 else f"no ({differing} voxels)"
        print(f"{name:<36}{median:>10.4f}{base_time / median:>9.2f}x{diff:>14.2e}{identical:>18}")


if __name__ == "__main__":
    main()
