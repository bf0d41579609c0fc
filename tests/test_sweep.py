"""A multirun is one MLflow parent with its jobs as children, and the baseline trains once."""

from __future__ import annotations

import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from .conftest import CONF, REPO, TINY


def _multirun(tmp_path, *overrides: str):
    """Run `python -m fallopt.run -m` on tiny data; return the output, parent and children."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = [*overrides, *TINY, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(
        [sys.executable, "-m", "fallopt.run", "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fallopt").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`fallopt.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
    )
    return proc, client, parent, children


def test_sparsity_sweep_records_parent_children_plots_and_trains_the_baseline_once(tmp_path):
    proc, client, parent, children = _multirun(tmp_path, "prune.sparsity=0.1,0.5,0.8")
    children.sort(key=lambda r: float(r.data.params["prune.sparsity"]))
    assert [r.info.status for r in children] == ["FINISHED"] * 3

    names = [r.info.run_name for r in children]
    assert [n.split()[0] for n in names] == [f"prune.sparsity={s}" for s in (0.1, 0.5, 0.8)]
    assert not any("tracking" in n for n in names)
    targets = [float(r.data.params["prune.sparsity"]) for r in children]
    achieved = [r.data.metrics["sparsity_achieved"] for r in children]
    assert targets == [0.1, 0.5, 0.8]
    assert all(abs(a - t) <= 0.01 for a, t in zip(achieved, targets, strict=True))
    gzip_sizes = [r.data.metrics["keras_gzip_bytes"] for r in children]
    assert gzip_sizes[0] > gzip_sizes[1] > gzip_sizes[2]
    assert all(r.data.metrics["gzip_ratio_to_baseline"] < 1 for r in children)
    baseline_stages = sorted(r.data.tags["fallopt.stage.baseline"] for r in children)
    assert baseline_stages == ["reused", "reused", "trained"]
    assert len({r.data.tags["fallopt.baseline_key"] for r in children}) == 1
    # The baseline's own metrics are the same in every child: pruning did not touch it.
    assert len({r.data.metrics["baseline_test_accuracy"] for r in children}) == 1

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.csv", "accuracy_vs_sparsity.png", "gzip_size_vs_sparsity.png"} <= artifacts
    assert parent.data.tags["fallopt.best_run_id"] in {r.info.run_id for r in children}
    assert "[sweep] best by val_accuracy" in proc.stdout + proc.stderr


def test_seed_lab_sweeps_the_labs_ten_sparsities_on_dense_layers():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=seed_lab"], return_hydra_config=True)
    sparsities = cfg.hydra.sweeper.params["prune.sparsity"].split(",")
    assert [float(s) for s in sparsities] == [round(0.1 * i, 1) for i in range(10)]
    assert cfg.prune.method == "constant" and cfg.prune.scope == "dense"
    assert cfg.prune.fine_tune_epochs == 2


def test_prune_by_quant_grid_trains_each_model_once(tmp_path):
    grid = ["prune.sparsity=0.5,0.8", "quant=dynamic,int8", "quant.representative_samples=20"]
    *_, children = _multirun(tmp_path, *grid)
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    tags = [r.data.tags for r in children]
    assert sorted(t["fallopt.stage.baseline"] for t in tags).count("trained") == 1
    assert sorted(t["fallopt.stage.prune"] for t in tags).count("trained") == 2
    assert sorted(t["fallopt.stage.quant"] for t in tags) == ["dynamic", "dynamic", "int8", "int8"]
