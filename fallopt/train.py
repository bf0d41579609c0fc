"""Baseline training: seeded, deterministic on CPU, normalising uint8 images per batch."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from fallopt.augment import Augmenter
from fallopt.backend import keras
from fallopt.config import Optimizer, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.timing import timed

if TYPE_CHECKING:
    import tensorflow as tf
    import tf_keras

EpochHook = Callable[[int, dict[str, float]], None]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and TensorFlow, and make TensorFlow's ops deterministic."""
    import tensorflow as tf

    keras().utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def batches(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rule: InputRule = UNIT,
    augmenter: Augmenter | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline over a split; images become float32 under `rule` batch by batch.

    Only indices go through tf.data; each batch is gathered from the uint8 array when it is
    needed. `from_tensor_slices` would copy the whole split into a tensor, and a full
    shuffle buffer of its images would hold it once more. Shuffling the indices with the
    same seed gives the same order as shuffling the images did.

    With an `augmenter` (training batches only) each batch is changed at random under a key
    that tf.data draws for it from `augmenter.seed`, anew on every pass over the data set as
    it reshuffles: each epoch changes the images differently, and a run with the same seed
    repeats every epoch's changes. A generator advanced call by call would make each batch's
    change depend on all calls before it: on how far an iterator stopped early (a `take`,
    `steps_per_epoch`) had prefetched, and on anyone else reading the data set.
    """
    import tensorflow as tf

    x, y = split.x, split.y
    ds = tf.data.Dataset.range(len(split))
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    scale, low = tf.constant(rule.scale, tf.float32), tf.constant(rule.low, tf.float32)

    def scaled(pixels: tf.Tensor) -> tf.Tensor:
        pixels = pixels * scale
        return pixels + low if rule.low else pixels

    def gather(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(
            lambda i: (x[i], y[i]), [index], (tf.uint8, tf.int64), stateful=False
        )
        images.set_shape((None, *x.shape[1:]))
        labels.set_shape((None,))
        return scaled(tf.cast(images, tf.float32)), labels

    def gather_augmented(index: tf.Tensor, key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, transforms, labels = tf.numpy_function(
            lambda i, k: (*augmenter.prepare(x[i], k), y[i]),
            [index, key],
            (tf.uint8, tf.float32, tf.int64),
            stateful=False,  # a function of the indices and the key alone
        )
        images.set_shape((None, *x.shape[1:]))
        transforms.set_shape((None, 8))
        labels.set_shape((None,))
        return scaled(augmenter.warp(tf.cast(images, tf.float32), transforms)), labels

    if augmenter is None:
        ds = ds.map(gather)
    else:
        keys = tf.data.Dataset.random(seed=augmenter.seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, keys)).map(gather_augmented)
    return ds.prefetch(tf.data.AUTOTUNE)


def compile_model(model: tf_keras.Model, cfg: TrainConfig) -> None:
    """Attach the optimizer, the loss for integer labels and accuracy."""
    optimizers = keras().optimizers
    make = {
        Optimizer.adam: optimizers.Adam,
        Optimizer.sgd: optimizers.SGD,
        Optimizer.rmsprop: optimizers.RMSprop,
    }[cfg.optimizer]
    model.compile(
        optimizer=make(learning_rate=cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


@timed("train")
def fit(
    model: tf_keras.Model,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    epochs: int,
    seed: int,
    on_epoch_end: EpochHook | None = None,
    callbacks: list[tf_keras.callbacks.Callback] | None = None,
    rule: InputRule = UNIT,
) -> dict[str, list[float]]:
    """Compile with `cfg`'s optimizer and fit for `epochs`; returns the per-epoch history.

    `on_epoch_end(epoch, logs)` is called after every epoch (0-based), e.g. to stream
    metrics to MLflow; `callbacks` are passed to Keras (e.g. tfmot's UpdatePruningStep).
    The training batches are augmented as `cfg.augment` says; validation batches never are.
    """
    k = keras()
    compile_model(model, cfg)
    callbacks = list(callbacks or [])
    if on_epoch_end is not None:
        callbacks.append(
            k.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end(
                    epoch, {name: float(v) for name, v in (logs or {}).items()}
                )
            )
        )
    augmenter = Augmenter.from_config(cfg, seed)
    if augmenter is not None:
        log.info("[train] augmenting training batches: %s", augmenter.describe())
    history = model.fit(
        batches(train, cfg.batch_size, shuffle=True, seed=seed, rule=rule, augmenter=augmenter),
        validation_data=batches(val, cfg.batch_size, rule=rule),
        epochs=epochs,
        callbacks=callbacks,
        # A progress bar on a terminal; one line per epoch in logs and CI.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return {name: [float(v) for v in values] for name, values in history.history.items()}


def train_model(
    model: tf_keras.Model,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    seed: int,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule = UNIT,
) -> dict[str, list[float]]:
    """Train a baseline for `cfg.epochs`; see `fit`."""
    return fit(model, train, val, cfg, cfg.epochs, seed, on_epoch_end, rule=rule)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Batches per epoch, as Keras counts them: ceil(n / batch)."""
    return -(-n_train // batch_size)
