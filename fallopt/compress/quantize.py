"""Convert a Keras model to TFLite: float32, dynamic range, float16 or full int8."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fallopt.config import QuantMode
from fallopt.data import Split, to_float
from fallopt.errors import ConfigError

if TYPE_CHECKING:
    import tf_keras


def representative_images(train: Split, n: int, seed: int) -> np.ndarray:
    """Draw n training images (float32, as the model sees them) to calibrate int8 ranges.

    Raises:
        ConfigError: when the training split has fewer than n images.
    """
    if len(train) < n:
        raise ConfigError(
            f"quant.representative_samples={n} but the training split has only {len(train)} "
            f"images: lower quant.representative_samples (or raise dataset.limit)"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))
    return to_float(train.x[chosen])


def convert(
    model: tf_keras.Model, mode: QuantMode, representative: np.ndarray | None = None
) -> bytes:
    """The model as a TFLite flatbuffer in the given mode.

    `representative` (float32 images) is required for int8, whose input and output are int8.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode is not QuantMode.none:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode is QuantMode.float16:
        converter.target_spec.supported_types = [tf.float16]
    elif mode is QuantMode.int8:
        if representative is None or len(representative) == 0:
            raise ConfigError("quant=int8 needs representative images to calibrate")
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()
