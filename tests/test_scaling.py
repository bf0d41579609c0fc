"""Scaling up: Ray, an Optuna Pareto search, a stage store shared through MLflow, a server.

The launcher, search and server tests start Ray, Optuna studies and `mlflow server`; they
are marked slow (`pytest -m slow`, which CI runs after the default suite).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from fallopt.cache import StageCache
from fallopt.config import TrackingConfig
from fallopt.pareto import pareto_mask
from fallopt.protocol import job_outcomes
from fallopt.stage_store import MlflowStageStore
from fallopt.sweep import sweep_size

from .conftest import CONF, GRID, REPO, TINY, front_by_hand, multirun
from .test_stage_store import check_one_builder
from .test_sweep import check_grid


@pytest.mark.slow  # resuming on Ray: test_ray_cluster.py
def test_the_ray_launcher_runs_the_grid_on_a_local_instance_with_one_baseline(tmp_path):
    ray = ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"]
    sweep = multirun(tmp_path, *GRID, *ray)
    check_grid(sweep)
    assert "on a local Ray instance" in sweep.output
    assert {r.data.tags["fallopt.ray_node"] for r in sweep.children} != {""}
    # keep_going=false: a job's bad value stops the sweep with its exit code, as without Ray.
    stop = multirun(tmp_path, "prune.sparsity=1.5,0.5", "keep_going=false", *ray, name="stop",
                    returncode=2)  # fmt: skip
    assert "prune.sparsity=1.5 is invalid: must satisfy 0 <= sparsity < 1" in stop.output


@pytest.mark.slow
def test_an_optuna_search_tags_its_pareto_set(tmp_path):
    search = [
        "hparams_search=pareto",
        "hydra.sweeper.n_trials=4",
        "quant.representative_samples=20",
    ]
    sweep = multirun(tmp_path, *search)
    runs = sweep.children
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    by_hand = front_by_hand(runs, "val_accuracy", "tflite_gzip_bytes")
    tagged = {r.info.run_id for r in runs if r.data.tags.get("fallopt.pareto") == "true"}
    assert tagged == by_hand and tagged
    assert sweep.parent.data.tags["fallopt.pareto_runs"] == ",".join(sorted(by_hand))
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()  # Optuna's own record


def test_pareto_mask_keeps_non_dominated_rows_and_ties():
    values = np.array([[0.9, 100], [0.8, 50], [0.85, 120], [0.9, 100], [np.nan, 1]])
    assert pareto_mask(values, [True, False]).tolist() == [True, True, False, True, False]


@pytest.mark.parametrize(
    ("composed", "swept", "size"),
    [
        ([], ["prune.sparsity=0.1,0.5,0.8"], 3),
        ([], ["prune.sparsity=0.5,0.8", "quant=none,dynamic,int8"], 6),
        (["+experiment=seed_lab"], [], 10),
        (["hparams_search=pareto", "hydra.sweeper.n_trials=7"], [], 7),
    ],
)
def test_sweep_size_counts_the_jobs_for_the_progress_line(composed, swept, size):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=composed, return_hydra_config=True)
    cfg.hydra.overrides.task = [o for o in composed if not o.startswith("hydra.")] + swept
    assert sweep_size(cfg) == size


def test_stages_are_shared_through_mlflow_between_machines_without_a_common_disk(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", share_stages=True)
    calls = []

    def build(out: Path) -> dict:
        calls.append(out)
        (out / "model.keras").write_bytes(b"weights" * 100)
        return {"history": {"accuracy": [0.5]}}

    here = StageCache(tmp_path / "machine_a", MlflowStageStore(tracking))
    there = StageCache(tmp_path / "machine_b", MlflowStageStore(tracking))
    assert there.status("baseline", "k1") == "missing"
    built, reused = here.get_or_build("baseline", "k1", build)
    assert not reused and len(calls) == 1
    assert there.status("baseline", "k1") == "shared"
    fetched, reused = there.get_or_build("baseline", "k1", build)
    assert reused and len(calls) == 1  # not trained again
    assert fetched.path.parent == tmp_path / "machine_b"
    assert (fetched.path / "model.keras").read_bytes() == (built.path / "model.keras").read_bytes()
    assert fetched.meta == built.meta
    assert there.status("baseline", "k1") == "cached"


# --- a shared tracking server on PostgreSQL (conftest.mlflow_server) --------------------------


@pytest.mark.slow
def test_four_workers_at_once_against_an_mlflow_server_on_postgresql(tmp_path, mlflow_server):
    """4 parallel jobs write the parent's records, the stage store and resume at once."""
    four = [*GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "tracking=server"]
    sweep = multirun(tmp_path, *four, uri=mlflow_server)
    check_grid(sweep)  # 4 FINISHED under one parent; 1 baseline and 2 pruned models trained
    records = job_outcomes(sweep.client, sweep.parent.info.run_id)
    assert sorted(records) == [0, 1, 2, 3]
    assert {r["run_id"] for r in records.values()} == {r.info.run_id for r in sweep.children}
    # Artifacts went through the server: download one and check it is a LiteRT model.
    run_id = sweep.children[0].info.run_id
    local = sweep.client.download_artifacts(run_id, "model.tflite", str(tmp_path / "dl"))
    assert Path(local).read_bytes()[4:8] == b"TFL3"
    # The stages were published to the server once each, so another machine reuses them.
    stages = sweep.client.get_experiment_by_name("fallopt.stages")
    published = sweep.client.search_runs([stages.experiment_id])
    assert sorted(r.info.status for r in published) == ["FINISHED"] * 3  # 1 baseline, 2 pruned
    again = multirun(tmp_path, *four, uri=mlflow_server, name="again")
    assert again.children == [] and "0 finished, 4 reused" in again.output
    shutil.rmtree(tmp_path / "cache")  # another machine: nothing on its disk
    again = multirun(tmp_path, *four, "force=true", uri=mlflow_server, name="forced")
    assert {r.data.tags["fallopt.baseline_from"] for r in again.children} <= {"store", "cache"}
    assert "store" in {r.data.tags["fallopt.baseline_from"] for r in again.children}
    # 4 machines at once, each its own disk, building one stage: one builds, 3 fetch.
    check_one_builder(tmp_path / "machines", mlflow_server)


