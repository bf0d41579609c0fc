"""The README's main job at full size (deselected by default: `pytest -m slow`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .conftest import REPO


@pytest.mark.slow
def test_default_run_learns_but_does_not_saturate(tmp_path):
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
