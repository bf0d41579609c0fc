"""The README's main job at full size (deselected by default: `pytest -m slow`), and its
baseline as int8 on TFLM (trained once for both: 3 minutes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from fallopt import tflm, track
from fallopt.config import validate
from fallopt.identity import config_hash
from fallopt.task import run_experiment

from .conftest import REPO


@pytest.mark.slow
def test_default_run_learns_but_does_not_saturate_and_its_int8_file_agrees_on_tflm(
    tmp_path, compose_cfg
):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = subprocess.run(
        [sys.executable, "-m", "fallopt.run", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    m = run.data.metrics
    assert m["params_total"] == 342_178
    assert (m["n_train"], m["n_val"], m["n_test"]) == (1600, 400, 500)
    # Learnable, yet hard enough that compression effects stay visible (measured: 0.880).
    assert 0.75 < m["test_accuracy"] < 0.97
    assert "deploy" in {a.path for a in client.list_artifacts(run.info.run_id)}  # a single run

    # The same trained baseline (from this test's stage cache) as int8, on TFLM: every test
    # image gets the class LiteRT's built-in kernels give it.
    if tflm.unavailable() is not None:
        pytest.skip("tflite-micro absent: the TFLM half of this test")
    cfg = compose_cfg("prune=none", "quant=int8", "target.tflm_samples=500",
                      f"tracking.uri={uri}")  # fmt: skip
    typed = validate(cfg)
    metrics = run_experiment(typed, config_hash(typed), tmp_path / "int8")
    last = client.get_run(track.last_run_id()).data.tags
    assert last["fallopt.stage.baseline"] == "reused" and last["fallopt.baseline_from"] == "cache"
    assert metrics["tflm_samples_used"] == 500  # the whole test split
    assert metrics["tflm_agreement"] >= 0.99
    assert metrics["tflm_test_accuracy"] == pytest.approx(metrics["tflite_test_accuracy"], abs=0.01)
