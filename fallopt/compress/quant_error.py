"""Per-layer int8 error (TF's QuantizationDebugger), and int8 files with some layers float.

The debugger calibrates the model as `quantize.convert` does for `quant=int8`, quantizes it
with a NumericVerify op after every quantized op, runs the representative images, and gives
per op the error of its int8 output against the float op on the same input. `rmse / scale`
(the root mean squared error in units of the output's quantization step) is 1/sqrt(12) =
0.29 for ideal rounding; TF's tutorial flags ops above 0.7.

The same debugger, given the output tensor names of some ops (`denylisted_nodes`), quantizes
everything else and leaves those ops float32, with DEQUANTIZE before and QUANTIZE after them:
that is `quant.float_layers`. Measured on TF 2.21 (research notes of issue 17, section D):

- The debugger ignores the converter's `inference_input_type`; `fully_quantize=True` gives
  int8 input and output as `quant=int8` has. A model-level metric would need float I/O on
  the converter, so none is asked for.
- `TFLITE_BUILTINS_INT8` in `supported_ops` does not stop the float ops: the debugger
  quantizes the calibrated model itself.
- A file with float ops needs float kernels, QUANTIZE and DEQUANTIZE on the device (TFLM has
  them) and float weights' flash: it is no longer full-integer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fallopt.backend import keras, stderr_captured
from fallopt.errors import ConfigError, FalloptError
from fallopt.tflite_graph import KERAS_WEIGHT_OP_STEMS, WEIGHT_OPS, Graph
from fallopt.timing import timed

if TYPE_CHECKING:
    import tensorflow as tf
    import tf_keras

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpError:
    """The int8 error of one quantized op, as the debugger measured it.

    `layer` is the Keras layer whose weights the op uses, or else the one its output
    tensor's name belongs to ("" if none: e.g. the final SOFTMAX, named after the model's
    call). `tensor` is the op's output tensor name as the debugger gives it, which is what
    `denylisted_nodes` takes.
    """

    layer: str
    op: str
    tensor: str
    rmse_over_scale: float
    mean_squared_error: float
    scale: float


def _leaves(model: tf_keras.Model) -> Iterator[tf_keras.layers.Layer]:
    """The layers of `model` and of the models nested in it, models themselves left out."""
    k = keras()
    for layer in model.layers:
        if isinstance(layer, k.Model):
            yield from _leaves(layer)
        elif not isinstance(layer, k.layers.InputLayer):
            yield layer


def _has_weight_op(layer: tf_keras.layers.Layer) -> bool:
    """Whether the layer converts to a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op."""
    layers = keras().layers
    kinds = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Dense)
    return isinstance(layer, kinds)


def weight_layers(model: tf_keras.Model) -> list[str]:
    """Names of the layers that can be kept float: those with Conv or Dense weights."""
    return [layer.name for layer in _leaves(model) if _has_weight_op(layer)]


def _layer_of(tensor: str, names: list[str], weighted: set[str]) -> str:
    """The Keras layer a `;`-separated TFLite tensor name belongs to, "" if none.

    A part `model/conv1/BiasAdd` belongs to `conv1`. A fused op's name lists several layers
    (`t/relu1/Relu;t/conv1/Conv2D`): the one with weights wins, else the first.
    """
    found = [
        segment
        for part in tensor.split(";")
        for segment in part.split("/")
        if segment in names  # a list: a few dozen layers
    ]
    return next((name for name in found if name in weighted), found[0] if found else "")


def _guess_layer(tensor: str) -> str:
    """The layer a weight op's tensor name belongs to, without the model: "" if none.

    The part naming the TF op that does the work (`t/dense1/MatMul`) has the layer just
    before it.
    """
    for part in tensor.split(";"):
        segments = part.split("/")
        if len(segments) >= 2 and segments[-1].startswith(KERAS_WEIGHT_OP_STEMS):
            return segments[-2]
    return ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what the debugger prints; show it only if it fails.

    It warns that tf.lite.Interpreter is deprecated and about input statistics, prints its
    quantizer's settings, and LiteRT's XNNPACK line, on every call.
    """
    written: list[bytes] = []
    try:
        with warnings.catch_warnings(), stderr_captured() as written:
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        for text in written:
            sys.stderr.write(text.decode(errors="replace"))
        raise
    for text in written:
        for line in text.decode(errors="replace").splitlines():
            log.debug("[quant_error] %s", line)


