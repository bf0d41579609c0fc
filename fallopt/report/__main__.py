"""`python -m fallopt.report`: compare a sweep's runs, recommend one, optionally register it.

    python -m fallopt.report                               # the latest sweep in the local store
    python -m fallopt.report --max-size-kb 300 --min-fall-recall 0.9 --register fall-detector
    python -m fallopt.report --target nano33ble            # the best run that fits the board
    python -m fallopt.report --target nano33ble --ram-reserved-kb 64   # with 64 KiB for the app

`--target NAME` judges every run against a board of `conf/target/` from the run's own
TFLM arena and `.tflite` size (whatever board it was made for): RAM (arena + reserve),
the arena against the largest RAM block, flash (`.tflite` + TFLM runtime). A run without
an arena figure (TFLM could not run it, or it predates the measurement) never fits.

The store is only read: the one write is the finished report, logged to the sweep's parent
run under `report/[<dataset>/][<board>/]` (and a model version with --register).

Exit codes: 0 report written; 2 nothing to report on, an unknown --target, a store,
experiment or run that cannot be read, runs of several data sets without --dataset, or an
output folder holding the store (one line naming it, nothing written); 4 report written
but no run meets the constraints (or fits the board).
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from fallopt.errors import EXIT_USER_ERROR, FalloptError

if TYPE_CHECKING:
    from mlflow.entities import Experiment
    from mlflow.tracking import MlflowClient

EXIT_NO_MODEL = 4
log = logging.getLogger("fallopt.report")


def _parser() -> argparse.ArgumentParser:
    from fallopt.target import names

    boards = "|".join(names())
    p = argparse.ArgumentParser(
        prog="python -m fallopt.report",
        description="Pareto report of a sweep's runs and the model to put on the device.",
    )
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db", help="any MLflow URI")
    p.add_argument("--experiment", default="fallopt", help="experiment name (default: fallopt)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the latest sweep)")
    p.add_argument("--all-runs", action="store_true", help="every FINISHED run, not one sweep")
    p.add_argument("--dataset", metavar="NAME", help="only the runs of this data set")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<parent run>)")
    p.add_argument("--max-size-kb", type=float, help="largest gzipped .tflite allowed (KiB)")
    p.add_argument("--min-fall-recall", type=float, help="smallest fall recall allowed (0-1)")
    p.add_argument("--max-latency-ms", type=float, help="largest host latency allowed (ms)")
    p.add_argument("--target", metavar="BOARD", help=f"judge every run against a board ({boards})")
    p.add_argument("--ram-reserved-kb", type=float, metavar="KIB",
                   help="RAM your application needs besides the arena (with --target)")  # fmt: skip
    p.add_argument("--register", metavar="NAME", help="register the recommended model as NAME")
    return p


def open_store(uri: str, name: str) -> tuple[MlflowClient, Experiment]:
    """A client on an existing store and its experiment `name`, creating neither.

    Raises:
        FalloptError: when the database, the server or the experiment is not there.
    """
    from mlflow.tracking import MlflowClient

    from fallopt import track

    db = track.sqlite_path(uri)
    if db is not None and not db.exists():
        raise FalloptError(f"--tracking-uri {uri}: no such database")
    if uri.startswith(("http://", "https://")):
        track.check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = ", ".join(repr(e.name) for e in client.search_experiments())
        raise FalloptError(
            f"--experiment {name!r}: no such experiment at {uri} (it has {names or 'none'}): "
            "pass one of those"
        )
    return client, experiment


def sweep_parent(client: MlflowClient, experiment: Experiment, run_id: str) -> str:
    """Check that `run_id` is a sweep's parent run in the experiment; return it.

    Raises:
        FalloptError: naming the id when it is no run, another experiment's, or no sweep.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise FalloptError(
            f"--parent-run {run_id}: no such run; leave it out for the latest sweep, or copy "
            "the id of a sweep's parent run from the MLflow UI"
        ) from None
    if run.info.experiment_id != experiment.experiment_id:
        other = client.get_experiment(run.info.experiment_id).name
        raise FalloptError(
            f"--parent-run {run_id} is in experiment {other!r}, not {experiment.name!r}: "
            f"pass --experiment {other}"
        )
    if run.data.tags.get("fallopt.role") != "sweep":
        raise FalloptError(
            f"--parent-run {run_id} is not a sweep's parent run (tag fallopt.role=sweep): pass "
            "the parent's id, or --all-runs"
        )
    return run_id


