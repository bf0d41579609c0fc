"""A finished sweep's summary on its parent run: CSV, plots, best run and Pareto set.

Loaded only when a multirun ends (pandas, MLflow and matplotlib are slow to import).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from fallopt.config import OBJECTIVES
from fallopt.pareto import pareto_mask
from fallopt.plots import sweep_plots
from fallopt.protocol import job_outcomes

log = logging.getLogger("fallopt.sweep")

SETTINGS = ["prune.method", "prune.sparsity", "prune.scope", "model.name", "model.width",
            "quant.mode"]  # fmt: skip
# Every objective a sweeper may be given is a column, so every accepted one is summarizable.
METRICS = list(dict.fromkeys([
    "train_accuracy", "val_accuracy", "test_accuracy", "test_fall_recall",
    "sparsity_achieved", "keras_size_bytes", "keras_gzip_bytes", "nonzero_params",
    "gzip_ratio_to_baseline", "baseline_keras_gzip_bytes", "tflite_test_accuracy",
    "tflite_gzip_bytes", "tflite_latency_ms", *OBJECTIVES,
]))  # fmt: skip
COLUMNS = SETTINGS + METRICS


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
    for column in [*METRICS, "prune.sparsity", "model.width"]:
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
