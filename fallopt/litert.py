"""Run and inspect `.tflite` files with the LiteRT interpreter (`ai-edge-litert`).

`tf.lite.Interpreter` is deprecated; LiteRT's runs next to TensorFlow. Inference is batched
(the input tensor is resized to the batch), and int8 models get their inputs quantized with
the model's own scale and zero point, exactly as a device would feed them.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from fallopt.backend import native_logs_filtered
from fallopt.data import UNIT, InputRule
from fallopt.tflite_graph import WEIGHT_OPS
from fallopt.timing import timed


def host_cpu() -> str:
    """The CPU's model name, so nobody mistakes a host latency for a device latency."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interpreter(content: bytes, threads: int, xnnpack: bool) -> Interpreter:
    # XNNPACK, LiteRT's default CPU delegate, cannot prepare sparse weight tensors.
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(
        model_content=content, num_threads=threads, experimental_op_resolver_type=resolver
    )


def _uint8(images: np.ndarray) -> np.ndarray:
    # Inputs are mapped per pixel value: any other dtype would index or scale wrongly.
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images


def _allocate(interpreter: Interpreter) -> None:
    # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to descriptor 2
    # here, whatever TF_CPP_MIN_LOG_LEVEL says: filtered as TensorFlow's own native lines are.
    with native_logs_filtered():
        interpreter.allocate_tensors()


class TFLiteModel:
    """A `.tflite` flatbuffer ready to predict class probabilities from uint8 images.

    `xnnpack=False` runs the built-in kernels only (needed for sparse weight storage).
    """

    def __init__(
        self, content: bytes, threads: int = 2, xnnpack: bool = True, rule: InputRule = UNIT
    ) -> None:
        self.content = content
        self.xnnpack = xnnpack
        self.rule = rule
        self.interpreter = _interpreter(content, threads, xnnpack)
        _allocate(self.interpreter)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = 1
        self._table = self._input_table()
        # The usual int8 input (scale 1/255, zero point -128) is v - 128: a bit flip.
        self._flip = self.input_dtype == np.int8 and np.array_equal(
            self._table, np.arange(-128, 128, dtype=np.int8)
        )

    @property
    def input_dtype(self) -> type:
        """The numpy dtype of the model's input (int8 for full-integer models)."""
        return self.input["dtype"]

    @property
    def output_dtype(self) -> type:
        """The numpy dtype of the model's output."""
        return self.output["dtype"]

    def _input_table(self) -> np.ndarray:
        """What each uint8 pixel value becomes at the model's input.

        float32 under the input rule, or that quantized with the input's scale and zero point.
        """
        return self.rule.table(self.input_dtype, *self.input["quantization"])

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """uint8 images as the model's input takes them (a new array)."""
        return self._table[_uint8(x)]

    def _fill_input(self, batch: np.ndarray) -> None:
        """Write `model_input(batch)` straight into the input tensor, in one pass.

        A lookup per pixel costs about as much as a tenth of invoke; a multiply, or for the
        usual int8 input (v - 128) a bit flip, is several times cheaper.
        """
        _uint8(batch)
        target = self.interpreter.tensor(self.input["index"])()
        if self.input_dtype == np.float32:
            np.multiply(batch, self.rule.scale, out=target, dtype=np.float32)
            if self.rule.low:
                np.add(target, np.float32(self.rule.low), out=target)
        elif self._flip:
            np.bitwise_xor(batch, np.uint8(128), out=target.view(np.uint8))
        else:
            np.take(self._table, batch, out=target)
        del target  # the interpreter refuses to invoke while a view of its memory is held

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output_dtype == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    @timed("inference")
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities for uint8 images (n, h, w, c), batch by batch."""
        out = []
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            if len(batch) != self._batch:
                self.interpreter.resize_tensor_input(self.input["index"], batch.shape)
                _allocate(self.interpreter)
                self._batch = len(batch)
            self._fill_input(batch)
            self.interpreter.invoke()
            out.append(self._dequantize(self.interpreter.get_tensor(self.output["index"])))
        return np.concatenate(out)

    @timed("inference")
    def latency_ms(self, image: np.ndarray, repeats: int = 50, warmup: int = 5) -> float:
        """Median milliseconds of one single-image invoke on one thread, after warm-up."""
        interpreter = _interpreter(self.content, 1, self.xnnpack)
        _allocate(interpreter)
        interpreter.set_tensor(self.input["index"], self.model_input(image[None]))
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            interpreter.invoke()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    def weight_sparsity(self) -> float:
        """Fraction of exact zeros in the stored weights of conv and dense ops.

        Reads the tensors the file holds (int8, float16 or float32), following DEQUANTIZE ops
        back to their stored constant, so it shows whether pruned zeros survived conversion.
        """
        ops = self.interpreter._get_ops_details()  # noqa: SLF001 (no public op graph API)
        producer = {o: op for op in ops for o in op["outputs"]}
        zeros = total = 0
        for op in ops:
            if op["op_name"] not in WEIGHT_OPS:
                continue
            index = op["inputs"][1]
            while index in producer and producer[index]["op_name"] == "DEQUANTIZE":
                index = producer[index]["inputs"][0]
            weights = self.interpreter.get_tensor(index)
            zeros += int((weights == 0).sum())
            total += weights.size
        return zeros / total if total else 0.0
