"""Sweeps that survive: resume after a kill, dry-run, keep going past a failed job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fallopt.errors import EXIT_SWEEP_INCOMPLETE, EXIT_USER_ERROR

from .conftest import REPO, TINY, multirun, tracked

GRID = ["prune.sparsity=0.5,0.8", "quant=none,dynamic"]


def _finished_once_per_config(runs) -> dict[str, str]:
    """config hash -> run id of the FINISHED runs; fails if a config finished twice."""
    hashes = [r.data.tags["fallopt.config_hash"] for r in runs]
    assert len(hashes) == len(set(hashes)), "a configuration FINISHED twice"
    return {r.data.tags["fallopt.config_hash"]: r.info.run_id for r in runs}


@pytest.mark.slow  # a minute of subprocess sweeps; CI runs `pytest -m slow` too
def test_a_sweep_killed_after_its_first_job_resumes_and_runs_only_the_rest(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = [*TINY, "prune.sparsity=0.3,0.8", f"tracking.uri={uri}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fallopt.run", "-m", *args, f"hydra.sweep.dir={tmp_path}/first"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
    )
    client, deadline = MlflowClient(uri), time.time() + 300
    try:  # SIGKILL as soon as the first job has FINISHED: no handler gets to clean up
        while time.time() < deadline and proc.poll() is None:
            experiment = client.get_experiment_by_name("fallopt") if Path(tmp_path, "mlruns",
                "mlflow.db").exists() else None  # fmt: skip
            if experiment and client.search_runs(
                [experiment.experiment_id],
                "attributes.status = 'FINISHED' and tags.`fallopt.config_hash` != ''",
            ):
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = tracked(uri, tmp_path / "first")
    assert killed.parent.info.status == "RUNNING"  # SIGKILL: nobody could close it
    before = _finished_once_per_config(killed.runs("FINISHED"))
    assert len(before) == 1  # the kill came before the second job could finish

    resumed = multirun(tmp_path, "prune.sparsity=0.3,0.8", name="resume")
    assert "[sweep] 1 finished, 1 reused (already FINISHED), 0 failed" in resumed.output
    (first_id,) = before.values()
    assert f"already FINISHED in run {first_id}" in resumed.output
    after = _finished_once_per_config(resumed.runs("FINISHED"))
    assert len(after) == 2 and after.items() >= before.items()
    assert len(resumed.children) == 1  # only the rest ran
    # What the kill interrupted never counts as done, and no longer shows as RUNNING: its
    # process is dead, so the resume marked it KILLED (the old parent too).
    interrupted = [r for r in resumed.runs() if r.info.run_id not in after.values()]
    assert {r.info.status for r in interrupted} <= {"KILLED"}
    old_parent = resumed.client.get_run(killed.parent.info.run_id)
    assert old_parent.info.status == "KILLED"
    assert not list((tmp_path / "cache" / "stages").glob(".*.tmp"))

    forced = multirun(tmp_path, "prune.sparsity=0.3", "force=true", name="forced")
    assert len(forced.children) == 1 and forced.children[0].info.run_id != before.get(
        forced.children[0].data.tags["fallopt.config_hash"]
    )


def _plan(output: str) -> dict[str, str]:
    """The dry-run's lines: overrides -> what it would do."""
    lines = re.findall(r"\[dry-run job \d+/4\] (.*?): (skip.*|run; .*)", output)
    return {overrides: plan for overrides, plan in lines}


@pytest.mark.slow  # two subprocess sweeps and a dry run: 80 s
def test_dry_run_lists_every_job_without_tensorflow_and_matches_the_real_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    done = multirun(tmp_path, "prune.sparsity=0.5", "quant=none", name="earlier")
    (earlier,) = done.children

    # In-process, to see what it imported.
    argv = ["fallopt.run", "-m", *GRID, *TINY, "dry_run=true", f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp_path}/dry"]  # fmt: skip
    code = (
        f"import sys; sys.argv = {argv!r}\n"
        "from fallopt.run import main\nmain()\n"
        "print('TENSORFLOW_IMPORTED', 'tensorflow' in sys.modules)\n"
    )
    dry = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "TENSORFLOW_IMPORTED False" in dry.stdout
    assert "[dry-run] 4 jobs" in dry.stdout + dry.stderr
    plan = _plan(dry.stdout + dry.stderr)
    assert len(plan) == 4
    assert len(done.runs()) == 1  # the dry run logged nothing

    real = multirun(tmp_path, *GRID, name="real")
    assert len(real.runs("FINISHED")) == 4
    by_overrides = {r.info.run_name: r for r in real.children}
    for overrides, what in plan.items():
        if what.startswith("skip"):
            assert what == f"skip, FINISHED in run {earlier.info.run_id}"
            assert overrides not in by_overrides
            continue
        tags = by_overrides[overrides].data.tags
        expected = re.findall(r"(baseline|pruned) (train|reuse)", what)
        actual = [("baseline", tags["fallopt.stage.baseline"]), ("pruned",
                  tags["fallopt.stage.prune"])]  # fmt: skip
        assert [(k, "train" if v == "trained" else "reuse") for k, v in actual] == expected


@pytest.mark.slow  # two subprocess sweeps: 45 s; test_sweep_record covers the records fast
def test_a_failing_job_is_recorded_and_the_rest_of_the_sweep_finishes(tmp_path):
    sweep = multirun(
        tmp_path, "prune.sparsity=1.5,0.8", returncode=EXIT_SWEEP_INCOMPLETE, name="bad"
    )
    assert [r.data.params["prune.sparsity"] for r in sweep.children] == ["0.8"]
    assert {r.info.status for r in sweep.children} == {"FINISHED"}
    assert sweep.parent.info.status == "FAILED"
    assert "[sweep] 1 finished, 0 reused (already FINISHED), 1 failed" in sweep.output
    assert "job 1 failed: prune.sparsity=1.5" in sweep.output
    assert "prune.sparsity=1.5 is invalid" in sweep.output
    table = (tmp_path / "bad" / "sweep.csv").read_text()
    assert "failed" in table and "prune.sparsity=1.5 is invalid" in table

    stopped = multirun(
        tmp_path, "prune.sparsity=1.5,0.5", "keep_going=false", returncode=EXIT_USER_ERROR,
        name="stop",
    )  # fmt: skip
    assert stopped.children == [] and stopped.parent.info.status == "FAILED"


@pytest.mark.parametrize("env_parent", [True, False])
def test_a_job_finds_its_parent_with_or_without_the_environment(tmp_path, monkeypatch, env_parent):
    """Ray workers on other machines do not inherit the environment: they look up the tag."""
    import mlflow

    from fallopt import job, protocol

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("x")
    tags = {"fallopt.role": "sweep", protocol.SWEEP_DIR_TAG: "multirun/2026-11-23/10-00-00"}
    parent = MlflowClient().create_run(experiment, tags=tags).info.run_id
    MlflowClient().create_run(experiment, tags={**tags, protocol.SWEEP_DIR_TAG: "multirun/other"})
    monkeypatch.delenv(protocol.PARENT_ENV, raising=False)
    if env_parent:
        monkeypatch.setenv(protocol.PARENT_ENV, parent)
    me = job.Job(2, 4, "prune.sparsity=0.5", "multirun/2026-11-23/10-00-00", 1)
    assert job.parent_run_id(me, experiment) == parent
    alone = job.Job(None, None, "", None, 1)
    assert job.parent_run_id(alone, experiment) is None
