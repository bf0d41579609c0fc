"""The tracking store stays truthful: dead writers' runs are reaped, names cannot escape the
store's folder, and a Ctrl-C that a library swallowed still ends the run KILLED."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import mlflow
import pytest
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