def _converter(model: tf_keras.Model, representative: np.ndarray) -> tf.lite.TFLiteConverter:
    """`quantize.convert`'s int8 settings, as an object the debugger calibrates.

    No int8 inference types: the debugger ignores them (`fully_quantize` sets the I/O).
    """
    import tensorflow as tf

    if representative is None or len(representative) == 0:
        raise ConfigError("quant=int8 needs representative images to calibrate")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def _debugger(model: tf_keras.Model, representative: np.ndarray, debug_images: np.ndarray):  # noqa: ANN202
    """A debugger for `model` calibrated on `representative`, run over `debug_images`."""
    import tensorflow as tf

    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=_converter(model, representative),
        debug_dataset=lambda: ([image[None]] for image in debug_images),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(fully_quantize=True),
    )
    debugger.run()
    return debugger


def _rows(debugger, model: tf_keras.Model) -> list[OpError]:  # noqa: ANN001
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    names = [layer.name for layer in _leaves(model)]
    weighted = set(weight_layers(model))
    out = []
    for row in csv.DictReader(io.StringIO(buffer.getvalue())):
        mse, scale = float(row["mean_squared_error"]), float(row["scale"])
        out.append(
            OpError(
                layer=_layer_of(row["tensor_name"], names, weighted),
                op=row["op_name"],
                tensor=row["tensor_name"],
                rmse_over_scale=math.sqrt(mse) / scale if scale else math.inf,
                mean_squared_error=mse,
                scale=scale,
            )
        )
    return out


@timed("convert")
def layer_errors(model: tf_keras.Model, representative: np.ndarray) -> list[OpError]:
    """The int8 error of every quantized op of `model`, in the file's op order.

    Calibrated and measured on `representative` (float32 images as the model sees them, as
    for `quantize.convert`). On the lab CNN at 96x96 the debugger took 3.5 s to build and
    1.2 s to run 100 images (research D).

    Raises:
        ConfigError: with no representative images.
    """
    with _quiet():
        debugger = _debugger(model, representative, representative)
        return _rows(debugger, model)


def check_float_layers(model: tf_keras.Model, names: list[str]) -> None:
    """Refuse a `quant.float_layers` name that is not a layer of `model` with weights.

    Raises:
        ConfigError: naming the unknown layers and listing the ones that can be kept float.
    """
    weighted = weight_layers(model)
    unknown = [name for name in names if name not in weighted]
    if not unknown:
        return
    others = {layer.name: type(layer).__name__ for layer in _leaves(model)}
    lacking = [name for name in unknown if name not in others]
    without = [f"{name} ({others[name]})" for name in unknown if name in others]
    why = []
    if lacking:
        why.append(f"{', '.join(lacking)}, which model {model.name} lacks")
    if without:
        why.append(f"{', '.join(without)}, which has no Conv or Dense weights to keep float")
    raise ConfigError(
        f"quant.float_layers names {'; and '.join(why)}; its layers with weights: "
        f"{', '.join(weighted) or 'none'}"
    )


def _weight_ops(graph: Graph, names: list[str] | None, weighted: set[str]) -> list[tuple[str, int]]:
    """(layer, op index) of every weight op of a file; layer "" where none is found."""
    out = []
    for k, op in enumerate(graph.ops):
        if op.name in WEIGHT_OPS:
            tensor = graph.tensors[op.outputs[0]].name
            layer = _layer_of(tensor, names, weighted) if names else _guess_layer(tensor)
            out.append((layer, k))
    return out


def _computes_in_float(graph: Graph, k: int) -> bool:
    op = graph.ops[k]
    used = [*(i for i in op.inputs if i >= 0), *op.outputs]
    return all(graph.tensors[i].dtype == "FLOAT32" for i in used)


