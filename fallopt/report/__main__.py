"""`python -m fallopt.report`: compare a sweep's runs, recommend one, optionally register it.

    python -m fallopt.report                               # the latest sweep in the local store
    python -m fallopt.report --max-size-kb 300 --min-fall-recall 0.9 --register fall-detector

Exit codes: 0 report written; 2 nothing to report on, or a store or run that cannot be
read (one line naming it); 4 report written but no run meets the constraints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fallopt.errors import EXIT_USER_ERROR

EXIT_NO_MODEL = 4
log = logging.getLogger("fallopt.report")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fallopt.report",
        description="Pareto report of a sweep's runs and the model to put on the device.",
    )
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db", help="any MLflow URI")
    p.add_argument("--experiment", default="fallopt", help="experiment name (default: fallopt)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the latest sweep)")
    p.add_argument("--all-runs", action="store_true", help="every FINISHED run, not one sweep")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<parent run>)")
    p.add_argument("--max-size-kb", type=float, help="largest gzipped .tflite allowed (KiB)")
    p.add_argument("--min-fall-recall", type=float, help="smallest fall recall allowed (0-1)")
    p.add_argument("--max-latency-ms", type=float, help="largest host latency allowed (ms)")
    p.add_argument("--register", metavar="NAME", help="register the recommended model as NAME")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the report command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mlflow.tracking import MlflowClient

    from fallopt import track
    from fallopt.config import TrackingConfig
    from fallopt.errors import FalloptError
    from fallopt.report.build import build_report
    from fallopt.report.publish import publish, register
    from fallopt.report.runs import latest_sweep
    from fallopt.report.select import Constraints

    try:
        tracking = TrackingConfig(uri=args.tracking_uri, experiment=args.experiment)
        db = track.sqlite_path(args.tracking_uri)
        if db is not None and not db.exists():
            raise FalloptError(f"--tracking-uri {args.tracking_uri}: no such database")
        experiment_id = track.connect(tracking)
        client = MlflowClient(args.tracking_uri)
        parent = args.parent_run
        if parent is None and not args.all_runs:
            latest = latest_sweep(client, experiment_id)
            if latest is None:
                raise FalloptError(
                    f"experiment {args.experiment!r} has no sweep: run one "
                    "(python -m fallopt.run -m ...), or pass --all-runs"
                )
            parent = latest.info.run_id
        out = args.out or Path("reports") / (parent or f"{args.experiment}-all")
        constraints = Constraints(args.max_size_kb, args.min_fall_recall, args.max_latency_ms)
        title = f"fallopt report: {args.experiment}" + (f", sweep {parent}" if parent else "")
        try:
            report = build_report(client, experiment_id, parent, constraints, out, title)
        except ValueError as e:
            raise FalloptError(f"{title}: {e}") from None
    except FalloptError as e:
        log.error("%s", e)
        return EXIT_USER_ERROR
    log.info("[report] %s", report.recommendation.message)
    log.info("[report] written to %s and %s", report.html, report.markdown)
    if parent:
        publish(client, parent, report)
    if report.recommendation.run_id is None:
        return EXIT_NO_MODEL
    if args.register:
        register(client, args.register, report.recommendation.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
