"""The cached stages of a run: train the baseline, prune it, cluster it. Each is built once.

baseline = f(data, model, train, seed); pruned = f(baseline, prune, train, seed); clustered =
f(pruned or baseline, cluster, train, seed). Entries live in a `StageCache` on disk, so every
run of a sweep (in this process or another) that shares a stage reuses it. Each stage's model
is a `.keras` file without optimizer state; a prune or cluster entry also holds its
`Outcome` (what changed, per layer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fallopt.cache import Entry, StageCache, baseline_key, clustered_key, pruned_key
from fallopt.compress.outcome import Outcome
from fallopt.compress.pruners import PRUNERS
from fallopt.compress.quantize import convert
from fallopt.compress.schedule import Schedule
from fallopt.config import ClusterConfig, ModelConfig, PruneConfig, QuantMode, TrainConfig
from fallopt.data import Dataset, InputRule
from fallopt.evaluate import evaluate_keras
from fallopt.models import build_model, fit_baseline
from fallopt.size import nonzero_params, save_model
from fallopt.tflite_graph import Graph
from fallopt.train import EpochHook, seed_everything

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
REFERENCE_TFLITE = "float32.tflite"  # the baseline as float32 TFLite: the reference for ratios


def baseline_key_for(
    data: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int
) -> str:
    """The baseline stage's key: f(data, model, train, seed), for building and for plans.

    The pruned stage's key is `cache.pruned_key(<this>, prune, train, seed)`.
    """
    return baseline_key(data.fingerprint(), list(data.class_names), model_cfg, train_cfg, seed)


def training_threads() -> int:
    """TensorFlow's intra-op threads: results differ in their last digits between counts.

    Stages are reused across thread counts (README, "Reproducibility"), so each records its own.
    """
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1


@dataclass(frozen=True)
class StageResult:
    """A stage's cache entry and whether this run reused it."""

    entry: Entry
    reused: bool

    @property
    def model_file(self) -> Path:
        """The stage's model, saved without optimizer state."""
        return self.entry.path / MODEL_FILE

    @property
    def reference_tflite(self) -> Path:
        """The baseline converted to float32 TFLite (baseline entries only)."""
        return self.entry.path / REFERENCE_TFLITE

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-epoch Keras history of the training that built it."""
        return self.entry.meta["history"]

    @property
    def status(self) -> str:
        """`reused`, `trained`, or `loaded` (a model file taken as it is), as tagged on runs."""
        if self.reused:
            return "reused"
        return "trained" if self.history else "loaded"

    @property
    def origin(self) -> str:
        """Where this process got it, as tagged on runs (`fallopt.<kind>_from`).

        `built`, `cache` (this disk) or `store` (the shared store, checksums checked).
        """
        return self.entry.origin


def baseline(
    cache: StageCache,
    data: Dataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    on_epoch_end: EpochHook | None = None,
) -> StageResult:
    """Train the baseline (or reuse it) and record what every run compares against.

    Besides the model: its accuracies, non-zero parameter count and float32 TFLite file,
    computed once per baseline rather than once per run. With `train_cfg.epochs` 0 (a model
    file taken as it is) nothing is trained, and the train and validation accuracies are
    evaluated instead of read from the last epoch.
    """
    key = baseline_key_for(data, model_cfg, train_cfg, seed)
    rule = InputRule(*model_cfg.input_range)

    def build(out: Path) -> dict[str, Any]:
        seed_everything(seed)
        model = build_model(model_cfg, data.input_shape, data.num_classes)
        history = {}
        if train_cfg.epochs:
            history = fit_baseline(
                model_cfg, model, data.train, data.val, train_cfg, seed, on_epoch_end, rule
            )
        save_model(model, out / MODEL_FILE)
        reference = convert(model, QuantMode.none)
        (out / REFERENCE_TFLITE).write_bytes(reference)
        test = evaluate_keras(model, data.test, rule)
        if history:
            train_acc, val_acc = history["accuracy"][-1], history["val_accuracy"][-1]
        else:
            train_acc, val_acc = (
                evaluate_keras(model, s, rule).accuracy for s in (data.train, data.val)
            )
        return {
            "history": history,
            "params_total": model.count_params(),
            "macs": Graph.from_bytes(reference).macs,  # of the float32 file, as runs count
            "nonzero_params": nonzero_params(model),
            "train_accuracy": train_acc,
            "val_accuracy": val_acc,
            "test_accuracy": test.accuracy,
            "test_loss": test.loss,
            "threads": training_threads(),
        }

    entry, reused = cache.get_or_build("baseline", key, build)
    return StageResult(entry, reused)


def pruned(
    cache: StageCache,
    data: Dataset,
    base: StageResult,
    prune_cfg: PruneConfig,
    schedule: Schedule | None,
    train_cfg: TrainConfig,
    seed: int,
    rule: InputRule,
    on_epoch_end: EpochHook | None = None,
) -> StageResult:
    """Prune and fine-tune the baseline by `prune.method` (or reuse the result).

    The method verifies what it made (`fallopt.compress.pruners`).
    """
    key = pruned_key(base.entry.meta["key"], prune_cfg, train_cfg, seed)

    def build(out: Path) -> dict[str, Any]:
        seed_everything(seed)
        outcome = PRUNERS[prune_cfg.method].build(
            base.model_file, data, prune_cfg, schedule, train_cfg, seed, out / MODEL_FILE,
            on_epoch_end, rule,
        )  # fmt: skip
        return {**outcome.as_meta(), "threads": training_threads()}

    entry, reused = cache.get_or_build("pruned", key, build)
    return StageResult(entry, reused)


def clustered(
    cache: StageCache,
    data: Dataset,
    previous: StageResult,
    cluster_cfg: ClusterConfig,
    train_cfg: TrainConfig,
    seed: int,
    rule: InputRule,
    on_epoch_end: EpochHook | None = None,
) -> StageResult:
    """Cluster the previous stage's weights and fine-tune the centroids (or reuse the result).

    The clusters, and kept zeros, are verified inside.
    """
    from fallopt.compress.cluster import cluster_and_fine_tune

    key = clustered_key(previous.entry.meta["key"], cluster_cfg, train_cfg, seed)

    def build(out: Path) -> dict[str, Any]:
        seed_everything(seed)
        outcome = cluster_and_fine_tune(
            previous.model_file, data.train, data.val, cluster_cfg, train_cfg, seed,
            out / MODEL_FILE, on_epoch_end, rule,
        )  # fmt: skip
        return {**outcome.as_meta(), "threads": training_threads()}

    entry, reused = cache.get_or_build("clustered", key, build)
    return StageResult(entry, reused)


def outcome(stage: StageResult) -> Outcome:
    """What a prune or cluster stage changed, as its entry recorded it."""
    return Outcome.from_meta(stage.entry.meta)
