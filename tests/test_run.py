"""A full tracked run, read back from MLflow and checked against an independent evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fallopt.config import validate
from fallopt.data import load_dataset
from fallopt.identity import config_hash
from fallopt.task import run_experiment

from .conftest import TINY, cauca_dict, fallopt_cli, write_pickle


def _run(compose_cfg, tmp_path, tracking_uri, *overrides):
    cfg = compose_cfg(*overrides, f"tracking.uri={tracking_uri}")
    typed = validate(cfg)
    metrics = run_experiment(typed, config_hash(typed), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(typed.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    return typed, cfg, metrics, client, run


def _artifact_bytes(client: MlflowClient, run_id: str, path: str, into: Path) -> bytes:
    into.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(into))).read_bytes()


def test_tracked_run_records_everything_the_ui_needs(compose_cfg, tmp_path, tracking_uri):
    typed, cfg, metrics, client, run = _run(
        compose_cfg, tmp_path, tracking_uri, *TINY, "train.epochs=2"
    )
    assert run.info.status == "FINISHED"
    m, params, tags = run.data.metrics, run.data.params, run.data.tags

    for name in (
        "train_accuracy", "val_accuracy", "test_accuracy", "test_loss", "test_fall_recall",
        "test_false_alarm_rate", "test_precision_fall", "test_recall_no_fall", "test_f1_fall",
    ):  # fmt: skip
        assert 0.0 <= m[name] <= max(1.0, m["test_loss"]), name
    assert m["n_train"] == 48 and m["n_val"] == 12 and m["n_test"] == 20
    assert params["train.epochs"] == "2" and params["prune.sparsity"] == "0.0"
    assert params["model.filters"] == "[4, 8]" and params["dataset.name"] == "synthetic_falls"
    assert tags["fallopt.config_hash"] == config_hash(typed)
    assert tags["fallopt.dataset"] == "synthetic_falls" and tags["fallopt.version"]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [h.step for h in history] == [1, 2, 3]  # 2 baseline epochs, then 1 fine-tune epoch
    assert m["val_accuracy"] == history[-1].value == pytest.approx(metrics["val_accuracy"])

    artifacts = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / "dl"), tracking_uri=tracking_uri
        )
    )
    for name in (
        "config.yaml",
        "confusion_matrix.json",
        "confusion_matrix.png",
        "training_curves.png",
        "model/model.keras",
    ):
        assert (artifacts / name).is_file(), name
    assert (artifacts / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "epochs: 2" in (artifacts / "config.yaml").read_text()

    # The logged model and confusion matrix agree with an independent evaluation.
    from fallopt.backend import keras

    model = keras().models.load_model(artifacts / "model" / "model.keras")
    assert model.count_params() == m["params_total"]
    assert model.optimizer is None  # saved without optimizer state

    # Sizes are those of exactly the logged file.
    import gzip

    logged = (artifacts / "model" / "model.keras").read_bytes()
    assert m["keras_size_bytes"] == len(logged)
    assert m["keras_gzip_bytes"] == len(gzip.compress(logged, compresslevel=9, mtime=0))
    assert m["nonzero_params"] == sum(int(np.count_nonzero(w)) for w in model.get_weights())
    assert tags["fallopt.size_file"].startswith("model/model.keras")
    assert tags["fallopt.stage.baseline"] == "trained" and tags["fallopt.stage.prune"] == "trained"
    assert m["sparsity_achieved"] == 0.0  # the default sparsity fine-tunes without pruning
    data = load_dataset(typed.dataset, typed.train.val_split, typed.seed)
    predicted = model.predict(data.test.x.astype(np.float32) / 255.0, verbose=0).argmax(axis=1)
    expected = np.zeros((2, 2), int)
    np.add.at(expected, (data.test.y, predicted), 1)
    assert json.loads((artifacts / "confusion_matrix.json").read_text()) == expected.tolist()
    assert m["test_accuracy"] == pytest.approx(np.trace(expected) / expected.sum())


@pytest.mark.slow
def test_same_seed_same_run_metrics(compose_cfg, tmp_path, tracking_uri):
    first = _run(compose_cfg, tmp_path / "a", tracking_uri.replace("mlruns", "a"), *TINY)[2]
    second = _run(compose_cfg, tmp_path / "b", tracking_uri.replace("mlruns", "b"), *TINY)[2]
    timings = ("tflite_latency_ms", "tflite_throughput_ips")  # wall-clock, never repeatable
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }


def test_a_failing_run_is_recorded_failed(compose_cfg, tmp_path, tracking_uri, monkeypatch):
    import fallopt.stages

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fallopt.stages, "fit_baseline", broken)
    with pytest.raises(RuntimeError):
        _run(compose_cfg, tmp_path, tracking_uri, *TINY)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["fallopt.error"]
    assert mlflow.active_run() is None


def test_ctrl_c_ends_the_run_killed(compose_cfg, tmp_path, tracking_uri, monkeypatch):
    import fallopt.stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fallopt.stages, "fit_baseline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(compose_cfg, tmp_path, tracking_uri, *TINY)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    assert run.info.status == "KILLED"
    assert mlflow.active_run() is None


def test_unwritable_tracking_store_is_named(compose_cfg, tmp_path):
    from fallopt.track import TrackingError

    with pytest.raises(TrackingError, match=r"tracking.uri=sqlite:////proc/fallopt/mlflow.db"):
        _run(compose_cfg, tmp_path, "sqlite:////proc/fallopt/mlflow.db", *TINY)


def test_bad_data_fails_before_any_run_is_created(compose_cfg, tmp_path, tracking_uri):
    from fallopt.errors import DataError

    with pytest.raises(DataError):
        _run(
            compose_cfg,
            tmp_path,
            tracking_uri,
            "dataset=cauca",
            f"dataset.train_path={tmp_path}/missing.pickle",
        )
    client = MlflowClient(tracking_uri)
    assert client.search_runs([client.get_experiment_by_name("fallopt").experiment_id]) == []


@pytest.mark.slow  # a third real data set: the HDS and CAUCA runs cover the default path
def test_digits_run(compose_cfg, tmp_path, tracking_uri):
    *_, run = _run(
        compose_cfg, tmp_path, tracking_uri, "dataset=digits", "model=hds_cnn", "train.epochs=1"
    )
    assert run.info.status == "FINISHED" and "test_fall_recall" not in run.data.metrics
    assert run.data.metrics["n_test"] == 360 and "test_recall_9" in run.data.metrics


@pytest.mark.slow  # the same real data goes through files in test_hds_files in the default set
def test_hds_run_on_the_real_data(compose_cfg, tmp_path, tracking_uri, hds_pickle):
    *_, run = _run(
        compose_cfg,
        tmp_path,
        tracking_uri,
        "+experiment=hds_lab",
        f"dataset.path={hds_pickle}",
        "train.epochs=3",
    )
    assert run.info.status == "FINISHED"
    assert run.data.metrics["params_total"] == 37_443
    # Three classes (chance 0.33); the lab reached 0.884 after 10 epochs.
    assert run.data.metrics["test_accuracy"] > 0.7


def test_cauca_run_on_lab_format_pickles(compose_cfg, tmp_path, tracking_uri):
    train = write_pickle(tmp_path / "data_train_96_96_3.pickle", cauca_dict(40, size=24))
    test = write_pickle(tmp_path / "data_test_96_96_3.pickle", cauca_dict(20, size=24, seed=1))
    *_, run = _run(
        compose_cfg, tmp_path, tracking_uri, *TINY[3:], "dataset=cauca",
        f"dataset.train_path={train}", f"dataset.test_path={test}",
    )  # fmt: skip
    assert run.info.status == "FINISHED" and run.data.metrics["n_test"] == 20
    assert "test_fall_recall" in run.data.metrics


@pytest.mark.slow  # the sweep tests run the CLI too; this one adds the single-run path
def test_cli_runs_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = [*TINY, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path}/out"]
    proc = fallopt_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("[config]", "[data]", "[baseline]", "[prune]", "[evaluate]", "[size]", "[track]"):
        assert stage in proc.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    assert run.info.status == "FINISHED"


@pytest.mark.slow  # two full runs (16 s); the stage-store full-disk test stays in the default set
def test_a_full_disk_while_logging_fails_the_run_and_leaves_earlier_runs_untouched(
    compose_cfg, tmp_path, tracking_uri, monkeypatch
):
    import errno

    import fallopt.track

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    *_, client, earlier = _run(compose_cfg, tmp_path / "a", tracking_uri, *TINY)
    earlier_tflite = _artifact_bytes(client, earlier.info.run_id, "model.tflite", tmp_path / "1")
    monkeypatch.setattr(fallopt.track.MlflowClient, "log_artifact", full)
    with pytest.raises(OSError, match="No space left"):
        _run(compose_cfg, tmp_path / "b", tracking_uri, *TINY, "prune.sparsity=0.3")
    runs = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    (run,) = [r for r in runs if r.info.run_id != earlier.info.run_id]
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["fallopt.error"]
    assert mlflow.active_run() is None
    # The earlier run is untouched: same status, metrics and artifact bytes.
    again = client.get_run(earlier.info.run_id)
    assert again.info.status == "FINISHED" and again.data.metrics == earlier.data.metrics
    assert _artifact_bytes(client, earlier.info.run_id, "model.tflite", tmp_path / "2") == (
        earlier_tflite
    )


def test_a_full_disk_while_building_a_stage_leaves_no_entry(tmp_path):
    import errno

    from fallopt.cache import StageCache

    def build(out):
        (out / "model.keras").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = StageCache(tmp_path / "stages")
    with pytest.raises(OSError, match="No space left"):
        cache.get_or_build("baseline", "k", build)
    assert cache.status("baseline", "k") == "missing"
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["baseline-k.lock"]
