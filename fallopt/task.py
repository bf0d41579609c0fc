"""One run: data -> model -> train -> evaluate -> MLflow, one log line per stage."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import fallopt
from fallopt import track
from fallopt.config import FalloptConfig, flatten
from fallopt.data import load_dataset
from fallopt.evaluate import evaluate_keras
from fallopt.models import build_model, feature_map_sizes
from fallopt.plots import confusion_matrix_png, training_curves_png
from fallopt.train import seed_everything, train_model

log = logging.getLogger(__name__)


def save_model(model: Any, path: Path) -> Path:
    """Save weights and architecture without optimizer state (which would triple the file)."""
    from fallopt.backend import keras

    clone = keras().models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.save(path)
    return path


def run_experiment(
    cfg: FalloptConfig, resolved: dict[str, Any], config_hash: str, output_dir: Path
) -> dict[str, float]:
    """Train, evaluate and track one configuration; returns the logged summary metrics.

    Data and shapes are checked, and the tracking store opened, before the MLflow run starts,
    so bad input leaves no run behind. Once started, the run always ends FINISHED or FAILED.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("[config] hash %s, outputs in %s", config_hash, output_dir)
    experiment_id = track.connect(cfg.tracking)
    data = load_dataset(cfg.dataset, cfg.train.val_split, cfg.seed)
    log.info("[data] %s", data.describe())
    feature_map_sizes(cfg.model, data.input_shape)  # fails before TensorFlow on a bad shape

    tags = {
        "fallopt.version": fallopt.__version__,
        "fallopt.config_hash": config_hash,
        "fallopt.dataset": data.name,
        "fallopt.model": cfg.model.name,
        "fallopt.classes": ",".join(data.class_names),
    }
    with track.tracked_run(experiment_id, cfg.tracking.run_name, tags) as run_id:
        track.log_params(flatten(resolved))
        config_file = output_dir / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(resolved))
        counts = {"n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test)}

        seed_everything(cfg.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        params_total = model.count_params()
        log.info("[model] %s: %s parameters", cfg.model.name, f"{params_total:,}")
        track.log_metrics({"params_total": params_total, **counts})

        start = time.perf_counter()
        history = train_model(
            model, data.train, data.val, cfg.train, cfg.seed, on_epoch_end=track.log_epoch
        )
        summary = {
            "train_accuracy": history["accuracy"][-1],
            "train_loss": history["loss"][-1],
            "val_accuracy": history["val_accuracy"][-1],
            "val_loss": history["val_loss"][-1],
        }
        log.info(
            "[train] %d epochs in %.0f s: train_accuracy %.3f, val_accuracy %.3f",
            cfg.train.epochs,
            time.perf_counter() - start,
            summary["train_accuracy"],
            summary["val_accuracy"],
        )

        evaluation = evaluate_keras(model, data.test)
        test_metrics = evaluation.metrics(data.class_names, prefix="test")
        binary = "test_fall_recall" in test_metrics
        log.info(
            "[evaluate] test_accuracy %.3f%s",
            evaluation.accuracy,
            f", fall recall {test_metrics['test_fall_recall']:.3f}, false alarms "
            f"{test_metrics['test_false_alarm_rate']:.3f}"
            if binary
            else "",
        )
        track.log_metrics(test_metrics)  # train/val metrics were logged epoch by epoch
        summary.update(test_metrics)

        cm_json = output_dir / "confusion_matrix.json"
        cm_json.write_text(json.dumps(evaluation.confusion.tolist()))
        artifacts = [
            config_file,
            cm_json,
            confusion_matrix_png(
                evaluation.confusion,
                data.class_names,
                output_dir / "confusion_matrix.png",
                f"{cfg.model.name} on {data.name}\ntest set, accuracy {evaluation.accuracy:.1%}",
            ),
            training_curves_png(history, output_dir / "training_curves.png"),
        ]
        track.log_artifacts(artifacts)
        track.log_artifacts([save_model(model, output_dir / "model.keras")], "model")
        log.info(
            "[track] run %s in experiment %r at %s",
            run_id,
            cfg.tracking.experiment,
            cfg.tracking.uri,
        )
    return {**summary, "params_total": float(params_total), **counts}