@pytest.mark.slow
def test_a_tracking_server_gone_mid_sweep_stops_it_with_one_line_and_resume_redoes_the_rest(
    tmp_path,
):
    """The server dies while job 2 of 3 runs; back at the same address, the sweep resumes."""
    import local_cluster

    backend, port = f"sqlite:///{tmp_path}/server.db", local_cluster.free_port()
    grid = ["prune.sparsity=0.3,0.5,0.8", "tracking=server", *TINY]
    lines: list[str] = []
    try:
        with local_cluster.mlflow_server(backend, tmp_path / "server", port=port) as uri:
            sweep = subprocess.Popen(
                [sys.executable, "-m", "fallopt.run", "-m", *grid, f"tracking.uri={uri}",
                 f"hydra.sweep.dir={tmp_path}/sweep"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
            )  # fmt: skip
            for line in sweep.stdout:
                lines.append(line)
                if "[job 2/3]" in line:  # job 2 has started: the server goes away under it,
                    sweep.send_signal(signal.SIGSTOP)  # held still meanwhile (tiny jobs are quick)
                    break
    finally:
        sweep.send_signal(signal.SIGCONT)
    lines += sweep.stdout.readlines()
    output = "".join(lines)
    assert sweep.wait(timeout=300) == 2, output[-4000:]
    assert "no tracking server answers" in output and "[sweep] no summary" in output
    with local_cluster.mlflow_server(backend, tmp_path / "server", port=port) as uri:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("fallopt").experiment_id
        before = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
        assert "FINISHED" in before.values()  # job 1 ended before the server went
        assert set(before.values()) <= {"FINISHED", "RUNNING", "FAILED"}
        again = multirun(tmp_path, *grid[:2], uri=uri, name="again")
        assert again.parent.info.status == "FINISHED"
        runs = again.runs()
        by_sparsity = {}
        for run in runs:
            by_sparsity.setdefault(run.data.params["prune.sparsity"], []).append(run)
        # Each combination FINISHED exactly once; what the dead server left RUNNING is KILLED.
        for sparsity, tried in by_sparsity.items():
            assert [r.info.status for r in tried].count("FINISHED") == 1, sparsity
        assert {r.info.status for r in runs if r.info.status != "FINISHED"} <= {"KILLED", "FAILED"}
        assert "2 finished, 1 reused" in again.output
