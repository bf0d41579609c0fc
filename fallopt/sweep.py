"""The record of a multirun: one MLflow parent run, the jobs as its children, a summary.

`SweepRecord` is a Hydra callback (conf/config.yaml). When a multirun starts it counts the
jobs, opens a parent run tagged `fallopt.role=sweep` and `fallopt.sweep_dir`, and exports
its id, the job count and the start time to the jobs (see job.py). Jobs link themselves with
MLflow's `mlflow.parentRunId` tag and record their outcome on the parent. When the sweep
ends (or the process exits after a job stopped it), the parent gets a CSV of the sweep's
runs (those it ran and those it reused), the lab's plots, the best run by validation
accuracy and, with two objectives, the Pareto-optimal runs tagged `fallopt.pareto=true`.
The process then exits non-zero if any job failed or never reported.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fallopt import track
from fallopt.config import OBJECTIVES, TrackingConfig
from fallopt.errors import EXIT_SWEEP_INCOMPLETE, EXIT_USER_ERROR, FalloptError
from fallopt.job import PARENT_ENV, START_ENV, SWEEP_DIR_TAG, TOTAL_ENV, job_outcomes
from fallopt.pareto import pareto_mask
from fallopt.plots import sweep_plots

log = logging.getLogger("fallopt.sweep")

COLUMNS = [
    "prune.method", "prune.sparsity", "prune.scope", "model.name", "model.width", "quant.mode",
    "train_accuracy", "val_accuracy", "test_accuracy", "test_fall_recall",
    "sparsity_achieved", "keras_size_bytes", "keras_gzip_bytes", "nonzero_params",
    "gzip_ratio_to_baseline", "baseline_keras_gzip_bytes", "tflite_test_accuracy",
    "tflite_gzip_bytes", "tflite_latency_ms",
]  # fmt: skip


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: the grid's size, or an Optuna study's n_trials."""
    sweeper = config.hydra.sweeper
    if "optuna" in str(sweeper.get("_target_", "")):
        return int(sweeper.n_trials)
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None
    params = sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def sweep_table(client: MlflowClient, outcomes: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """One row per job that reported: its outcome, run, settings and headline metrics."""
    rows = []
    for num, outcome in sorted(outcomes.items()):
        row: dict[str, Any] = {"job": num, "outcome": outcome["outcome"], "run_id": None}
        row.update({"overrides": outcome["overrides"], "error": outcome["error"]})
        if outcome["run_id"]:
            run = client.get_run(outcome["run_id"])
            values: dict[str, Any] = {**run.data.params, **run.data.metrics}
            row.update(run_id=run.info.run_id, run_name=run.info.run_name, status=run.info.status)
            row.update({c: values.get(c) for c in COLUMNS})
        rows.append(row)
    head = ["job", "outcome", "run_id", "run_name", "status", "overrides", "error"]
    table = pd.DataFrame(rows, columns=[*head, *COLUMNS])
    for column in COLUMNS[6:] + ["prune.sparsity", "model.width"]:
        table[column] = pd.to_numeric(table[column])
    return table


def tag_pareto(client: MlflowClient, table: pd.DataFrame, objectives: list[str]) -> list[str]:
    """Tag the Pareto-optimal runs over `objectives` with `fallopt.pareto=true`; their ids."""
    values = table[objectives].to_numpy(dtype=float)
    mask = pareto_mask(values, [OBJECTIVES[name] for name in objectives])
    front = list(table.loc[mask, "run_id"])
    for run_id in front:
        client.set_tag(run_id, "fallopt.pareto", "true")
        client.set_tag(run_id, "fallopt.pareto_objectives", ",".join(objectives))
    return front


def summarize(
    client: MlflowClient, parent: str, out_dir: Path, total: int | None, objectives: list[str]
) -> bool:
    """Log the sweep's CSV, plots, best run and Pareto set to the parent.

    Returns True if every job finished or was reused.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = job_outcomes(client, parent)
    table = sweep_table(client, outcomes)
    done = table[table["outcome"].isin(["finished", "reused"])].dropna(subset=["val_accuracy"])
    if len(objectives) > 1 and not done.empty:
        front = set(tag_pareto(client, done, objectives))
        table["pareto"] = table["run_id"].isin(front)
        client.set_tag(parent, "fallopt.pareto_runs", ",".join(sorted(front))[:5000])
        log.info("[sweep] Pareto set over %s: %d runs", " and ".join(objectives), len(front))
    csv = out_dir / "sweep.csv"
    table.to_csv(csv, index=False)
    client.log_artifact(parent, str(csv))
    if not done.empty:
        for path in sweep_plots(done.sort_values("prune.sparsity", kind="stable"), out_dir):
            client.log_artifact(parent, str(path))
        best = done.loc[done["val_accuracy"].idxmax()]
        client.set_tag(parent, "fallopt.best_run_id", best["run_id"])
        for name in ("val_accuracy", "test_accuracy"):
            client.log_metric(parent, f"best_{name}", float(best[name]))
        client.log_metric(parent, "best_sparsity", float(best["prune.sparsity"]))
        log.info(
            "[sweep] best by val_accuracy: %s (run %s): val_accuracy %.3f, test_accuracy %.3f",
            best["overrides"] or "defaults",
            best["run_id"],
            best["val_accuracy"],
            best["test_accuracy"],
        )
    counts = table["outcome"].value_counts()
    missing = (total or len(table)) - len(table)
    log.info(
        "[sweep] %d finished, %d reused (already FINISHED), %d failed%s; summary in %s",
        counts.get("finished", 0),
        counts.get("reused", 0),
        counts.get("failed", 0),
        f", {missing} never reported" if missing > 0 else "",
        csv,
    )
    for _, row in table[table["outcome"] == "failed"].iterrows():
        log.error("[sweep] job %d failed: %s: %s", row["job"] + 1, row["overrides"], row["error"])
    return counts.get("failed", 0) == 0 and missing <= 0


class SweepRecord(Callback):
    """Hydra callback: a parent MLflow run around every multirun."""

    def __init__(self) -> None:
        self._parent: str | None = None
        self._client: MlflowClient | None = None
        self._out_dir = Path(".")
        self._total: int | None = None
        self._objectives: list[str] = []
        self._failed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Count the jobs, open the parent run and export what jobs need to the environment.

        Hydra only warns when a callback raises; a sweep without its record must not start.
        """
        try:
            self._start(config)
        except FalloptError as e:
            log.error("%s", e)
            raise SystemExit(EXIT_USER_ERROR) from None
        except Exception:
            log.exception("[sweep] cannot open the sweep's parent run")
            raise SystemExit(1) from None

    def _start(self, config: DictConfig) -> None:
        self._total = sweep_size(config)
        if self._total:
            os.environ[TOTAL_ENV] = str(self._total)
        if config.get("dry_run"):
            log.info("[dry-run] %s jobs; nothing is trained or logged", self._total or "?")
            return
        tracking = OmegaConf.to_object(config.tracking)
        assert isinstance(tracking, TrackingConfig)
        experiment_id = track.connect(tracking)
        self._client = MlflowClient(tracking.uri)
        self._out_dir = Path(config.hydra.sweep.dir)
        self._objectives = list(config.objectives)
        overrides = " ".join(config.hydra.overrides.task)
        for run_id in track.reap_dead_runs(experiment_id, {"fallopt.role": "sweep"}):
            log.info("[sweep] sweep %s was left RUNNING by a killed process: marked KILLED", run_id)
        tags = {"fallopt.role": "sweep", SWEEP_DIR_TAG: str(config.hydra.sweep.dir)}
        tags["fallopt.sweep_path"] = str(self._out_dir.resolve())
        tags.update(track.owner_tags())
        run = self._client.create_run(experiment_id, run_name=f"sweep {overrides}"[:250], tags=tags)
        self._parent = run.info.run_id
        os.environ[PARENT_ENV] = self._parent
        os.environ[START_ENV] = str(time.time())
        atexit.register(self._close, "FAILED")  # a job stopped the sweep (keep_going=false)
        log.info(
            "[sweep] %s jobs; parent run %s in experiment %r",
            self._total or "?",
            self._parent,
            tracking.experiment,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the jobs, close the parent, and exit non-zero if any job failed."""
        self._close("FINISHED")
        if self._failed:
            raise SystemExit(EXIT_SWEEP_INCOMPLETE)

    def _close(self, status: str) -> None:
        if self._parent is None or self._client is None:
            return
        parent, self._parent = self._parent, None
        for name in (PARENT_ENV, START_ENV, TOTAL_ENV):
            os.environ.pop(name, None)
        try:
            complete = summarize(self._client, parent, self._out_dir, self._total, self._objectives)
            self._failed = not complete
        finally:
            self._client.set_terminated(parent, status if complete else "FAILED")
