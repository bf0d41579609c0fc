"""The runs a report compares, read from MLflow into one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fallopt.job import job_outcomes

# Report column -> (MLflow key, how to convert). Accuracy, recall and size are those of the
# .tflite file each run evaluated: the model that would go on the device.
METRICS: dict[str, str] = {
    "test_accuracy": "tflite_test_accuracy",
    "fall_recall": "tflite_test_fall_recall",
    "false_alarm_rate": "tflite_test_false_alarm_rate",
    "tflite_gzip_bytes": "tflite_gzip_bytes",
    "gzip_ratio": "tflite_gzip_ratio_to_baseline",
    "latency_ms": "tflite_latency_ms",
    "disagreement": "tflite_disagreement",
    "val_accuracy": "val_accuracy",
    "sparsity_achieved": "sparsity_achieved",
}
PARAMS = [
    "prune.method",
    "prune.sparsity",
    "prune.scope",
    "quant.mode",
    "model.name",
    "model.width",
]


def latest_sweep(client: MlflowClient, experiment_id: str) -> Run | None:
    """The most recently started sweep parent run of the experiment."""
    runs = client.search_runs(
        [experiment_id],
        "tags.`fallopt.role` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def sweep_runs(client: MlflowClient, experiment_id: str, parent: str | None) -> list[Run]:
    """FINISHED runs of a sweep (its children and the runs it reused), else of the experiment."""
    if parent is None:
        runs = client.search_runs(
            [experiment_id], "attributes.status = 'FINISHED'", max_results=5000
        )
        return [r for r in runs if "fallopt.config_hash" in r.data.tags]
    ids = {o["run_id"] for o in job_outcomes(client, parent).values() if o["run_id"]}
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=5000
    )
    ids |= {r.info.run_id for r in children}
    runs = [client.get_run(run_id) for run_id in sorted(ids)]
    return [r for r in runs if r.info.status == "FINISHED"]


def label(params: dict[str, Any]) -> str:
    """A run's settings in a few words: `cauca_cnn x0.5 · constant 0.5 dense · int8`."""
    model = params.get("model.name", "?")
    if params.get("model.width") not in (None, "1.0"):
        model += f" x{params['model.width']}"
    prune = params.get("prune.method", "none")
    if prune != "none":
        prune = f"{prune} {params.get('prune.sparsity')} {params.get('prune.scope')}"
    return f"{model} · {prune} · {params.get('quant.mode', 'none')}"


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: id, label, settings and the compared metrics (NaN where missing)."""
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row: dict[str, Any] = {"run_id": run.info.run_id, "label": label(params)}
        row.update({key: params.get(key) for key in PARAMS})
        row.update({name: metrics.get(key, np.nan) for name, key in METRICS.items()})
        row["classes"] = run.data.tags.get("fallopt.classes", "")
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run_id", "label", *PARAMS, *METRICS, "classes"])
    for column in ["prune.sparsity", "model.width", *METRICS]:
        table[column] = pd.to_numeric(table[column])
    table["size_kb"] = table["tflite_gzip_bytes"] / 1024
    table["compression"] = 1 / table["gzip_ratio"]  # times smaller than the float32 baseline
    return table.sort_values(["quant.mode", "prune.sparsity", "label"]).reset_index(drop=True)


def confusion(client: MlflowClient, run_id: str, tmp: Path) -> np.ndarray:
    """The confusion matrix of the run's .tflite on the test set (rows: true class)."""
    path = client.download_artifacts(run_id, "tflite_confusion_matrix.json", str(tmp))
    return np.array(json.loads(Path(path).read_text()))
