"""The record of a multirun: one MLflow parent run, the jobs as its children, a summary.

`SweepRecord` is a Hydra callback (conf/config.yaml). When a multirun starts it opens a
parent run tagged `fallopt.role=sweep` and exports its id in `FALLOPT_PARENT_RUN_ID`, which
jobs in this process and in worker processes started from it inherit. Jobs link themselves
with MLflow's `mlflow.parentRunId` tag. When the sweep ends, or the process exits after a
failed job, the parent gets a CSV of its children, the lab's plots (accuracy and gzipped
size against sparsity) and the best run by validation accuracy, and is closed.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fallopt import track
from fallopt.config import TrackingConfig
from fallopt.plots import sweep_plots

log = logging.getLogger("fallopt.sweep")

PARENT_ENV = "FALLOPT_PARENT_RUN_ID"
COLUMNS = [
    "prune.method", "prune.sparsity", "prune.scope", "model.name", "quant.mode",
    "train_accuracy", "val_accuracy", "test_accuracy", "test_fall_recall",
    "sparsity_achieved", "keras_size_bytes", "keras_gzip_bytes", "nonzero_params",
    "gzip_ratio_to_baseline", "baseline_keras_gzip_bytes",
]  # fmt: skip


def parent_run_id() -> str | None:
    """The sweep's parent run for a job of a multirun, else None."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return os.environ.get(PARENT_ENV)
    return None


def sweep_table(client: MlflowClient, experiment_id: str, parent: str) -> pd.DataFrame:
    """One row per child run: its status, settings and headline metrics."""
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000
    )
    rows = []
    for run in children:
        values: dict[str, Any] = {**run.data.params, **run.data.metrics}
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status}
        row.update({c: values.get(c) for c in COLUMNS})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run_id", "run_name", "status", *COLUMNS])
    table["prune.sparsity"] = pd.to_numeric(table["prune.sparsity"])
    return table.sort_values("prune.sparsity", kind="stable").reset_index(drop=True)


def summarize(client: MlflowClient, experiment_id: str, parent: str, out_dir: Path) -> bool:
    """Log the sweep's CSV, plots and best run to the parent; True if every child finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = sweep_table(client, experiment_id, parent)
    csv = out_dir / "sweep.csv"
    table.to_csv(csv, index=False)
    client.log_artifact(parent, str(csv))
    done = table[table["status"] == "FINISHED"].dropna(subset=["val_accuracy"])
    if not done.empty:
        for path in sweep_plots(done, out_dir):
            client.log_artifact(parent, str(path))
        best = done.loc[done["val_accuracy"].idxmax()]
        client.set_tag(parent, "fallopt.best_run_id", best["run_id"])
        for name in ("val_accuracy", "test_accuracy"):
            client.log_metric(parent, f"best_{name}", float(best[name]))
        client.log_metric(parent, "best_sparsity", float(best["prune.sparsity"]))
        log.info(
            "[sweep] best by val_accuracy: prune.sparsity=%g (run %s): val_accuracy %.3f, "
            "test_accuracy %.3f",
            best["prune.sparsity"],
            best["run_id"],
            best["val_accuracy"],
            best["test_accuracy"],
        )
    failed = len(table) - len(done)
    log.info("[sweep] %d runs finished, %d not; summary in %s", len(done), failed, out_dir)
    return failed == 0 and not table.empty


class SweepRecord(Callback):
    """Hydra callback: a parent MLflow run around every multirun."""

    def __init__(self) -> None:
        self._parent: str | None = None
        self._client: MlflowClient | None = None
        self._experiment_id = ""
        self._out_dir = Path(".")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run and export its id to the jobs."""
        tracking = OmegaConf.to_object(config.tracking)
        assert isinstance(tracking, TrackingConfig)
        self._experiment_id = track.connect(tracking)
        self._client = MlflowClient(tracking.uri)
        self._out_dir = Path(config.hydra.sweep.dir)
        overrides = " ".join(config.hydra.overrides.task)
        run = self._client.create_run(
            self._experiment_id,
            run_name=f"sweep {overrides}"[:250],
            tags={"fallopt.role": "sweep", "fallopt.sweep_dir": str(self._out_dir.resolve())},
        )
        self._parent = run.info.run_id
        os.environ[PARENT_ENV] = self._parent
        atexit.register(self._close, "FAILED")  # a job failed and Hydra stopped the sweep
        log.info("[sweep] parent run %s in experiment %r", self._parent, tracking.experiment)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the children and close the parent."""
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self._parent is None or self._client is None:
            return
        parent, self._parent = self._parent, None
        os.environ.pop(PARENT_ENV, None)
        try:
            complete = summarize(self._client, self._experiment_id, parent, self._out_dir)
            if not complete:
                status = "FAILED"
        finally:
            self._client.set_terminated(parent, status)