def store_folders(uri: str, experiment: Experiment) -> list[Path]:
    """The local folders that hold the store: the database's and the experiment's artifacts."""
    from fallopt import track

    folders = []
    db = track.sqlite_path(uri)
    if db is not None:
        folders.append(db.resolve().parent)  # also holds artifacts/, the default root
    location = urllib.parse.urlparse(experiment.artifact_location or "")
    if location.scheme in ("", "file") and location.path:
        folders.append(Path(urllib.parse.unquote(location.path)).resolve())
    return folders


def check_out(out: Path, uri: str, experiment: Experiment) -> None:
    """Refuse an output folder that holds the store: the report must not write into it.

    Raises:
        FalloptError: naming the folder and the store inside it.
    """
    folder = out.resolve()
    for store in store_folders(uri, experiment):
        if store == folder or folder in store.parents:
            raise FalloptError(
                f"--out {out}: that folder holds the tracking store ({store}): pass a folder "
                "outside it, e.g. --out reports/study1"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the report command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mlflow.exceptions import MlflowException

    from fallopt.report.build import build_report
    from fallopt.report.publish import publish, register
    from fallopt.report.runs import latest_sweep, one_line
    from fallopt.report.select import Constraints
    from fallopt.target import load as load_target

    try:
        board = None  # checked before the store is opened
        if args.target is not None:
            reserve = {} if args.ram_reserved_kb is None else {
                "ram_reserved_bytes": round(args.ram_reserved_kb * 1024)}  # fmt: skip
            board = load_target(args.target, **reserve)
        elif args.ram_reserved_kb is not None:
            raise FalloptError("--ram-reserved-kb needs a board: add --target BOARD")
        client, experiment = open_store(args.tracking_uri, args.experiment)
        experiment_id = experiment.experiment_id
        parent = None
        if args.parent_run is not None:
            parent = sweep_parent(client, experiment, args.parent_run)
        elif not args.all_runs:
            latest = latest_sweep(client, experiment_id)
            if latest is None:
                raise FalloptError(
                    f"experiment {args.experiment!r} has no sweep: run one "
                    "(python -m fallopt.run -m ...), or pass --all-runs"
                )
            parent = latest.info.run_id
        scope = tuple(filter(None, (args.dataset, args.target)))  # a report's own folder
        out = args.out or Path("reports", parent or f"{args.experiment}-all", *scope)
        check_out(out, args.tracking_uri, experiment)
        constraints = Constraints(
            args.max_size_kb, args.min_fall_recall, args.max_latency_ms, board
        )
        title = f"fallopt report: {args.experiment}" + (f", sweep {parent}" if parent else "")
        title += f", data set {args.dataset}" if args.dataset else ""
        try:
            report = build_report(
                client, experiment_id, parent, constraints, out, title, args.dataset
            )
        except ValueError as e:
            raise FalloptError(f"{title}: {e}") from None
    except FalloptError as e:
        log.error("%s", e)
        return EXIT_USER_ERROR
    except MlflowException as e:
        log.error("--tracking-uri %s: cannot read the store: %s", args.tracking_uri,
                  one_line(e.message))  # fmt: skip
        return EXIT_USER_ERROR
    log.info("[report] %s", report.recommendation.message)
    log.info("[report] written to %s and %s", report.html, report.markdown)
    if parent:
        publish(client, parent, report, scope)
    if report.recommendation.run_id is None:
        return EXIT_NO_MODEL
    if args.register:
        register(client, args.register, report.recommendation.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
