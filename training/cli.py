"""``spect-train``: phantoms, training, evaluation and prediction from the command line.

The CLI only maps flags onto the configuration (built once here) and calls the
library. The seed pipeline's flags are accepted as aliases, and so is any
configuration key given as ``--key value`` when the key name is unambiguous for
the command (``--threshold 0.4``, ``--mask_suffix _mask``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from config import AppConfig, ConfigError, load_config
from config.logging_setup import configure_logging
from seg.checkpoint import CheckpointError
from seg.postprocess import PostprocessSettings
from seg.predictor import Predictor
from training.evaluate import CaseFailure

log = logging.getLogger("spect-train")

# Sections searched, in order, for a bare --key flag of each command.
_SECTION_ORDER = {
    "train": ("train", "data", "preprocess", "model", "paths", "project", "postprocess"),
    "evaluate": ("test", "data", "postprocess", "viz", "model", "paths", "preprocess", "project"),
    "predict": ("test", "data", "postprocess", "viz", "model", "paths", "preprocess", "project"),
    "calibrate": ("test", "data", "postprocess", "model", "paths", "preprocess", "project"),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file (may be partial)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", "--data-root", type=Path, help="dataset root holding NIfTI/ (paths.data_root)")
    parser.add_argument("--recursive", action="store_true", default=None, help="search sub-folders (data.recursive)")
    parser.add_argument("--no-recursive", dest="recursive", action="store_false", help="do not search sub-folders")
    parser.add_argument(
        "--allow_mask_as_volume", action="store_true", default=None, help="debug only: a mask may stand for its volume"
    )


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (the flag is named by argparse)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="spect-train", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    phantom = sub.add_parser("phantom", help="write a synthetic MPI-SPECT phantom dataset")
    phantom.add_argument("--out", type=Path, required=True, help="dataset root to write (NIfTI/, demographics.csv)")
    phantom.add_argument("--cases", type=_at_least(1), default=20, help="number of cases")
    phantom.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same data)")
    phantom.add_argument("--start-index", type=_at_least(0), default=0, help="index of the first case")
    phantom.add_argument("--render", type=_at_least(0), default=3, help="PNG previews to write under <out>/preview/")
    phantom.add_argument("--family", choices=["anatomical", "basic"], default="anatomical", help="phantom generator")
    phantom.add_argument("--hard", action="store_true", help="a population heavy in hard cases (anatomical family)")
    phantom.add_argument("--workers", type=_at_least(1), default=1, help="processes sharing the work (same output)")
    _common(phantom)

    train = sub.add_parser("train", help="train the U-Net")
    _data_flags(train)
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch_size", "--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--loss", choices=["dice_bce", "bce"])
    train.add_argument("--out", "--output_weights", dest="out", type=Path, help="checkpoint file (model.weights)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run of --out")
    train.add_argument("--init_weights", "--init-weights", type=Path, help="start from this checkpoint (fine-tune)")
    train.add_argument("--max_minutes", "--max-minutes", type=float, help="stop after this wall time")
    train.add_argument("--no_mask_fallback", action="store_true", help="seed flag; cases without masks are never used")
    _common(train)

    for name, text in (
        ("evaluate", "metrics per case and a summary"),
        ("predict", "masks and figures per case"),
        ("calibrate", "pick the Dice-optimal threshold (use --split val) and record it in the checkpoint"),
    ):
        cmd = sub.add_parser(name, help=text)
        _data_flags(cmd)
        cmd.add_argument("--weights", type=Path, help="checkpoint or seed state_dict (model.weights)")
        cmd.add_argument(
            "--out",
            type=Path,
            help="evaluate: output folder (outputs/eval); predict: output folder (outputs); "
            "calibrate: checkpoint file to write (default: --weights itself)",
        )
        cmd.add_argument("--split", choices=["train", "val", "test"], help="only this subset of the run's split")
        cmd.add_argument("--split_file", "--split-file", type=Path, help="split.json (default: beside the weights)")
        cmd.add_argument("--only_masked", action="store_true", default=None, help="only cases with a mask")
        _common(cmd)
    return parser


def _coerce(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def key_aliases(command: str, extra: Sequence[str]) -> dict[str, Any]:
    """Map leftover ``--key value`` flags onto dotted config keys (seed compatibility)."""
    fields = AppConfig.model_fields
    values: dict[str, Any] = {}
    items = list(extra)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument {flag!r}")
        key, _, inline = flag[2:].replace("-", "_").partition("=")
        if "." in key:
            dotted = key
        else:
            section = next(
                (s for s in _SECTION_ORDER.get(command, ()) if key in fields[s].annotation.model_fields),  # type: ignore[union-attr]
                None,
            )
            if section is None:
                raise ConfigError(f"unknown option --{key} (not a flag of '{command}' nor a configuration key)")
            dotted = f"{section}.{key}"
        if inline:
            value = inline
        elif items and not items[0].startswith("--"):
            value = items.pop(0)
        else:
            value = "true"
        values[dotted] = _coerce(value)
    return values


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {
        "data_root": "paths.data_root",
        "recursive": "data.recursive",
        "allow_mask_as_volume": "data.allow_mask_as_volume",
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "loss": "train.loss",
        "max_minutes": "train.max_minutes",
        "init_weights": "train.init_weights",
        "weights": "model.weights",
        "only_masked": "test.only_masked",
    }
    values = {}
    for attr, dotted in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            values[dotted] = str(value) if isinstance(value, Path) else value
    if args.command == "train" and args.out is not None:
        values["model.weights"] = str(args.out)
    return values


def _cases_for(config: AppConfig, args: argparse.Namespace):
    from training.data import select_cases
    from training.split import Split

    selection = select_cases(config)
    cases = selection.report.cases
    # evaluate and calibrate need masks (test.only_masked, the seed's default); predict takes every case
    # unless --only_masked is given
    only_masked = bool(args.only_masked) if args.command == "predict" else config.test.only_masked
    if only_masked:
        cases = [c for c in cases if c.mask is not None]
    if args.split:
        split_file = args.split_file or config.model.weights.parent / f"{config.model.weights.stem}_run" / "split.json"
        wanted = set(Split.load(split_file).subset(args.split))
        cases = [c for c in cases if c.base in wanted]
        log.info("%s split from %s: %d case(s)", args.split, split_file, len(cases))
        if len(cases) < len(wanted):
            message = f"{split_file}: {len(wanted) - len(cases)} of its {len(wanted)} {args.split} case(s)"
            if not cases:
                raise ValueError(f"{message} (all) are not under {selection.vols_dir}: the split of another dataset?")
            log.warning("%s are not under %s", message, selection.vols_dir)
    if not cases:
        raise ValueError(f"{selection.vols_dir}: no case to process")
    return selection, cases


def _predictor(config: AppConfig) -> Predictor:
    settings = PostprocessSettings(**config.postprocess.model_dump())
    predictor = Predictor.from_file(
        config.model.weights,
        postprocess=settings,
        device=config.model.device,
        precision=config.model.precision,
        threshold=config.test.threshold,
        seed_target_shape=config.preprocess.target_shape,
        orientation_search=config.test.orientation_search,
        check_spacing=config.test.check_spacing,
    )
    log.info("model %s from %s", predictor.description, config.model.weights)
    if config.test.orientation_search:
        log.info("orientation search on: 48 readings per case (--orientation_search false when headers are right)")
    return predictor


def _run(args: argparse.Namespace, config: AppConfig, progress: bool) -> int:
    if args.command == "phantom":
        from training.dataset import load_volume
        from training.phantom import PhantomSettings, write_dataset
        from training.phantom_render import render_case

        if args.hard and args.family == "basic":
            raise ValueError("--hard draws an anatomical-family population; the basic family has none")
        settings = PhantomSettings.hard() if args.hard else PhantomSettings()
        rows = write_dataset(
            args.out,
            args.cases,
            args.seed,
            settings,
            args.start_index,
            progress=progress,
            workers=args.workers,
            family=args.family,
        )
        print(f"wrote {len(rows)} phantom case(s) to {args.out / 'NIfTI'} and {args.out / 'demographics.csv'}")
        for row in rows[: args.render]:
            base = str(row["file_base"])
            volume = load_volume(args.out / "NIfTI" / f"{base}.nii.gz")
            mask = load_volume(args.out / "NIfTI" / f"{base}_mask.nii.gz")
            path = render_case(
                np.asarray(volume.dataobj),
                np.asarray(mask.dataobj),
                volume.affine,
                args.out / "preview" / f"{base}.png",
            )
            print(f"preview: {path}")
        return 0
    if args.command == "train":
        from training.train import train

        if args.out is None and not args.resume and config.model.weights.exists():
            # the default output is the model the node serves: replacing it takes an explicit --out
            raise ValueError(
                f"{config.model.weights} exists (model.weights, the default output); "
                "name it with --out to replace it, or give another --out"
            )
        command = ["spect-train", *sys.argv[1:]]  # the program's own path stays out of the checkpoint
        result = train(config, config.model.weights, resume=args.resume, progress=progress, command=command)
        best = "n/a" if result.best_val_dice is None else f"{result.best_val_dice:.4f}"
        print(f"best validation Dice {best} at epoch {result.best_epoch}; checkpoint {result.paths.checkpoint}")
        print(f"run folder {result.paths.run_dir} (split, log.jsonl, log.csv, curves.png)")
        return 0
    selection, cases = _cases_for(config, args)
    if args.command == "calibrate":
        from seg.checkpoint import load_checkpoint, save_checkpoint
        from training.calibrate import calibrate_threshold

        checkpoint = load_checkpoint(config.model.weights)
        predictor = Predictor(
            checkpoint,
            PostprocessSettings(**config.postprocess.model_dump()),
            device=config.model.device,
            precision=config.model.precision,
        )
        best, table = calibrate_threshold(predictor, cases, progress=progress)
        for t, d in table.items():
            print(f"threshold {t:.2f}: mean Dice {d:.4f}" + ("  <- chosen" if t == best else ""))
        checkpoint.threshold = best
        checkpoint.metrics["threshold_calibration"] = {f"{t:.2f}": round(d, 5) for t, d in table.items()}
        target = args.out or config.model.weights
        save_checkpoint(checkpoint, target)
        print(f"threshold {best:.2f} recorded in {target}")
        return 0
    predictor = _predictor(config)
    failures: list[CaseFailure] = []  # cases that could not be used; the others go on
    if args.command == "evaluate":
        from training.discovery import read_demographics
        from training.evaluate import evaluate_cases, format_summary

        out = args.out or config.paths.outputs_dir / "eval"
        extra = read_demographics(selection.data_root / "demographics.csv") if selection.data_root else {}
        csv_path, summary = evaluate_cases(predictor, cases, out, config.test.n_visualize, extra, progress, failures)
        print(format_summary(summary))
        print(f"per-case metrics: {csv_path}")
        return _failed(args.command, failures)
    from training.evaluate import predict_cases

    masks_out, viz_out = config.viz.masks_out, config.viz.viz_out
    if args.out is not None:
        masks_out, viz_out = args.out / "masks_test", args.out / "viz_test"
    written = list(predict_cases(predictor, cases, masks_out, viz_out, config.viz.mask_suffix_out, progress, failures))
    print(f"wrote {len(written)} mask(s) to {masks_out} and figure(s) to {viz_out}")
    return _failed(args.command, failures)


def _failed(command: str, failures: Sequence[CaseFailure]) -> int:
    """Exit status 1 and the list on stderr when cases failed (the others were done), else 0."""
    if not failures:
        return 0
    print(f"spect-train {command}: {len(failures)} case(s) could not be used:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure.error}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spect-train``; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        values = key_aliases(args.command, extra)
        values.update(_flag_values(args))
        config = load_config(args.config, args.overrides, values)
        return _run(args, config, progress=not args.quiet)
    except (ConfigError, CheckpointError, OSError, ValueError) as exc:
        print(f"spect-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spect-train {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
