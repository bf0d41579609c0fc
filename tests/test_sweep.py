"""A multirun is one MLflow parent with its jobs as children, and the baseline trains once."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir

from .conftest import CONF, Sweep, multirun


@pytest.mark.slow
def test_sparsity_sweep_records_parent_children_plots_and_trains_the_baseline_once(tmp_path):
    sweep = multirun(tmp_path, "prune.sparsity=0.1,0.5,0.8")
    client, parent, children = sweep.client, sweep.parent, sweep.children
    assert parent.info.status == "FINISHED"
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
    assert "[sweep] best by val_accuracy" in sweep.output
    assert "[sweep] 3 finished, 0 reused (already FINISHED), 0 failed" in sweep.output
    # Progress: which job of how many, and once one has finished, the time left.
    assert "[job 2/3] prune.sparsity=0.5" in sweep.output
    assert "[job 1/3] done in" in sweep.output and "1 of 3 jobs done, about" in sweep.output


def test_seed_lab_sweeps_the_labs_ten_sparsities_on_dense_layers():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=seed_lab"], return_hydra_config=True)
    sparsities = cfg.hydra.sweeper.params["prune.sparsity"].split(",")
    assert [float(s) for s in sparsities] == [round(0.1 * i, 1) for i in range(10)]
    assert cfg.prune.method == "constant" and cfg.prune.scope == "dense"
    assert cfg.prune.fine_tune_epochs == 2


def check_grid(sweep: Sweep) -> None:
    """4 FINISHED children of one parent; 1 baseline and 2 prune trainings; no lock errors."""
    assert sweep.parent.info.status == "FINISHED"
    children = sweep.children
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    tags = [r.data.tags for r in children]
    assert sorted(t["fallopt.stage.baseline"] for t in tags).count("trained") == 1
    assert sorted(t["fallopt.stage.prune"] for t in tags).count("trained") == 2
    assert sorted(t["fallopt.stage.quant"] for t in tags) == ["dynamic", "dynamic", "int8", "int8"]
    assert "database is locked" not in sweep.output
    for run in children:  # a sweep's jobs write no C++ bundle unless asked (deploy=true)
        assert "deploy" not in {a.path for a in sweep.client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # the joblib grid sweep: 50 s (the sparsity sweep above runs in-suite)
def test_prune_by_quant_grid_in_two_parallel_jobs_trains_each_model_once(grid_sweep):
    _, sweep = grid_sweep
    check_grid(sweep)
    # Two jobs share the cores: each caps TensorFlow's threads.
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert {r.data.tags["fallopt.threads"] for r in sweep.children} == {threads}
