"""The report: Pareto set, constraint selection, registry, and both UIs in a real browser."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fallopt.report.__main__ import EXIT_NO_MODEL, main
from fallopt.report.select import Constraints, recommend

from .conftest import REPO, Sweep, front_by_hand, mlflow_service

ARTIFACTS = Path(os.environ.get("FALLOPT_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def study(grid_sweep) -> tuple[Path, Sweep]:
    """The shared tracked sweep of 4 tiny runs: 2 sparsities x 2 quantization modes."""
    return grid_sweep


def _uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlruns/mlflow.db"


@pytest.mark.slow  # a subprocess sweep (60 s); test_report_audit checks the report on stores
def test_the_report_finds_the_pareto_set_and_recommends_within_budget(study, caplog):
    tmp, sweep = study
    out = tmp / "report"
    assert main(["--tracking-uri", _uri(tmp), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    front = front_by_hand(sweep.children, "tflite_test_accuracy", "tflite_gzip_bytes")
    assert front and all(run in html for run in front)
    assert html.count('<tr class="pareto">') == len(front)
    assert (out / "report.md").read_text().count("| yes |") >= len(front)
    for name in ("pareto_accuracy_vs_size", "pareto_accuracy_vs_latency", "accuracy_vs_sparsity",
                 "size_vs_sparsity", "pareto_confusion_matrices"):  # fmt: skip
        assert Image.open(out / f"{name}.png").size[0] > 300
    # Logged to the sweep's parent run.
    logged = {a.path for a in sweep.client.list_artifacts(sweep.parent.info.run_id, "report")}
    assert "report/report.html" in logged

    # A size budget: the most accurate run within it, computed from the metrics by hand.
    sizes = {r.info.run_id: r.data.metrics["tflite_gzip_bytes"] / 1024 for r in sweep.children}
    budget = sorted(sizes.values())[1] + 0.01  # admits the two smallest
    within = [r for r in sweep.children if sizes[r.info.run_id] <= budget]
    best = max(within, key=lambda r: (r.data.metrics["tflite_test_accuracy"],
                                      -sizes[r.info.run_id]))  # fmt: skip
    caplog.clear()
    args = ["--tracking-uri", _uri(tmp), "--out", str(tmp / "r2"), "--max-size-kb", str(budget)]
    assert main([*args, "--register", "fall-detector"]) == 0
    assert f"(run {best.info.run_id})" in caplog.text
    versions = sweep.client.search_model_versions("name = 'fall-detector'")
    assert [v.run_id for v in versions] == [best.info.run_id]
    assert versions[0].source.endswith("model.tflite")
    keras = sweep.client.search_model_versions("name = 'fall-detector-keras'")
    assert keras[0].source.endswith("model/model.keras")


@pytest.mark.slow  # shares that sweep
def test_the_report_says_which_constraint_binds_when_no_run_fits(study, caplog):
    tmp, _ = study
    args = ["--tracking-uri", _uri(tmp), "--out", str(tmp / "r3"), "--max-size-kb", "0.01",
            "--min-fall-recall", "0"]  # fmt: skip
    assert main(args) == EXIT_NO_MODEL
    assert "No run meets all constraints" in caplog.text
    assert "relaxing --max-size-kb would admit a run" in caplog.text
    assert "No run meets" in (tmp / "r3" / "report.html").read_text()


def test_recommend_on_a_table_by_hand():
    table = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "label": ["big", "mid", "small"],
            "test_accuracy": [0.95, 0.93, 0.80],
            "fall_recall": [0.96, 0.85, 0.90],
            "size_kb": [1200.0, 300.0, 90.0],
            "latency_ms": [2.0, 1.0, 0.5],
        }
    )
    assert recommend(table, Constraints()).run_id == "a"
    assert recommend(table, Constraints(max_size_kb=400)).run_id == "b"
    assert recommend(table, Constraints(max_size_kb=400, min_fall_recall=0.9)).run_id == "c"
    none = recommend(table, Constraints(max_size_kb=100, min_fall_recall=0.95))
    assert none.run_id is None
    assert "--max-size-kb 100: 1 of 3 runs" in none.message
    assert "relaxing --max-size-kb or --min-fall-recall would admit a run" in none.message
    tight = recommend(table, Constraints(max_size_kb=10, max_latency_ms=0.1, min_fall_recall=1))
    assert "relax several" in tight.message


def test_a_missing_store_or_an_experiment_without_sweeps_is_one_clear_line(tmp_path, caplog):
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no such database" in caplog.text
    (tmp_path / "empty").mkdir()
    uri = f"sqlite:///{tmp_path}/empty/mlflow.db"
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("fallopt")
    assert main(["--tracking-uri", uri]) == 2
    assert "has no sweep" in caplog.text


# --- in a real browser (slow: mlflow ui takes ~20 s to start; CI runs `pytest -m slow`) ----

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _chromium(tmp: Path, url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot if asked)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=20000"]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*args, "--window-size=1400,1000", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120, check=True)  # fmt: skip
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return dom.stdout


def _not_blank(png: Path) -> bool:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    return pixels.std() > 10


@pytest.fixture(scope="module")
def mlflow_ui(study):
    tmp, _ = study
    with mlflow_service(["ui", "--backend-store-uri", _uri(tmp)], tmp / "ui.log") as url:
        yield url


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_runs_metrics_and_confusion_matrix(study, mlflow_ui):
    tmp, sweep = study
    experiment = f"{mlflow_ui}/#/experiments/{sweep.experiment_id}"
    # The runs list nests the children under their sweep's parent run.
    runs_page = _chromium(tmp, f"{experiment}/runs", ARTIFACTS / "mlflow_runs.png")
    assert sweep.parent.info.run_name in runs_page
    assert f"<strong>{len(sweep.children) + 1}</strong> matching runs" in runs_page
    # The compare page lists every run by name.
    query = urllib.parse.urlencode(
        {"runs": json.dumps([r.info.run_id for r in sweep.children]),
         "experiments": json.dumps([sweep.experiment_id])}
    )  # fmt: skip
    compare = _chromium(
        tmp, f"{mlflow_ui}/#/compare-runs?{query}", ARTIFACTS / "mlflow_compare.png"
    )
    for run in sweep.children:
        assert run.info.run_name.split(" dataset.")[0] in compare
    # A run's page shows its metrics with their values.
    run = sweep.children[0]
    run_page = _chromium(tmp, f"{experiment}/runs/{run.info.run_id}", ARTIFACTS / "mlflow_run.png")
    for metric in ("tflite_test_accuracy", "tflite_gzip_bytes", "sparsity_achieved"):
        assert metric in run_page
    assert f">{run.data.metrics['tflite_gzip_bytes']:.0f}<" in run_page
    # The confusion matrix artifact is displayed as an image.
    artifact = f"{experiment}/runs/{run.info.run_id}/artifacts/confusion_matrix.png"
    shot = ARTIFACTS / "mlflow_confusion_matrix.png"
    artifact_page = _chromium(tmp, artifact, shot)
    assert "confusion_matrix.png" in artifact_page and "<img" in artifact_page
    assert _not_blank(shot)


@pytest.mark.slow
def test_the_html_report_renders_its_pareto_plot_and_table(study):
    tmp, sweep = study
    out = tmp / "browser-report"
    assert main(["--tracking-uri", _uri(tmp), "--out", str(out)]) == 0
    shot = ARTIFACTS / "report.png"
    dom = _chromium(tmp, (out / "report.html").as_uri(), shot)
    assert 'alt="Pareto front: accuracy against gzipped size"' in dom
    assert dom.count("data:image/png;base64,") == 6  # one per figure, the arena's included
    assert dom.count("<tr") == len(sweep.children) + 1  # header + one row per run
    assert _not_blank(shot)
