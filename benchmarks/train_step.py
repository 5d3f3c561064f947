"""Training step time: eager float32 against the adopted path (bf16 autocast + channels-last-3d).

One step = forward, Dice+BCE loss, backward, Adam update, batch 2 at 64x64x56.

    python benchmarks/train_step.py [--repeats 8] [--features 16 32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from seg.inference import autocast_context
from seg.model import UNet3D, UNetSpec
from training.losses import SegmentationLoss


def time_step(features: int, precision: str, channels_last: bool, repeats: int) -> float:
    """Median seconds of one optimisation step."""
    torch.manual_seed(0)
    model = UNet3D(UNetSpec(init_features=features))
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = SegmentationLoss("dice_bce")
    images = torch.rand(2, 1, 64, 64, 56).contiguous(memory_format=fmt)
    labels = (torch.rand(2, 1, 64, 64, 56) > 0.995).float()
    device = torch.device("cpu")
    times = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            logits = model(images)
        criterion(logits, labels).backward()
        optimizer.step()
        if step:  # the first step pays one-off costs
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--features", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"{'init_features':>13} {'path':<34}{'median s/step':>14}{'speed-up':>10}")
    for features in args.features:
        base = time_step(features, "fp32", False, args.repeats)
        print(f"{features:>13} {'eager fp32':<34}{base:>14.3f}{1.0:>9.2f}x")
        for name, precision, channels_last in (
            ("channels_last_3d fp32", "fp32", True),
            ("bf16 autocast + channels_last_3d", "bf16", True),
        ):
            t = time_step(features, precision, channels_last, args.repeats)
            print(f"{features:>13} {name:<34}{t:>14.3f}{base / t:>9.2f}x")


if __name__ == "__main__":
    main()
