"""Build a report: read the runs, find the fronts, judge the board, draw, recommend, write."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from fallopt.pareto import pareto_mask
from fallopt.report import figures, render
from fallopt.report.runs import Failure, confusion, one_dataset, runs_table, sweep_runs
from fallopt.report.select import Constraints, Recommendation, judge, recommend

log = logging.getLogger(__name__)

MAX_MATRICES = 6  # confusion matrices shown side by side


@dataclass(frozen=True)
class Report:
    """What a report found and where it wrote it."""

    table: pd.DataFrame  # one row per run; pareto_size / _latency / _arena mark the fronts
    recommendation: Recommendation
    constraints: Constraints
    figures: dict[str, Path]
    html: Path
    markdown: Path
    failures: list[Failure]  # combinations that did not finish, left out of the table

    @property
    def files(self) -> list[Path]:
        """Every file the report wrote: the pages and their figures."""
        return [self.html, self.markdown, *self.figures.values()]

    @property
    def pareto_runs(self) -> set[str]:
        """Runs on the accuracy/size front."""
        return set(self.table.loc[self.table["pareto_size"], "run_id"])


def _front(table: pd.DataFrame, cost: str) -> pd.Series:
    values = table[["test_accuracy", cost]].to_numpy(dtype=float)
    return pd.Series(pareto_mask(values, [True, False]), index=table.index)


def build_report(
    client: MlflowClient,
    experiment_id: str,
    parent: str | None,
    constraints: Constraints,
    out_dir: Path,
    title: str,
    dataset: str | None = None,
) -> Report:
    """Compare the FINISHED runs of a sweep (or of the experiment) and write the report.

    `dataset` selects the runs of one data set; without it the runs must all be of one.
    Nothing is written when a ValueError is raised.

    Raises:
        ValueError: when there is no finished run to compare, when `dataset` names none,
            or when the runs are of several data sets or class sets.
    """
    runs, failures = sweep_runs(client, experiment_id, parent)
    table = runs_table(runs)
    if table.empty:
        failed = f"; {len(failures)} failed, e.g. {failures[0].describe()}" if failures else ""
        raise ValueError(f"no FINISHED fallopt run to compare{failed}")
    table, failures = one_dataset(table, failures, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    table["pareto_size"] = _front(table, "size_kb")
    table["pareto_latency"] = _front(table, "latency_ms")
    table["pareto_arena"] = _front(table, "arena_kb")  # NaN (no arena) is never optimal
    judge(table, constraints.target)
    table["label_model"] = table["model.name"] + " x" + table["model.width"].map("{:g}".format)
    figs = {
        "pareto_size": figures.pareto_png(
            table, "size_kb", "gzipped .tflite (KiB)", table["pareto_size"],
            out_dir / "pareto_accuracy_vs_size.png", "accuracy against size",
        ),
        "pareto_latency": figures.pareto_png(
            table, "latency_ms", "latency on the host CPU (ms per image, 1 thread)",
            table["pareto_latency"], out_dir / "pareto_accuracy_vs_latency.png",
            "accuracy against latency",
        ),
        "accuracy_vs_arena": figures.arena_png(
            table, table["pareto_arena"], out_dir / "accuracy_vs_arena.png", constraints.target
        ),
        "accuracy_vs_sparsity": figures.per_mode_png(
            table, "test_accuracy", "test accuracy of the .tflite (fraction correct)",
            out_dir / "accuracy_vs_sparsity.png", "accuracy against sparsity, per mode",
        ),
        "size_vs_sparsity": figures.per_mode_png(
            table, "size_kb", "gzipped .tflite (KiB)", out_dir / "size_vs_sparsity.png",
            "size against sparsity, per mode",
        ),
    }  # fmt: skip
    front = table[table["pareto_size"]].sort_values("size_kb").head(MAX_MATRICES)
    with tempfile.TemporaryDirectory() as tmp:
        matrices = {
            f"{row['label']}\nacc {row['test_accuracy']:.3f}, {row['size_kb']:.0f} KiB": confusion(
                client, row["run_id"], Path(tmp) / row["run_id"]
            )
            for _, row in front.iterrows()
        }
    classes = table["classes"].iloc[0].split(",")
    figs["confusion"] = figures.confusion_grid_png(
        matrices, classes, out_dir / "pareto_confusion_matrices.png"
    )
    choice = recommend(table, constraints)
    report = Report(
        table, choice, constraints, figs, out_dir / "report.html", out_dir / "report.md", failures
    )
    render.write_html(report, title)
    render.write_markdown(report, title)
    log.info("[report] %s, %d Pareto-optimal (accuracy vs size)", render.run_counts(report),
             int(table["pareto_size"].sum()))  # fmt: skip
    for failure in failures:
        log.warning("[report] failed, left out: %s", failure.describe())
    for _, row in table[table["one_class"] != ""].iterrows():
        log.warning("[report] run %s (%s) recognises only %s: recall 0 for every other class",
                    row["run_id"], row["label"], row["one_class"])  # fmt: skip
    return report
