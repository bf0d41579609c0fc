"""The runs a report compares, read from MLflow into one table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fallopt.config import KIB
from fallopt.protocol import job_outcomes

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
    # The device figures: NaN for runs made before fallopt measured them, and the arena
    # also where TFLM could not run the file (tag fallopt.tflm says why).
    "tflite_size_bytes": "tflite_size_bytes",
    "tflm_arena_bytes": "tflm_arena_bytes",
    "flash_bytes": "flash_bytes",
    "macs": "macs",
    "params_total": "params_total",
}
PARAMS = [
    "prune.method",
    "prune.sparsity",
    "prune.scope",
    "prune.per_layer",
    "cluster.method",
    "cluster.clusters",
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


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Failure:
    """A combination that did not finish: what it was, why, and its run if it opened one."""

    what: str  # the job's overrides, or the run's name
    error: str
    run_id: str | None  # None when the job was refused before it opened a run
    dataset: str | None  # the run's data set; None when unknown (no run)
    config_hash: str | None

    def describe(self) -> str:
        """`job 3: quant=int8 (run 1f2e...): ValueError: ...` on one line."""
        run = f" (run {self.run_id})" if self.run_id else ""
        return one_line(f"{self.what}{run}: {self.error}")


def _failure(run: Run, what: str | None = None, error: str | None = None) -> Failure:
    tags = run.data.tags
    return Failure(
        what or run.info.run_name or label(run.data.params),
        error or tags.get("fallopt.error") or f"the run ended {run.info.status}",
        run.info.run_id,
        tags.get("fallopt.dataset"),
        tags.get("fallopt.config_hash"),
    )


def sweep_runs(
    client: MlflowClient, experiment_id: str, parent: str | None
) -> tuple[list[Run], list[Failure]]:
    """FINISHED runs of a sweep (its children and the runs it reused), else of the experiment.

    Also what failed: the sweep's failed jobs and FAILED or KILLED children, else the
    experiment's FAILED fallopt runs. A failure whose config later FINISHED among the
    returned runs is left out (it was redone), as are older failures of the same config.
    """
    failures: list[Failure] = []
    if parent is None:
        every = client.search_runs(
            [experiment_id], order_by=["attributes.start_time DESC"], max_results=5000
        )
        every = [r for r in every if "fallopt.config_hash" in r.data.tags]
        runs = [r for r in every if r.info.status == "FINISHED"]
        failures = [_failure(r) for r in every if r.info.status == "FAILED"]
    else:
        outcomes = job_outcomes(client, parent)
        children = client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'",
            order_by=["attributes.start_time DESC"],
            max_results=5000,
        )
        by_id = {r.info.run_id: r for r in children}
        for outcome in outcomes.values():
            if outcome["run_id"] and outcome["run_id"] not in by_id:
                by_id[outcome["run_id"]] = client.get_run(outcome["run_id"])
        runs = [by_id[run_id] for run_id in sorted(by_id)]
        runs = [r for r in runs if r.info.status == "FINISHED"]
        for num, outcome in sorted(outcomes.items()):
            if outcome["outcome"] != "failed":
                continue
            what = f"job {num + 1}: {outcome['overrides'] or 'defaults'}"
            run = by_id.get(outcome["run_id"] or "")
            if run is None:
                failures.append(Failure(what, outcome["error"], None, None, None))
            else:
                failures.append(_failure(run, what, outcome["error"]))
        reported = {f.run_id for f in failures}
        failures += [
            _failure(r)
            for r in children
            if r.info.status in ("FAILED", "KILLED") and r.info.run_id not in reported
        ]
    seen = {r.data.tags.get("fallopt.config_hash") for r in runs}
    kept = []
    for failure in failures:
        if failure.config_hash is None or failure.config_hash not in seen:
            kept.append(failure)
            seen.add(failure.config_hash)
    return runs, kept


def groups(table: pd.DataFrame) -> str:
    """The table's data sets and class sets with their run counts, for one line."""
    counts = table.groupby(["dataset", "classes"], sort=True).size()
    return "; ".join(
        f"{name} [{classes}]: {n} run{'s' * (n != 1)}" for (name, classes), n in counts.items()
    )


