"""The report's audit defects: each on a tiny store written directly with MlflowClient.

No sweep subprocess, no TensorFlow: runs carry the params, metrics, tags and confusion
matrix a fallopt run logs (see fallopt/report/runs.py), with numbers chosen by hand.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from fallopt import track
from fallopt.config import TrackingConfig
from fallopt.protocol import JOB_TAG
from fallopt.report.__main__ import main
from fallopt.report.select import Constraints, recommend

FALLS = ("no_fall", "fall")
DIGITS = tuple(str(d) for d in range(10))
FIGURES = {
    "pareto_accuracy_vs_size.png",
    "pareto_accuracy_vs_latency.png",
    "accuracy_vs_sparsity.png",
    "size_vs_sparsity.png",
    "pareto_confusion_matrices.png",
    "accuracy_vs_arena.png",
}


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


class Store:
    """A fallopt SQLite store under `root/mlruns/` and helpers to fill it as runs would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root}/mlruns/mlflow.db"
        self.experiment_id = track.connect(TrackingConfig(uri=self.uri, experiment="fallopt"))
        self.client = MlflowClient(self.uri)

    def sweep(self) -> str:
        """A sweep's parent run, FINISHED."""
        tags = {"fallopt.role": "sweep", "fallopt.sweep_dir": str(self.root / "sweep")}
        run = self.client.create_run(self.experiment_id, run_name="sweep", tags=tags)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def job(self, parent: str, num: int, outcome: str, run_id: str | None, error: str = "") -> None:
        """Record a job's outcome on the parent as `fallopt.job.record` does."""
        overrides = f"prune.sparsity=0.{num} quant=int8"
        value = {"outcome": outcome, "run_id": run_id, "overrides": overrides, "error": error}
        self.client.set_tag(parent, f"{JOB_TAG}{num:05d}", json.dumps(value))

    def run(
        self,
        parent: str | None = None,
        *,
        sparsity: float = 0.0,
        mode: str = "none",
        accuracy: float = 0.9,
        kib: float = 100.0,
        recalls: dict[str, float] | None = None,
        dataset: str = "synthetic_falls",
        classes: tuple[str, ...] = FALLS,
        status: str = "FINISHED",
        error: str | None = None,
        config_hash: str | None = None,
    ) -> str:
        """A fallopt run with the report's params, metrics, tags and confusion matrix."""
        tags = {
            "fallopt.config_hash": config_hash or uuid.uuid4().hex[:12],
            "fallopt.dataset": dataset,
            "fallopt.model": "cauca_cnn",
            "fallopt.classes": ",".join(classes),
        }
        if parent:
            tags["mlflow.parentRunId"] = parent
        if error:
            tags["fallopt.error"] = error
        name = f"dataset={dataset} prune.sparsity={sparsity} quant={mode}"
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        params = {
            "dataset.name": dataset,
            "model.name": "cauca_cnn",
            "model.width": "1.0",
            "prune.method": "constant" if sparsity else "none",
            "prune.sparsity": str(sparsity),
            "prune.scope": "all",
            "quant.mode": mode,
        }
        metrics: dict[str, float] = {}
        if status == "FINISHED":
            recalls = recalls or dict.fromkeys(classes, accuracy)
            metrics = {
                "tflite_test_accuracy": accuracy,
                "tflite_gzip_bytes": kib * 1024,
                "tflite_gzip_ratio_to_baseline": kib / 1000,
                "tflite_latency_ms": kib / 100,
                "tflite_disagreement": 0.0,
                "val_accuracy": accuracy,
                "sparsity_achieved": sparsity,
                **{f"tflite_test_recall_{c}": r for c, r in recalls.items()},
            }
            if classes == FALLS:
                metrics["tflite_test_fall_recall"] = recalls["fall"]
                metrics["tflite_test_false_alarm_rate"] = 1 - recalls["no_fall"]
            matrix = [[10 * (i == j) for j in range(len(classes))] for i in range(len(classes))]
            self.client.log_text(run_id, json.dumps(matrix), "tflite_confusion_matrix.json")
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        self.client.set_terminated(run_id, status)
        return run_id

    def main(self, *args: str) -> int:
        """`python -m fallopt.report --tracking-uri <this store> ARGS`."""
        return main(["--tracking-uri", self.uri, *args])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def _one_error(caplog: pytest.LogCaptureFixture) -> str:
    """The single ERROR line logged, which must be one line."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in caplog.text
    return errors[0]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- 12: the output folder and what is logged to the parent run ---------------------------


def test_an_output_folder_holding_the_store_is_refused_and_nothing_is_written(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    parent = store.sweep()
    store.run(parent, sparsity=0.0)
    store.run(parent, sparsity=0.5, kib=50, accuracy=0.85)
    monkeypatch.chdir(store.root)
    before = _files(store.root)
    for out in (".", "mlruns", str(store.root.parent)):
        caplog.clear()
        assert main(["--tracking-uri", "sqlite:///mlruns/mlflow.db", "--out", out]) == 2
        line = _one_error(caplog)
        assert f"--out {out}:" in line and "tracking store" in line
    assert _files(store.root) == before
    assert store.client.list_artifacts(parent) == []


def test_only_the_reports_own_files_are_logged_to_the_parent(store: Store, tmp_path: Path):
    parent = store.sweep()
    store.run(parent, sparsity=0.0)
    store.run(parent, sparsity=0.5, kib=50, accuracy=0.85)
    out = tmp_path / "shared-folder"
    (out / "other").mkdir(parents=True)
    (out / "notes.txt").write_text("not part of the report")
    (out / "other" / "data.bin").write_bytes(b"\0" * 10)
    assert store.main("--out", str(out)) == 0
    logged = {a.path for a in store.client.list_artifacts(parent, "report")}
    assert logged == {f"report/{name}" for name in {"report.html", "report.md", *FIGURES}}


# --- 13: runs of several data sets ------------------------------------------------------


def test_runs_of_two_data_sets_are_refused_and_dataset_selects_one(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    parent = store.sweep()
    for sparsity in (0.0, 0.5):
        store.run(parent, sparsity=sparsity, kib=100 - 50 * sparsity)
    digits = [
        store.run(parent, sparsity=s, kib=80 - 40 * s, dataset="digits", classes=DIGITS)
        for s in (0.0, 0.5, 0.8)
    ]
    out = tmp_path / "mixed"
    assert store.main("--out", str(out)) == 2
    line = _one_error(caplog)
    assert "digits [0,1,2,3,4,5,6,7,8,9]: 3 runs" in line
    assert "synthetic_falls [no_fall,fall]: 2 runs" in line
    assert "--dataset NAME" in line
    assert not out.exists()

    caplog.clear()
    assert store.main("--out", str(out), "--dataset", "nosuch") == 2
    line = _one_error(caplog)
    assert "--dataset nosuch: no finished run of that data set" in line and "digits" in line
    assert not out.exists()

    caplog.clear()
    assert store.main("--out", str(out), "--dataset", "digits") == 0
    page = (out / "report.html").read_text()
    assert page.count("<tr") == len(digits) + 1 and all(r in page for r in digits)
    assert "All runs (3 finished;" in page
    logged = {a.path for a in store.client.list_artifacts(parent, "report/digits")}
    assert "report/digits/report.html" in logged
    assert store.client.get_run(parent).data.tags["fallopt.recommended_run_id.digits"] in digits


# --- 14: a report only reads the store ---------------------------------------------------


def test_a_mistyped_parent_run_or_experiment_is_one_line_and_creates_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
):
    parent = store.sweep()
    child = store.run(parent)
    experiments = [e.name for e in store.client.search_experiments()]
    before = _files(store.root)
    for args, culprit in [
        (["--parent-run", "0123456789abcdef"], "--parent-run 0123456789abcdef: no such run"),
        (["--parent-run", child], f"--parent-run {child} is not a sweep's parent run"),
        (["--experiment", "nosuch"], "--experiment 'nosuch': no such experiment"),
        (["--experiment", "nosuch", "--all-runs"], "--experiment 'nosuch': no such experiment"),
    ]:
        caplog.clear()
        assert store.main(*args, "--out", str(store.root / "out")) == 2, args
        assert culprit in _one_error(caplog)
    assert [e.name for e in store.client.search_experiments()] == experiments
    assert _files(store.root) == before


# --- 15: failed runs are listed, not dropped ---------------------------------------------


def test_a_sweeps_failed_jobs_and_runs_are_listed_in_the_report_and_the_log(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    parent = store.sweep()
    for num, sparsity in enumerate((0.0, 0.5, 0.8)):
        store.job(
            parent, num, "finished", store.run(parent, sparsity=sparsity, kib=90 - 50 * sparsity)
        )
    failed = store.run(parent, mode="int8", status="FAILED", error="ValueError: int8 went wrong")
    store.job(parent, 3, "failed", failed, "ValueError: int8 went wrong")
    store.job(parent, 4, "failed", None, "ConfigError: quant.bits=3 is invalid")
    killed = store.run(parent, mode="float16", status="KILLED")  # Ctrl-C: no job outcome
    out = tmp_path / "report"
    assert store.main("--out", str(out)) == 0
    page, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()
    for text in (page, markdown):
        assert "All runs (3 finished; 3 failed, listed below" in text
        assert "ValueError: int8 went wrong" in text and failed in text
        assert "job 5: prune.sparsity=0.4 quant=int8" in text
        assert "ConfigError: quant.bits=3 is invalid" in text
        assert killed in text and "the run ended KILLED" in text
    assert "3 finished; 3 failed" in caplog.text
    assert "job 4: prune.sparsity=0.3 quant=int8 (run" in caplog.text
    assert "ConfigError: quant.bits=3 is invalid" in caplog.text


def test_all_runs_lists_failed_runs_except_those_redone(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    store.run(sparsity=0.0, config_hash="aaa")
    store.run(sparsity=0.5, kib=60, status="FAILED", error="old failure", config_hash="bbb")
    store.run(sparsity=0.5, kib=60, config_hash="bbb")  # the same config, redone
    lost = store.run(sparsity=0.8, kib=30, status="FAILED", error="OOM", config_hash="ccc")
    out = tmp_path / "all"
    assert store.main("--all-runs", "--out", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "All runs (2 finished; 1 failed, listed below" in page
    assert lost in page and "OOM" in page and "old failure" not in page
    assert "OOM" in caplog.text


# --- 16: a model that recognises one class only ------------------------------------------


def test_a_run_that_recognises_one_class_is_flagged_and_not_recommended_silently(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    parent = store.sweep()
    majority = store.run(parent, sparsity=0.8, kib=20, accuracy=0.80,
                         recalls={"no_fall": 1.0, "fall": 0.0})  # fmt: skip
    useful = store.run(parent, sparsity=0.0, kib=100, accuracy=0.75,
                       recalls={"no_fall": 0.7, "fall": 0.8})  # fmt: skip
    out = tmp_path / "r"
    assert store.main("--out", str(out)) == 0
    assert f"Recommended: cauca_cnn · none · none (run {useful})" in caplog.text
    assert "1 more accurate run(s) recognise one class only" in caplog.text
    assert f"run {majority} (cauca_cnn · constant 0.8 all · none) recognises only no_fall" in (
        caplog.text
    )
    page = (out / "report.html").read_text()
    assert "recognises one class only" in page
    assert '<td data-v="no_fall">no_fall</td><td data-v="True">yes</td>' in page

    caplog.clear()  # only the degenerate run fits: recommended, but after a warning
    assert store.main("--out", str(tmp_path / "r2"), "--max-size-kb", "50") == 0
    message = next(r.getMessage() for r in caplog.records if "Recommended" in r.getMessage())
    assert message.startswith("[report] WARNING: every run meeting the constraints")
    assert f"(run {majority})" in message


def test_recommend_passes_over_a_one_class_run_on_a_table_by_hand():
    table = pd.DataFrame(
        {
            "run_id": ["const", "ok", "small"],
            "label": ["majority", "ok", "small"],
            "test_accuracy": [0.90, 0.85, 0.80],
            "fall_recall": [0.0, 0.8, 0.7],
            "size_kb": [10.0, 300.0, 90.0],
            "latency_ms": [0.5, 1.0, 0.5],
            "one_class": ["no_fall", "", ""],
        }
    )
    assert recommend(table, Constraints()).run_id == "ok"
    assert recommend(table, Constraints(max_size_kb=100)).run_id == "small"
    only = recommend(table, Constraints(max_size_kb=50))
    assert only.run_id == "const" and only.message.startswith("WARNING:")
