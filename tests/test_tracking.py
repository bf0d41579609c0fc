"""The tracking store stays truthful: dead writers' runs are reaped, names cannot escape the
store's folder, and a Ctrl-C that a library swallowed still ends the run KILLED."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fallopt import interrupt, track
from fallopt.config import TrackingConfig
from fallopt.stage_store import MlflowStageStore


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_every_run_of_a_dead_writer_is_reaped_stages_included(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", share_stages=True)
    experiment = track.connect(tracking)
    client = MlflowClient(tracking.uri)
    dead = {**track.owner_tags(), "fallopt.pid": str(_dead_pid())}
    killed_in_training = client.create_run(
        experiment, tags={**dead, "fallopt.config_hash": "aaaaaaaaaaaa"}
    ).info.run_id
    alive = client.create_run(experiment, tags=track.owner_tags()).info.run_id  # this process
    elsewhere = client.create_run(
        experiment, tags={**dead, "fallopt.host": "another-host"}
    ).info.run_id
    stages = track.connect(tracking, f"{tracking.experiment}.stages")
    upload = client.create_run(stages, tags={**dead, "fallopt.role": "stage"}).info.run_id

    # A later job of any config reaps the whole experiment, not only its own config's runs.
    assert track.reap_dead_runs(experiment) == [killed_in_training]
    MlflowStageStore(tracking)  # a worker opening the shared stage store reaps its uploads
    status = {run: client.get_run(run).info.status for run in (killed_in_training, upload)}
    assert status == {killed_in_training: "KILLED", upload: "KILLED"}
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # cannot be checked from here
    assert client.get_run(upload).data.tags["fallopt.error"] == "its process died (killed)"


def test_an_experiment_name_cannot_put_stage_artifacts_outside_the_store(tmp_path):
    store = tmp_path / "mlruns"
    tracking = TrackingConfig(
        uri=f"sqlite:///{store}/mlflow.db", experiment="../../escaped", share_stages=True
    )
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "meta.json").write_text("{}")
    claim = MlflowStageStore(tracking).claim("baseline-x")
    assert not isinstance(claim, str)
    claim.publish(entry)

    written = [p for p in tmp_path.rglob("meta.json") if p.parent != entry]
    assert written and all(store in p.parents for p in written)
    assert not (tmp_path.parent / "escaped").exists()
    assert track.path_component("fallopt") == "fallopt"  # ordinary names are kept as they are


def test_a_swallowed_ctrl_c_still_ends_the_run_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupt, "_received", False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    with (
        pytest.raises(KeyboardInterrupt),
        track.tracked_run(experiment, "r", {}) as run_id,
        # As in a finalizer or weakref callback, whose error Python prints and ignores:
        contextlib.suppress(KeyboardInterrupt),
    ):
        interrupt._on_sigint(2, None)
    assert MlflowClient().get_run(run_id).info.status == "KILLED"


def test_a_ctrl_c_that_surfaces_as_another_error_ends_the_run_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupt, "_received", False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    with (
        pytest.raises(KeyboardInterrupt) as stopped,
        track.tracked_run(experiment, "r", {}) as run_id,
    ):
        try:
            interrupt._on_sigint(2, None)
        except KeyboardInterrupt:  # Keras, cut short, then fails on what it left half done
            raise AttributeError("'dict' object has no attribute '_type_spec'") from None
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert isinstance(stopped.value.__cause__, AttributeError)  # the error stays visible
    # Without a Ctrl-C, the same error ends the run FAILED.
    monkeypatch.setattr(interrupt, "_received", False)
    with pytest.raises(AttributeError), track.tracked_run(experiment, "r", {}) as run_id:
        raise AttributeError("a bug")
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def _log_a_little(step_metric: bool = False) -> None:
    track.log_params({"seed": 0, "prune.sparsity": 0.5})
    track.set_tags({"fallopt.stage.baseline": "built", "fallopt.note": "first"})
    track.log_history({"loss": [0.9, 0.7]}, first_step=1)
    if step_metric:  # an epoch ends: its curve point goes at once, and what waited with it
        track.log_metrics({"train_loss": 0.5}, step=3)
    track.set_tags({"fallopt.note": "last"})  # the last value set is the one kept
    track.log_metrics({"test_accuracy": 0.75})


@pytest.mark.parametrize("ends", ["FINISHED", "FAILED", "KILLED"])
def test_what_a_run_logs_goes_in_few_requests_and_arrives_however_it_ends(
    tmp_path, monkeypatch, ends
):
    monkeypatch.setattr(interrupt, "_received", False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    log_batch, requests = MlflowClient.log_batch, []

    def counted(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        requests.append((len(metrics), len(params), len(tags)))
        return log_batch(self, run_id, metrics, params, tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    errors = {"FINISHED": contextlib.nullcontext(), "FAILED": pytest.raises(ValueError),
              "KILLED": pytest.raises(KeyboardInterrupt)}  # fmt: skip
    with errors[ends], track.tracked_run(experiment, "r", {"fallopt.config_hash": "h"}) as run_id:
        _log_a_little()
        if ends == "FAILED":
            raise ValueError("a bad value")
        if ends == "KILLED":
            raise KeyboardInterrupt
    run = MlflowClient().get_run(run_id)
    assert run.info.status == ends
    # The params at once (a run that dies still shows its config); the rest in one request.
    assert requests == [(0, 2, 0), (3, 0, 3 if ends == "FAILED" else 2)]
    assert run.data.params == {"seed": "0", "prune.sparsity": "0.5"}
    assert run.data.tags["fallopt.note"] == "last"
    assert run.data.tags["fallopt.stage.baseline"] == "built"
    assert run.data.metrics == {"train_loss": 0.7, "test_accuracy": 0.75}
    curve = MlflowClient().get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in curve] == [(1, 0.9), (2, 0.7)]
    if ends == "FAILED":
        assert run.data.tags["fallopt.error"] == "ValueError: a bad value"


def test_what_waits_is_not_lost_when_a_request_fails(tmp_path, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    log_batch, failures = MlflowClient.log_batch, [1]

    def fails_once_at_the_end(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if failures and any(t.key == "fallopt.note" for t in tags):
            failures.pop()
            raise MlflowException("the store is busy")
        return log_batch(self, run_id, metrics, params, tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", fails_once_at_the_end)
    with pytest.raises(MlflowException), track.tracked_run(experiment, "r", {}) as run_id:
        _log_a_little()
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["fallopt.error"] == "MlflowException: the store is busy"
    assert run.data.tags["fallopt.note"] == "last"  # sent with the error, not lost
    assert run.data.metrics == {"train_loss": 0.7, "test_accuracy": 0.75}


def test_outside_tracked_run_everything_is_sent_at_once(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    with mlflow.start_run(experiment_id=experiment) as run:
        _log_a_little()
        data = MlflowClient().get_run(run.info.run_id).data
    assert data.tags["fallopt.note"] == "last" and data.metrics["test_accuracy"] == 0.75


def test_an_epochs_metrics_go_at_once_with_what_waited(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    client = MlflowClient()
    with track.tracked_run(experiment, "r", {}) as run_id:
        _log_a_little(step_metric=True)
        live = client.get_run(run_id).data  # while the run goes on
        assert live.params == {"seed": "0", "prune.sparsity": "0.5"}
        assert live.tags["fallopt.note"] == "first" and live.metrics == {"train_loss": 0.5}
        assert "test_accuracy" not in live.metrics  # waits for the next request
    done = client.get_run(run_id).data
    assert done.tags["fallopt.note"] == "last" and done.metrics["test_accuracy"] == 0.75
    steps = [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [(1, 0.9), (2, 0.7), (3, 0.5)]


def test_sigint_handler_is_installed_only_where_ctrl_c_is_not_ignored(monkeypatch):
    import signal

    monkeypatch.setattr(interrupt, "_received", False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupt.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # nohup: the user asked
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt.install()
        assert signal.getsignal(signal.SIGINT) is interrupt._on_sigint
    finally:
        signal.signal(signal.SIGINT, previous)
