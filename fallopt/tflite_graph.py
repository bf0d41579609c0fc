"""What a `.tflite` file holds, read from its flatbuffer: ops, tensors, MACs, peak activations.

Offline and without TensorFlow or an interpreter (only LiteRT's generated schema), so these
figures exist wherever fallopt runs, TensorFlow Lite Micro installed or not. Only the main
subgraph is read: the models fallopt converts have no control flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from ai_edge_litert import schema_py_generated as schema

# Ops whose input 1 is a weight tensor.
WEIGHT_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})
# How the TF op doing a Keras weight layer's work is named in a converted tensor's name
# (`t/conv1/Conv2D`, `t/quant_dense1/MatMul;...`): the part after the layer's name.
KERAS_WEIGHT_OP_STEMS = (
    "Conv2D", "MatMul", "BiasAdd", "depthwise", "convolution", "conv2d_transpose", "Tensordot"
)  # fmt: skip
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
# Bits per element: INT4 packs two to a byte.
_TYPE_BITS = {"FLOAT32": 32, "FLOAT16": 16, "FLOAT64": 64, "INT64": 64, "INT32": 32,
              "UINT32": 32, "INT16": 16, "UINT16": 16, "INT8": 8, "UINT8": 8, "BOOL": 8,
              "INT4": 4}  # fmt: skip


@dataclass(frozen=True)
class Tensor:
    """One tensor of the subgraph; `constant` ones are stored in the file (weights, biases)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # the schema's name: INT8, FLOAT32, ...
    constant: bool
    scale: float | None  # the first quantization scale and zero point, if quantized
    zero_point: int | None

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        return -(-int(np.prod(self.shape, dtype=np.int64)) * _TYPE_BITS[self.dtype] // 8)


@dataclass(frozen=True)
class Op:
    """One operator: its builtin name (CONV_2D, ...) and tensor indices (-1: absent input)."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def _ints(values: np.ndarray | int) -> tuple[int, ...]:
    return tuple(int(v) for v in values) if isinstance(values, np.ndarray) else ()


def _op_name(model: schema.Model, index: int) -> str:
    code = model.OperatorCodes(index)
    # Codes above 127 live in BuiltinCode; the deprecated byte holds the rest.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
        return "CUSTOM:" + code.CustomCode().decode()
    return _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")


def _tensor(model: schema.Model, t: schema.Tensor) -> Tensor:
    buffer = model.Buffers(t.Buffer())
    q = t.Quantization()
    quantized = q is not None and q.ScaleLength() > 0
    return Tensor(
        name=t.Name().decode(),
        shape=_ints(t.ShapeAsNumpy()),
        dtype=_TYPE_NAMES[t.Type()],
        # Buffer 0 is the empty sentinel; data is inline or, in files > 2 GB, at an offset.
        constant=t.Buffer() != 0 and (buffer.DataLength() > 0 or buffer.Size() > 0),
        scale=float(q.Scale(0)) if quantized else None,
        zero_point=int(q.ZeroPoint(0)) if quantized and q.ZeroPointLength() else None,
    )


@dataclass(frozen=True)
class Graph:
    """The main subgraph of a `.tflite` file."""

    tensors: tuple[Tensor, ...]
    ops: tuple[Op, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @classmethod
    def from_bytes(cls, content: bytes) -> Graph:
        """Parse a `.tflite` flatbuffer.

        Raises:
            ValueError: when `content` is not a TFLite model (no `TFL3` identifier).
        """
        if content[4:8] != b"TFL3":
            raise ValueError("not a TFLite flatbuffer (no TFL3 file identifier)")
        model = schema.Model.GetRootAs(content, 0)
        sg = model.Subgraphs(0)
        return cls(
            tensors=tuple(_tensor(model, sg.Tensors(i)) for i in range(sg.TensorsLength())),
            ops=tuple(
                Op(
                    _op_name(model, op.OpcodeIndex()),
                    _ints(op.InputsAsNumpy()),
                    _ints(op.OutputsAsNumpy()),
                )  # fmt: skip
                for op in (sg.Operators(k) for k in range(sg.OperatorsLength()))
            ),
            inputs=_ints(sg.InputsAsNumpy()),
            outputs=_ints(sg.OutputsAsNumpy()),
        )

    def op_names(self) -> list[str]:
        """The distinct ops, in order of first use: what an op resolver must register."""
        return list(dict.fromkeys(op.name for op in self.ops))

    def macs_per_op(self) -> dict[str, int]:
        """Multiply-accumulates of each conv, depthwise conv and fully connected op.

        Keyed `<index>:<op>`. Filters are stored [out, kh, kw, in per group] (conv),
        [1, kh, kw, channels] (depthwise) and [units, depth] (fully connected).
        """
        found = {}
        for k, op in enumerate(self.ops):
            out = int(np.prod(self.tensors[op.outputs[0]].shape, dtype=np.int64))
            weights = self.tensors[op.inputs[1]].shape if len(op.inputs) > 1 else ()
            if op.name == "CONV_2D":
                found[f"{k}:{op.name}"] = out * weights[1] * weights[2] * weights[3]
            elif op.name == "DEPTHWISE_CONV_2D":
                found[f"{k}:{op.name}"] = out * weights[1] * weights[2]
            elif op.name == "FULLY_CONNECTED":
                found[f"{k}:{op.name}"] = out * weights[-1]
        return found

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one inference (conv, depthwise conv, fully connected)."""
        return sum(self.macs_per_op().values())

    @cached_property
    def live_bytes(self) -> list[int]:
        """Bytes of the non-constant tensors alive while each op runs.

        A tensor lives from the op that writes it (graph inputs: from the first op) to the
        last op that reads it (graph outputs: to the end), as TFLM's memory planner sees it.
        """
        first: dict[int, int] = dict.fromkeys(self.inputs, 0)
        last: dict[int, int] = dict.fromkeys(self.inputs, 0)
        for k, op in enumerate(self.ops):
            for t in (*op.outputs, *(i for i in op.inputs if i >= 0)):
                first.setdefault(t, k)
                last[t] = k
        for t in self.outputs:
            last[t] = len(self.ops) - 1
        live = [t for t in first if not self.tensors[t].constant]
        return [
            sum(self.tensors[t].nbytes for t in live if first[t] <= k <= last[t])
            for k in range(len(self.ops))
        ]

    @property
    def peak_activation_bytes(self) -> int:
        """The most activation bytes alive at once: a lower bound on TFLM's arena.

        TFLM's arena adds its persistent data (a few KiB) and, for branching graphs, what its
        planner cannot pack; on chains the two agreed byte for byte (tests/test_tflm.py).
        """
        return max(self.live_bytes, default=0)

    @property
    def input(self) -> Tensor:
        """The (first) input tensor."""
        return self.tensors[self.inputs[0]]

    @property
    def output(self) -> Tensor:
        """The (first) output tensor."""
        return self.tensors[self.outputs[0]]