def check_float_ops(content: bytes, model: tf_keras.Model, names: list[str]) -> None:
    """Raise unless each named layer's weight op computes in float32 and the I/O is int8.

    Raises:
        FalloptError: naming the first layer whose op is missing or quantized, or the I/O.
    """
    graph = Graph.from_bytes(content)
    ops = _weight_ops(graph, [layer.name for layer in _leaves(model)], set(weight_layers(model)))
    for name in names:
        mine = [k for layer, k in ops if layer == name]
        if not mine:
            raise FalloptError(f"quant.float_layers: no op of layer {name} in the int8 file")
        quantized = [k for k in mine if not _computes_in_float(graph, k)]
        if quantized:
            op = graph.ops[quantized[0]]
            dtypes = [graph.tensors[i].dtype for i in (*op.inputs, *op.outputs) if i >= 0]
            raise FalloptError(
                f"quant.float_layers: layer {name}'s {op.name} is not float32 in the converted "
                f"file (tensors {', '.join(dtypes)}): the converter did not keep it float"
            )
    io_types = (graph.input.dtype, graph.output.dtype)
    if io_types != ("INT8", "INT8"):
        raise FalloptError(
            f"the int8 file with float layers {', '.join(names)} has {io_types[0]} input and "
            f"{io_types[1]} output, not INT8"
        )


@timed("convert")
def convert_with_float_layers(
    model: tf_keras.Model, representative: np.ndarray, names: list[str]
) -> bytes:
    """An int8 file (int8 input and output) with the ops of the named layers left float32.

    As `quantize.convert(model, QuantMode.int8, representative)`, except that every op the
    debugger attributes to a named layer is denylisted: it computes in float32 between a
    DEQUANTIZE and a QUANTIZE. The file is read back to check it (`check_float_ops`).

    Raises:
        ConfigError: a name that is not a layer with weights (`check_float_layers`), or no
            representative images.
        FalloptError: when a named layer's op is not float32 in the file, naming it.
    """
    import tensorflow as tf

    check_float_layers(model, names)
    chosen = set(names)
    with _quiet():
        # One image is enough to list the ops' tensor names; the calibration uses them all.
        debugger = _debugger(model, representative, representative[:1])
        deny = [row.tensor for row in _rows(debugger, model) if row.layer in chosen]
        # Re-quantizes the calibrated model with the denylist; does not calibrate again.
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=deny, fully_quantize=True
        )
        content = debugger.get_nondebug_quantized_model()
    check_float_ops(content, model, names)
    return content


def float_ops(content: bytes, model: tf_keras.Model | None = None) -> list[str]:
    """The weight ops (conv, depthwise conv, fully connected) of a file that output float32.

    Each is named by its Keras layer: `model`'s layers when given, else the layer named in
    the op's tensor name (`t/dense1/MatMul` -> `dense1`); failing both, `<index>:<op>`.
    Empty for a full-integer file.
    """
    graph = Graph.from_bytes(content)
    names = [layer.name for layer in _leaves(model)] if model is not None else None
    weighted = set(weight_layers(model)) if model is not None else set()
    return [
        layer or f"{k}:{graph.ops[k].name}"
        for layer, k in _weight_ops(graph, names, weighted)
        if graph.tensors[graph.ops[k].outputs[0]].dtype == "FLOAT32"
    ]


def propose_float_layers(errors: list[OpError], threshold: float) -> list[str]:
    """Layers with a weight op whose rmse / scale exceeds `threshold`, worst first.

    Only weight ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) count: they are what
    `quant.float_layers` can keep float. A BatchNorm's MUL or ADD above the threshold stays
    in `error_table` for a reader to see, but is not proposed.
    """
    worst: dict[str, float] = {}
    for row in errors:
        if row.layer and row.op in WEIGHT_OPS and row.rmse_over_scale > threshold:
            worst[row.layer] = max(worst.get(row.layer, 0.0), row.rmse_over_scale)
    return sorted(worst, key=lambda name: -worst[name])


def error_table(errors: list[OpError], path: Path) -> Path:
    """The rows as CSV: layer, op, tensor, rmse_over_scale, mean_squared_error, scale."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(OpError)])
        writer.writeheader()
        writer.writerows(asdict(row) for row in errors)
    return path