def one_dataset(
    table: pd.DataFrame, failures: list[Failure], dataset: str | None
) -> tuple[pd.DataFrame, list[Failure]]:
    """The runs (and failures) of one data set, which must have one class set.

    Runs of different data sets or class sets share no confusion matrix and no Pareto
    front: accuracy over 10 classes is not comparable with accuracy over 2.

    Raises:
        ValueError: when `dataset` names no run's data set, or the runs are of several.
    """
    if dataset is not None:
        chosen = table[table["dataset"] == dataset]
        if chosen.empty:
            raise ValueError(
                f"--dataset {dataset}: no finished run of that data set; the runs are of: "
                f"{groups(table)}"
            )
        table = chosen.reset_index(drop=True)
        failures = [f for f in failures if f.dataset in (None, dataset)]
    if table.groupby(["dataset", "classes"]).ngroups > 1:
        fix = (
            f"data set {dataset} was run with different class sets: report one sweep at a "
            "time (--parent-run)"
            if dataset
            else "pass --dataset NAME to report one"
        )
        raise ValueError(
            f"runs of different data sets or class sets cannot share a report ({groups(table)})"
            f": {fix}"
        )
    return table, failures


def per_layer(params: dict[str, Any]) -> str | None:
    """A run's `prune.per_layer` map as `{conv1: 0.3, dense1: 0.9}`, None without one.

    Logged params are flat: the map arrives as `prune.per_layer.<layer>` keys.
    """
    prefix = "prune.per_layer."
    found = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
    if not found:
        return None
    return "{" + ", ".join(f"{k}: {v}" for k, v in found.items()) + "}"


def label(params: dict[str, Any]) -> str:
    """A run's settings in a few words: `cauca_cnn x0.5 64px · constant 0.5 dense · int8`.

    The input size shows where the run's data set was resized to one: a lever on RAM.
    """
    model = params.get("model.name", "?")
    if params.get("model.width") not in (None, "1.0"):
        model += f" x{params['model.width']}"
    if params.get("dataset.image_size") not in (None, "None"):
        model += f" {params['dataset.image_size'].strip('[]').replace(', ', 'x')}px"
    prune = params.get("prune.method", "none")
    if per_layer(params):
        prune = f"{prune} {per_layer(params)}"
    elif prune != "none":
        prune = f"{prune} {params.get('prune.sparsity')} {params.get('prune.scope')}"
    if params.get("cluster.method") not in (None, "none"):
        prune += f" · {params['cluster.method']} {params.get('cluster.clusters')}"
    return f"{model} · {prune} · {params.get('quant.mode', 'none')}"


def one_class(classes: list[str], metrics: dict[str, float]) -> str:
    """The only class the run's .tflite recognises, or "" when it recognises several.

    Read from the per-class recalls of the test set: recall 0 for every class but one means
    no image of any other class is recognised, whatever the accuracy (the majority's share,
    for a model that answers the majority class). "" too when a recall is missing.
    """
    recalls = [metrics.get(f"tflite_test_recall_{name}", math.nan) for name in classes]
    if len(classes) < 2 or any(math.isnan(r) for r in recalls):
        return ""
    recognised = [name for name, r in zip(classes, recalls, strict=True) if r > 0]
    return recognised[0] if len(recognised) == 1 else ""


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: id, label, settings and the compared metrics (NaN where missing).

    `dataset` and `classes` say what the run was tested on; `one_class` names the only
    class a degenerate run recognises ("" for the others); `tflm` is what TFLM measured or
    why it did not. `flash_kb` is the run's own (its target's runtime): `select.judge`
    replaces it with a board's.
    """
    rows = []
    for run in runs:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        row: dict[str, Any] = {"run_id": run.info.run_id, "label": label(params)}
        row.update({key: params.get(key) for key in PARAMS})
        row["prune.per_layer"] = per_layer(params)
        row.update({name: metrics.get(key, np.nan) for name, key in METRICS.items()})
        row["dataset"] = tags.get("fallopt.dataset") or params.get("dataset.name", "?")
        row["classes"] = tags.get("fallopt.classes", "")
        row["one_class"] = one_class(row["classes"].split(",") if row["classes"] else [], metrics)
        row["tflm"] = tags.get("fallopt.tflm", "")
        rows.append(row)
    columns = ["run_id", "label", *PARAMS, *METRICS, "dataset", "classes", "one_class", "tflm"]
    table = pd.DataFrame(rows, columns=columns)
    for column in ["prune.sparsity", "model.width", *METRICS]:
        table[column] = pd.to_numeric(table[column])
    table["size_kb"] = table["tflite_gzip_bytes"] / 1024
    table["compression"] = 1 / table["gzip_ratio"]  # times smaller than the float32 baseline
    table["arena_kb"] = table["tflm_arena_bytes"] / KIB
    table["flash_kb"] = table["flash_bytes"] / KIB
    table["macs_m"] = table["macs"] / 1e6
    return table.sort_values(["quant.mode", "prune.sparsity", "label"]).reset_index(drop=True)


def confusion(client: MlflowClient, run_id: str, tmp: Path) -> np.ndarray:
    """The confusion matrix of the run's .tflite on the test set (rows: true class)."""
    path = client.download_artifacts(run_id, "tflite_confusion_matrix.json", str(tmp))
    return np.array(json.loads(Path(path).read_text()))
