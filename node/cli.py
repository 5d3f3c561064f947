"""``spect-node``: run the node, inspect it, and send DICOM to a peer.

The CLI builds the configuration once and maps flags onto it; the work is done by
the library.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from config import AppConfig, ConfigError, load_config
from config.logging_setup import configure_logging
from storage.errors import StorageError
from storage.layout import StorageLayout

log = logging.getLogger("spect-node")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file (may be partial)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="spect-node", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("serve", help="run the node until SIGTERM/SIGINT"))
    _common(sub.add_parser("status", help="print the jobs table"))
    results = sub.add_parser("results", help="list SEG results with their source series and send state")
    results.add_argument("--study", help="only this Study Instance UID")
    _common(results)
    resend = sub.add_parser("resend", help="send stored SEGs again")
    group = resend.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", type=int, help="every delivery of this job's result")
    group.add_argument("--all-failed", action="store_true", help="every failed delivery")
    _common(resend)
    reprocess = sub.add_parser("reprocess", help="run inference again on a stored series")
    reprocess.add_argument("series_uid")
    _common(reprocess)
    send = sub.add_parser("send", help="C-STORE files (or folders, recursively) to a peer")
    send.add_argument("paths", nargs="+", type=Path)
    send.add_argument("--to", required=True, help="destination AE_TITLE@host:port")
    send.add_argument("--aet", default="SPECTSEND", help="calling AE title (default SPECTSEND)")
    send.add_argument(
        "--tls",
        action="store_true",
        help="DICOM TLS: verify the peer against node.tls.ca_certificates, show node.tls.certificate",
    )
    _common(send)
    purge = sub.add_parser("purge", help="remove studies older than the retention period (files and index rows)")
    purge.add_argument(
        "--older-than", type=float, metavar="DAYS", help="retention period in days (default: storage.retention_days)"
    )
    purge.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")
    purge.add_argument(
        "--include-failed", action="store_true", help="also remove studies whose SEG deliveries failed for good"
    )
    _common(purge)
    demo = sub.add_parser("demo", help="phantom studies -> node -> SEG at a stand-in PACS, with Dice and a PNG")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="working folder (default demo/)")
    demo.add_argument("--studies", type=int, default=2, help="phantom studies to send")
    _common(demo)
    return parser


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _serve(config: AppConfig) -> int:
    from node.service import Node

    node = Node.start(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    warning = f"; NO MODEL, every job fails until it loads: {node.model.error}" if node.model.error else ""
    print(f"spect-node {config.node.ae_title} listening on {config.node.host}:{node.port}{warning}", flush=True)
    while not stop.wait(0.5):
        pass
    node.stop()
    return 0


def _existing_index_path(config: AppConfig) -> Path:
    """The node's index file; FileNotFoundError (exit 2) if there is none: a wrong ``storage.root``
    must not look like an empty node (nor create one)."""
    path = StorageLayout(config.storage.root).index_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index, nothing is stored there (check storage.root)")
    return path


def _status(config: AppConfig) -> int:
    from storage import Index

    with Index.open(_existing_index_path(config)) as index:
        jobs = index.jobs(limit=200)
        print(
            f"{'job':>5} {'state':<8} {'att':>3} {'created':<19} {'finished':<19} {'conv s':>6} {'inf s':>6} "
            f"{'enc s':>6}  series / reason"
        )
        for job in jobs:
            timings = [getattr(job, name, None) for name in ("convert_s", "infer_s", "encode_s")]
            cells = " ".join(f"{t:>6.2f}" if t is not None else f"{'-':>6}" for t in timings)
            print(
                f"{job.id:>5} {job.state:<8} {job.attempts:>3} {_when(job.created_at):<19} "
                f"{_when(job.finished_at):<19} {cells}  {job.series_instance_uid}"
                + (f"  ({job.reason})" if job.reason else "")
            )
        if not jobs:
            print("no jobs yet")
    return 0


def _results(config: AppConfig, study: str | None) -> int:
    from storage import Index

    with Index.open(_existing_index_path(config)) as index:
        results = index.results(study_uid=study)
        for result in results:
            deliveries = index.deliveries(result_id=result.id)
            sent = ", ".join(f"{d.peer_ae_title}:{d.state}" for d in deliveries) or "no destination"
            volume = "-" if result.myocardium_volume_ml is None else f"{result.myocardium_volume_ml:.1f} mL"
            print(
                f"SEG {result.seg_sop_instance_uid}\n  study  {result.study_instance_uid}\n"
                f"  source {result.source_series_instance_uid}\n  myocardium {volume}; model {result.model_name}; "
                f"created {_when(result.created_at)}; sent {sent}"
            )
        if not results:
            print("no results" + (f" for study {study}" if study else ""))
    return 0


def _resend(config: AppConfig, job_id: int | None) -> int:
    from storage import Index

    with Index.open(_existing_index_path(config)) as index:
        if job_id is not None:
            result = index.result_for_job(job_id)
            if result is None:
                raise ValueError(f"job {job_id} has no result to send")
            reset = index.reset_deliveries(result.id, states=("failed", "done", "pending"))
        else:
            reset = index.reset_deliveries(None, states=("failed",))
    print(f"{len(reset)} deliver{'y' if len(reset) == 1 else 'ies'} queued again (a running node sends them)")
    return 0


def _reprocess(config: AppConfig, series_uid: str) -> int:
    from storage import Index

    with Index.open(_existing_index_path(config)) as index:
        if index.series(series_uid) is None:
            raise ValueError(f"series {series_uid} is not stored on this node")
        job_id = index.enqueue_job(series_uid)
    print(f"job {job_id} queued for series {series_uid} (a running node processes it)")
    return 0


def _send(paths: Sequence[Path], to: str, aet: str, config: AppConfig, tls: bool = False) -> int:
    from node.network import PeerAddress
    from node.scu import collect_for_sending, send_datasets
    from node.service import node_timeouts
    from node.tls import client_context

    peer = PeerAddress.parse(to)
    tls_args = (client_context(config.node.tls), peer.host) if tls else None
    found = collect_for_sending(paths)  # non-DICOM files in folders skipped with a warning each
    outcome = send_datasets(found.datasets, peer, aet, node_timeouts(config), progress=True, tls_args=tls_args)
    ok, total = len(outcome.statuses) - outcome.n_failed, len(found.datasets)
    skipped = f"; skipped {len(found.skipped)} non-DICOM file(s)" if found.skipped else ""
    failure = outcome.failure()
    print(f"sent {ok}/{total} instance(s) to {peer}{skipped}" + (f"; error: {failure}" if failure else ""))
    return 0 if outcome.all_succeeded and ok == total else 1


def _purge(config: AppConfig, older_than_days: float | None, dry_run: bool, include_failed: bool) -> int:
    from tqdm import tqdm

    from node.audit import AuditLog, record_study_purged
    from storage import Storage
    from storage.retention import StudySummary, check_period_days, purge

    days = older_than_days if older_than_days is not None else config.storage.retention_days
    period_s = check_period_days(days)
    _existing_index_path(config)
    verb = "would remove" if dry_run else "removed"

    def bar(studies: list[StudySummary]) -> tqdm:
        return tqdm(studies, desc="purge", unit="study", disable=len(studies) < 20, file=sys.stderr)

    audit = AuditLog(None if dry_run else (config.node.audit_log or Path(config.storage.root) / "audit.jsonl"))

    def show(study: StudySummary, _dry_run: bool) -> None:
        record_study_purged(audit, study, days, by="purge")
        tqdm.write(
            f"{verb} study {study.study_instance_uid} (patient {study.patient_id or '-'}, {study.n_instances} "
            f"instance(s), {study.size_bytes / 1e6:.1f} MB, last received {_when(study.last_received_at)})"
        )

    with Storage.open(config.storage.root) as storage:
        report = purge(storage, period_s, dry_run=dry_run, include_failed=include_failed, on_study=show, studies=bar)
    audit.close()
    for held in report.held:
        print(f"kept study {held.study.study_instance_uid}: {held.reason}")
    n_removed = len(report.removed)
    print(
        f"purge{' (dry run)' if dry_run else ''}: {verb} {n_removed} stud{'y' if n_removed == 1 else 'ies'} "
        f"({report.instances_removed} instance(s), {report.bytes_removed / 1e6:.1f} MB) received before "
        f"{_when(report.cutoff)} ({days:g} days); kept {len(report.held)} the node still owes work on"
        + (f"; {verb} {report.orphans_removed} orphan file(s)" if report.orphans_removed else "")
    )
    for error in report.file_errors:
        print(f"spect-node purge: error: {error}", file=sys.stderr)
    return 1 if report.file_errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spect-node``; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        config = load_config(args.config, args.overrides)
        configure_logging(verbose=args.verbose, json_lines=config.node.log_format == "json")
        if args.command == "serve":
            return _serve(config)
        if args.command == "status":
            return _status(config)
        if args.command == "results":
            return _results(config, args.study)
        if args.command == "resend":
            return _resend(config, args.job)
        if args.command == "reprocess":
            return _reprocess(config, args.series_uid)
        if args.command == "purge":
            return _purge(config, args.older_than, args.dry_run, args.include_failed)
        if args.command == "send":
            return _send(args.paths, args.to, args.aet, config, args.tls)
        from node.demo import run_demo

        return run_demo(config, args.out, args.studies)
    except (ConfigError, StorageError, OSError, ValueError) as exc:  # OSError: a port in use, a folder not writable
        print(f"spect-node {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
