"""Convert a Keras model to TFLite: float32, dynamic range, float16, full int8, QAT, PQAT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fallopt.backend import keras
from fallopt.compress.prune import flatten_model
from fallopt.config import QuantMode, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError
from fallopt.timing import timed
from fallopt.train import EpochHook, fit

if TYPE_CHECKING:
    import tf_keras

AWARE = (QuantMode.qat, QuantMode.pqat)
# Modes whose files compute in int8 between layers, as a microcontroller does.
FULL_INTEGER = (QuantMode.int8, *AWARE)


def representative_images(train: Split, n: int, seed: int, rule: InputRule = UNIT) -> np.ndarray:
    """Draw n training images (float32, as the model sees them) to calibrate int8 ranges.

    A training split smaller than n gives all its images: the run logs how many it used
    (`representative_samples_used`), so a small data set still converts.
    """
    n = min(n, len(train))
    chosen = np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))
    return rule.apply(train.x[chosen])


def check_quantizable(model: tf_keras.Model, mode: QuantMode) -> None:
    """Refuse, before any training, a model tfmot's QAT cannot wrap.

    tfmot supports BatchNormalization only right after a Conv2D or DepthwiseConv2D without
    activation (it folds the pair, as in MobileNetV2); the lab's Conv2D(relu) -> BatchNorm
    order is rejected deep inside tfmot. A nested model is checked as the flat model QAT
    will wrap, each BatchNorm against the layer that feeds it.
    """
    layers = keras().layers
    for layer in flatten_model(model).layers:
        if not isinstance(layer, layers.BatchNormalization):
            continue
        feeds = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else None
        conv = isinstance(feeds, layers.Conv2D | layers.DepthwiseConv2D)
        if not conv or feeds.activation.__name__ != "linear":
            after = f"after {feeds.name}" if isinstance(feeds, layers.Layer) else "first"
            why = "which has an activation" if conv else "not a convolution"
            raise ConfigError(
                f"quant={mode.value} cannot wrap layer {layer.name} (BatchNormalization "
                f"{after}, {why}): quantization-aware training needs BatchNorm right after a "
                "Conv2D or DepthwiseConv2D without activation. Use model=cauca_cnn_qat (Conv "
                "-> BatchNorm -> ReLU) or quant=int8"
            )


def quantization_aware_fine_tune(
    model_file: Path,
    mode: QuantMode,
    train: Split,
    val: Split,
    train_cfg: TrainConfig,
    epochs: int,
    seed: int,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule = UNIT,
) -> tuple[tf_keras.Model, dict[str, list[float]]]:
    """Fine-tune a fresh copy of the model with fake quantization (pqat keeps its zeros).

    Returns the quantization-aware model and the fine-tune's per-epoch history.
    """
    import tensorflow_model_optimization as tfmot

    qkeras = tfmot.quantization.keras
    # tfmot refuses a model nested in another ("not supported"): QAT wraps the flat copy.
    model = flatten_model(keras().models.load_model(model_file, compile=False))
    check_quantizable(model, mode)
    if mode is QuantMode.pqat:
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        aware = qkeras.quantize_apply(qkeras.quantize_annotate_model(model), scheme)
    else:
        aware = qkeras.quantize_model(model)
    history = fit(aware, train, val, train_cfg, epochs, seed, on_epoch_end, rule=rule)
    return aware, history


@timed("convert")
def convert(
    model: tf_keras.Model,
    mode: QuantMode,
    representative: np.ndarray | None = None,
    sparse_weights: bool = False,
) -> bytes:
    """The model as a TFLite flatbuffer in the given mode.

    `representative` (float32 images) is required for int8, whose input and output are int8.
    For qat and pqat, `model` is the quantization-aware model. `sparse_weights` stores
    weights in TFLite's sparse format.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse_weights else []
    if mode is not QuantMode.none:
        optimizations.append(tf.lite.Optimize.DEFAULT)
    converter.optimizations = optimizations
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
