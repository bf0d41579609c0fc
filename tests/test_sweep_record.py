"""A sweep's record on its parent run survives what real sweeps meet: long errors, a parent
deleted in the UI, a summary that fails, objectives of every kind (docs/faults.md).

In-process and on a tiny store: the parent and its jobs' records are written as a sweep
writes them, without training anything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fallopt import job, protocol, track
from fallopt.config import OBJECTIVES, TrackingConfig
from fallopt.sweep import SweepRecord
from fallopt.sweep_summary import summarize


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    experiment = track.connect(TrackingConfig(uri=uri))
    return MlflowClient(uri), experiment


def _finished_child(client: MlflowClient, experiment: str, parent: str, **metrics: float) -> str:
    """A FINISHED run with the params and metrics a job logs."""
    run = client.create_run(experiment, tags={"mlflow.parentRunId": parent})
    params = {"prune.method": "constant", "prune.sparsity": "0.5", "prune.scope": "dense",
              "model.name": "m", "model.width": "1.0", "quant.mode": "none"}  # fmt: skip
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    values = {name: 0.5 for name in OBJECTIVES} | {"train_accuracy": 0.6} | metrics
    for name, value in values.items():
        client.log_metric(run.info.run_id, name, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _sweep(client: MlflowClient, experiment: str, tmp_path: Path, objectives: list[str]):
    """A parent run and a SweepRecord holding it, as `on_multirun_start` leaves them."""
    record = SweepRecord()
    parent = client.create_run(experiment, tags={"fallopt.role": "sweep"}).info.run_id
    record._parent, record._client, record._out_dir = parent, client, tmp_path / "sweep"
    record._total, record._objectives = 1, objectives
    return record, parent


def test_every_accepted_objective_is_summarizable(store, tmp_path):
    client, experiment = store
    record, parent = _sweep(client, experiment, tmp_path, list(OBJECTIVES))
    child = _finished_child(client, experiment, parent, tflite_test_fall_recall=0.8)
    job.record(parent, job.Job(0, 1, "seed=0", None, 1), "finished", child)

    record._close("FINISHED")

    assert not record._failed
    assert client.get_run(parent).info.status == "FINISHED"
    table = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert all(name in table[0].split(",") for name in OBJECTIVES)
    assert client.get_run(child).data.tags["fallopt.pareto"] == "true"


def test_a_summary_that_fails_ends_the_parent_failed_with_the_error(
    store, tmp_path, monkeypatch, caplog
):
    client, experiment = store
    record, parent = _sweep(client, experiment, tmp_path, ["val_accuracy"])

    def broken(*args, **kwargs):
        raise KeyError("a column the summary lacks")

    monkeypatch.setattr("fallopt.sweep_summary.summarize", broken)
    with caplog.at_level(logging.ERROR):
        record._close("FINISHED")  # must not raise: it also runs at exit

    assert record._failed  # on_multirun_end then exits non-zero
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert "KeyError" in run.data.tags["fallopt.error"]
    assert "cannot summarize the sweep: KeyError" in caplog.text


def test_a_long_error_is_recorded_as_valid_json_and_read_back(store):
    client, experiment = store
    parent = client.create_run(experiment).info.run_id
    error = 'InvalidArgumentError: "graph" \n' + "é\\" * 6000  # escapes grow the JSON
    job.record(parent, job.Job(3, 9, "quant=int8", None, 1), "failed", None, error)

    text = client.get_run(parent).data.tags[f"{protocol.JOB_TAG}00003"]
    assert len(text) <= track.MAX_TAG
    outcome = json.loads(text)
    assert outcome["outcome"] == "failed" and outcome["overrides"] == "quant=int8"
    assert outcome["error"].startswith('InvalidArgumentError: "graph"')
    assert "cut here" in outcome["error"]
    assert protocol.job_outcomes(client, parent)[3] == outcome


def test_a_record_cut_mid_json_by_an_older_fallopt_still_reads(store):
    client, experiment = store
    parent = client.create_run(experiment).info.run_id
    client.set_tag(parent, f"{protocol.JOB_TAG}00000", '{"outcome": "failed", "error": "Unterm')

    (outcome,) = protocol.job_outcomes(client, parent).values()
    assert outcome["outcome"] == "failed" and "Unterm" in outcome["error"]


def test_a_parent_deleted_during_the_sweep_costs_its_records_not_the_jobs(store, tmp_path, caplog):
    client, experiment = store
    record, parent = _sweep(client, experiment, tmp_path, ["val_accuracy"])
    child = _finished_child(client, experiment, parent)
    client.delete_run(parent)  # in the MLflow UI, while the jobs run

    mlflow.set_tracking_uri(client.tracking_uri)
    me = job.Job(0, 2, "seed=0", None, 1)
    with caplog.at_level(logging.INFO):
        job.record(parent, me, "finished", child)  # must not raise
        job._progress(parent, me, 1.0)
        record._close("FINISHED")

    assert record._failed  # exit 3: the sweep's record is lost
    assert "cannot record the outcome (finished)" in caplog.text
    assert f"parent run {parent} was deleted while the sweep ran" in caplog.text
    assert client.get_run(child).info.status == "FINISHED"
    assert summarize  # imported above: the summary module loads without a parent


@pytest.mark.slow  # a CLI sweep (17 s); the exit code logic is unit-tested above
def test_keep_going_false_stops_the_sweep_at_an_unexpected_error(tmp_path):
    """Hydra records a job's exception and runs the next job: fallopt must exit instead."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    code = (
        "import sys, fallopt.task\n"
        "def broken(cfg, *a, **k):\n"
        "    raise RuntimeError(f'not a user error (seed {cfg.seed})')\n"
        "fallopt.task.run_experiment = broken\n"
        "sys.argv = ['fallopt.run', '-m', 'seed=1,2', 'keep_going=false',\n"
        f"            'tracking.uri={uri}', 'hydra.sweep.dir={tmp_path}/sweep']\n"
        "from fallopt.run import main\nmain()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "not a user error (seed 1)" in output
    assert "seed 2" not in output  # the second job never started
    assert "keep_going=false stops the sweep" in output
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    assert parent.info.status == "FAILED"
    (outcome,) = protocol.job_outcomes(client, parent.info.run_id).values()
    assert outcome["outcome"] == "failed" and "seed 1" in outcome["error"]
