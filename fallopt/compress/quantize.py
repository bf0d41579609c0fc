"""Convert a Keras model to TFLite: float32, dynamic, float16, int8, QAT, PQAT, CQAT, PCQAT.

The quantization-aware modes fine-tune with fake quantization first: pqat keeps the pruned
zeros, cqat the weight clusters, pcqat both.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

AWARE = tuple(mode for mode in QuantMode if mode.aware)
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


# What post-training int8, the alternative check_quantizable offers, keeps of what each mode
# would preserve (measured: pruned zeros and <= k values per output channel survive it).
_INT8_KEEPS = {
    QuantMode.pqat: " (post-training int8 keeps the pruned zeros too)",
    QuantMode.cqat: " (post-training int8 keeps the clusters per output channel too)",
    QuantMode.pcqat: " (post-training int8 keeps the zeros and, per output channel, the clusters)",
}


def check_quantizable(model: tf_keras.Model, mode: QuantMode) -> None:
    """Refuse, before any training, a model tfmot's QAT cannot wrap.

    tfmot supports BatchNormalization only right after a Conv2D or DepthwiseConv2D without
    activation (it folds the pair, as in MobileNetV2); the lab's Conv2D(relu) -> BatchNorm
    order is rejected deep inside tfmot. A nested model is checked as the flat model QAT
    will wrap, each BatchNorm against the layer that feeds it. The same holds for every
    aware mode: pqat, cqat and pcqat wrap the model as qat does, with other weight quantizers.
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
                f"-> BatchNorm -> ReLU) or quant=int8{_INT8_KEEPS.get(mode, '')}"
            )


@functools.cache
def _cluster_preserve_scheme() -> type:
    """The tfmot cluster-preserving scheme, with a fresh weight quantizer for every layer.

    tfmot 0.8.1's `Default8bitClusterPreserveQuantizeRegistry` makes one weight quantizer per
    layer class and hands it to every Dense (and every Conv2D) layer. Built for a layer
    without zeros, that shared quantizer sets its `preserve_sparsity` to False ("apply CQAT
    instead"), and the flag is read at every call: one zero-free layer switches zero
    preservation off for all layers of its class. Measured: conv2 and dense1 pruned, conv1
    and output not, PCQAT left 0 of 2,048 zeros of dense1 in the int8 file; with a quantizer
    per layer all of them survive. (A class, made on first use: tfmot imports TensorFlow.)
    """
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (  # noqa: E501
        cluster_preserve_quantize_registry as cpqr,
    )

    class OwnQuantizers(cpqr.Default8bitClusterPreserveQuantizeRegistry):
        def __init__(self, preserve_sparsity: bool) -> None:
            super().__init__(preserve_sparsity)
            self._preserve = preserve_sparsity

        def get_quantize_config(self, layer: Any) -> Any:
            # Make the quantizers anew, so that this layer gets its own.
            cpqr.ClusterPreserveQuantizeRegistry.__init__(self, self._preserve)
            return super().get_quantize_config(layer)

    combine = tfmot.experimental.combine

    class ClusterPreserveScheme(combine.Default8BitClusterPreserveQuantizeScheme):
        def get_quantize_registry(self) -> Any:
            return OwnQuantizers(self.preserve_sparsity)

    return ClusterPreserveScheme


def _aware_scheme(mode: QuantMode) -> Any:
    """The tfmot quantize scheme that makes `mode`'s quantization-aware model.

    qat: tfmot's default (what `quantize_model` uses); pqat: keeps pruned zeros; cqat: keeps
    the weight clusters; pcqat: keeps both. tfmot's cluster-preserving scheme defaults to
    preserving zeros, so cqat must say False.
    """
    import tensorflow_model_optimization as tfmot

    schemes = {
        QuantMode.qat: tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme,
        QuantMode.pqat: tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme,
        QuantMode.cqat: lambda: _cluster_preserve_scheme()(preserve_sparsity=False),
        QuantMode.pcqat: lambda: _cluster_preserve_scheme()(preserve_sparsity=True),
    }
    return schemes[mode]()


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
    """Fine-tune a fresh copy of the model with fake quantization.

    pqat keeps the pruned zeros, cqat the weight clusters (each kernel's values, found again
    from the weights), pcqat both. Their input is the stripped model of the previous stage.
    Returns the quantization-aware model and the fine-tune's per-epoch history.
    """
    # tfmot refuses a model nested in another ("not supported"): QAT wraps the flat copy.
    model = flatten_model(keras().models.load_model(model_file, compile=False))
    check_quantizable(model, mode)
    aware = _wrap_for_qat(model, mode)
    history = fit(aware, train, val, train_cfg, epochs, seed, on_epoch_end, rule=rule)
    return aware, history


@timed("train")  # tfmot's part of the quantization-aware fine-tune
def _wrap_for_qat(model: tf_keras.Model, mode: QuantMode) -> tf_keras.Model:
    import tensorflow_model_optimization as tfmot

    qkeras = tfmot.quantization.keras
    return qkeras.quantize_apply(qkeras.quantize_annotate_model(model), _aware_scheme(mode))


@timed("convert")
def convert(
    model: tf_keras.Model,
    mode: QuantMode,
    representative: np.ndarray | None = None,
    sparse_weights: bool = False,
) -> bytes:
    """The model as a TFLite flatbuffer in the given mode.

    `representative` (float32 images) is required for int8, whose input and output are int8.
    For the aware modes (qat, pqat, cqat, pcqat), `model` is the quantization-aware model,
    whose fake quantization gives int8 weights and activations (float32 input and output).
    `sparse_weights` stores weights in TFLite's sparse format.
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
