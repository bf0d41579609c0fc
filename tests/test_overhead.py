"""A sweep's jobs share what they can and measure what they must, once (issue 18).

Each saving is checked for what it must not change: the same figure bytes, the same sizes,
the same model, the same store; and a run of a sweep logs what a single run logs, but for
the C++ bundle, which a sweep writes only when asked.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fallopt import plots, size, track
from fallopt.config import TrackingConfig, validate
from fallopt.identity import config_hash

from .conftest import TINY

HISTORY = {"loss": [0.7, 0.5], "accuracy": [0.5, 0.7], "val_loss": [0.8, 0.6],
           "val_accuracy": [0.4, 0.6]}  # fmt: skip


def _draws(monkeypatch) -> list[int]:
    count = [0]
    draw = Figure.draw

    def counting(self, renderer):
        count[0] += 1
        return draw(self, renderer)

    monkeypatch.setattr(Figure, "draw", counting)
    return count


def test_a_runs_figures_are_drawn_in_one_pass_and_a_figure_already_drawn_is_copied(
    tmp_path, monkeypatch
):
    draws = _draws(monkeypatch)
    confusion = np.array([[7, 3], [2, 8]])
    first = plots.confusion_matrix_png(confusion, ["no_fall", "fall"], tmp_path / "a.png", "t")
    assert draws[0] == 1  # one pass: no layout pass before the rendering one
    again = plots.confusion_matrix_png(confusion, ["no_fall", "fall"], tmp_path / "b.png", "t")
    assert draws[0] == 1 and again.read_bytes() == first.read_bytes()
    other = plots.confusion_matrix_png(confusion + 1, ["no_fall", "fall"], tmp_path / "c.png", "t")
    assert draws[0] == 2 and other.read_bytes() != first.read_bytes()

    curves = plots.training_curves_png(HISTORY, tmp_path / "d.png", {"pruning fine-tune": 2})
    plots.training_curves_png(HISTORY, tmp_path / "e.png", {"pruning fine-tune": 2})
    assert draws[0] == 3 and (tmp_path / "e.png").read_bytes() == curves.read_bytes()
    first.unlink()  # an earlier run's output folder removed: drawn anew
    plots.confusion_matrix_png(confusion, ["no_fall", "fall"], tmp_path / "f.png", "t")
    assert draws[0] == 4


def test_sizes_are_measured_once_per_file_content_and_in_the_background(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(bytes(200_000) + os.urandom(50_000))
    measuring = size.Measuring(path)
    found = measuring.result()
    assert (found.raw_bytes, found.path) == (250_000, path)
    import gzip

    assert found.gzip_bytes == len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))
    assert size.file_size(path) == found
    time.sleep(0.01)
    path.write_bytes(os.urandom(1000))  # changed: measured again
    assert size.file_size(path).raw_bytes == 1000
    with pytest.raises(FileNotFoundError):
        size.Measuring(tmp_path / "missing.tflite").result()


def test_a_saved_model_is_loaded_once_even_after_it_is_renamed_into_the_cache(tmp_path):
    from fallopt.backend import keras

    k = keras()
    model = k.Sequential([k.layers.Dense(2, input_shape=(3,))])
    (tmp_path / "tmp").mkdir()
    built = size.save_model(model, tmp_path / "tmp" / "model.keras")
    first = size.load_saved(built)
    (tmp_path / "final").mkdir()
    moved = built.rename(tmp_path / "final" / "model.keras")  # the stage cache installs it
    assert size.load_saved(moved) is first
    size.save_model(model, moved)  # rewritten: a new file, a new model
    assert size.load_saved(moved) is not first
    np.testing.assert_array_equal(size.load_saved(moved).get_weights()[0], model.get_weights()[0])


def test_saving_a_model_without_an_optimizer_skips_the_copy_and_writes_the_same_file(tmp_path):
    import zipfile

    from fallopt.backend import keras

    k = keras()
    model = k.Sequential([k.layers.Dense(4, input_shape=(3,)), k.layers.Dense(2)])
    compiled = k.models.clone_model(model)
    compiled.set_weights(model.get_weights())
    compiled.compile("adam", "mse")
    compiled.optimizer.build(compiled.trainable_variables)
    plain, through_copy = tmp_path / "plain.keras", tmp_path / "copied.keras"
    size.save_model(model, plain)
    size.save_model(compiled, through_copy)
    a, b = zipfile.ZipFile(plain), zipfile.ZipFile(through_copy)
    assert a.namelist() == b.namelist()
    for name in ("config.json", "model.weights.h5"):  # metadata.json holds the date
        assert a.read(name) == b.read(name), name


def test_the_store_is_opened_once_per_process_and_again_when_its_file_is_replaced(
    tmp_path, monkeypatch
):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    first = track.connect(tracking)
    asked = []
    lookup = mlflow.get_experiment_by_name
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda n: asked.append(n) or lookup(n))
    assert track.connect(tracking) == first and asked == []
    (tmp_path / "mlruns" / "mlflow.db").unlink()  # a new store at the same place
    track.connect(tracking)
    assert asked == ["fallopt"]


def test_a_dataset_logged_by_two_jobs_at_once_is_retried_not_failed(tmp_path, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = track.connect(TrackingConfig(uri=mlflow.get_tracking_uri()))
    log_inputs, calls = MlflowClient.log_inputs, []

    def racing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the other job inserted the dataset between lookup and insert
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets")
        return log_inputs(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    with track.tracked_run(experiment, "r", {}) as run_id:
        track.log_datasets("synthetic_falls", "synthetic", {"train": "abc", "test": "def"})
    assert len(calls) == 2  # both splits in one request, tried twice
    inputs = MlflowClient(mlflow.get_tracking_uri()).get_run(run_id).inputs.dataset_inputs
    names = sorted(i.dataset.name for i in inputs)
    assert names == ["synthetic_falls-test", "synthetic_falls-train"]


def test_a_sweeps_job_writes_no_deploy_bundle_unless_asked_and_shares_data_and_checks(
    compose_cfg, tmp_path, tracking_uri, monkeypatch
):
    from fallopt import task

    client = MlflowClient(tracking_uri)
    experiment = track.connect(TrackingConfig(uri=tracking_uri))
    parent = client.create_run(experiment, tags={"fallopt.role": "sweep"}).info.run_id
    loads, builds = [], []
    load_dataset, build_model = task.load_dataset, task.build_model
    monkeypatch.setattr(task, "load_dataset", lambda *a: loads.append(1) or load_dataset(*a))
    monkeypatch.setattr(task, "build_model", lambda *a: builds.append(1) or build_model(*a))
    task._shared.clear()

    def run(*overrides: str) -> dict:
        typed = validate(compose_cfg(*TINY, f"tracking.uri={tracking_uri}", *overrides))
        task.run_experiment(typed, config_hash(typed), tmp_path / overrides[-1], parent)
        run_id = track.last_run_id()
        return {a.path for a in client.list_artifacts(run_id)}

    plain = run("prune.sparsity=0.5", "quant=none")
    asked = run("prune.sparsity=0.5", "quant=dynamic", "deploy=true")
    assert "deploy" not in plain and "model.tflite" in plain
    assert "deploy" in asked
    assert {a.path for a in client.list_artifacts(track.last_run_id(), "deploy")} >= {
        "deploy/model_data.cc",
        "deploy/main.cc",
    }
    # One load of the data and one model built for the checks served both jobs.
    assert len(loads) == 1 and len(builds) == 1


def test_a_single_run_writes_its_deploy_bundle_by_default(compose_cfg, tmp_path, tracking_uri):
    from fallopt import task

    typed = validate(compose_cfg(*TINY, f"tracking.uri={tracking_uri}", "prune=none"))
    task.run_experiment(typed, config_hash(typed), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    assert "deploy" in {a.path for a in client.list_artifacts(track.last_run_id())}
    assert Path(tmp_path / "out" / "deploy" / "model_data.cc").is_file()


@pytest.mark.slow  # two CLI runs (25 s); the bundle's own logic is tested above
def test_deploy_true_on_a_config_a_sweep_finished_says_how_to_get_its_bundle(tmp_path):
    from .conftest import fallopt_cli, multirun

    sweep = multirun(tmp_path, "prune.sparsity=0.5")
    (run,) = sweep.children
    assert "deploy" not in {a.path for a in sweep.client.list_artifacts(run.info.run_id)}
    again = fallopt_cli(
        "prune.sparsity=0.5", *TINY, "deploy=true", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"hydra.run.dir={tmp_path}/single", env={"FALLOPT_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    hint = f"run {run.info.run_id} has no deploy/ bundle and is not run again: add force=true"
    assert hint in output
