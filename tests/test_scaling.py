"""Scaling up: Ray, an Optuna Pareto search, a stage store shared through MLflow, a server.

The launcher, search and server tests start Ray, Optuna studies and `mlflow server`; they
are marked slow (`pytest -m slow`, which CI runs after the default suite).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fallopt.cache import StageCache
from fallopt.config import TrackingConfig
from fallopt.pareto import pareto_mask
from fallopt.stage_store import MlflowStageStore
from fallopt.sweep import sweep_size

from .conftest import CONF, GRID, front_by_hand, mlflow_service, multirun
from .test_sweep import check_grid


@pytest.mark.slow
def test_the_ray_launcher_runs_the_grid_with_one_baseline_and_resumes(tmp_path):
    ray = ["hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"]
    sweep = multirun(tmp_path, *GRID, *ray)
    check_grid(sweep)
    again = multirun(tmp_path, *GRID, *ray, name="again")
    assert again.children == []
    assert "[sweep] 0 finished, 4 reused (already FINISHED), 0 failed" in again.output


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


# --- a shared tracking server on PostgreSQL --------------------------------------------------

POSTGRES_ENV = "FALLOPT_TEST_POSTGRES"  # e.g. postgresql://fallopt:fallopt@127.0.0.1:5432/postgres


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on loopback backed by a fresh PostgreSQL database; yields its URI."""
    admin = os.environ.get(POSTGRES_ENV)
    if not admin:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip(f"set {POSTGRES_ENV} to a PostgreSQL admin URI (see README, Scaling up)")
    import psycopg

    name = f"fallopt_test_{uuid.uuid4().hex[:8]}"
    conn = psycopg.connect(admin, autocommit=True)
    conn.execute(f"CREATE DATABASE {name}")
    backend = f"{admin.rsplit('/', 1)[0]}/{name}"
    command = ["server", "--backend-store-uri", backend, "--workers", "1",
               "--artifacts-destination", str(tmp_path / "server-artifacts")]  # fmt: skip
    try:
        with mlflow_service(command, tmp_path / "server.log") as uri:
            yield uri
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


@pytest.mark.slow
def test_a_sweep_against_an_mlflow_server_on_postgresql_reads_back(tmp_path, mlflow_server):
    sweep = multirun(tmp_path, "tracking=server", "prune.sparsity=0.5,0.8", uri=mlflow_server)
    assert sweep.parent.info.status == "FINISHED"
    assert len(sweep.children) == 2 and {r.info.status for r in sweep.children} == {"FINISHED"}
    achieved = sorted(r.data.metrics["sparsity_achieved"] for r in sweep.children)
    assert achieved == pytest.approx([0.5, 0.8], abs=0.01)
    # Artifacts went through the server: download one and check it is a LiteRT model.
    run_id = sweep.children[0].info.run_id
    local = sweep.client.download_artifacts(run_id, "model.tflite", str(tmp_path / "dl"))
    assert Path(local).read_bytes()[4:8] == b"TFL3"
    # The stages were published to the server, so another machine would reuse them.
    stages = sweep.client.get_experiment_by_name("fallopt.stages")
    assert len(sweep.client.search_runs([stages.experiment_id])) == 3  # 1 baseline, 2 pruned
    shutil.rmtree(tmp_path / "cache")
    again = multirun(tmp_path, "tracking=server", "prune.sparsity=0.5,0.8", "force=true",
                     uri=mlflow_server, name="again")  # fmt: skip
    assert {r.data.tags["fallopt.stage.baseline"] for r in again.children} == {"reused"}
