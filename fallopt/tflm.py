"""TensorFlow Lite Micro on the host: a model's minimal tensor arena, and its predictions.

The `tflite-micro` package runs TFLM's C++ interpreter with its reference kernels. Its
interpreter allocates every tensor when it is built, so "does it allocate in N bytes" is
one construction: the smallest N is found by bisection, exact to `ARENA_STEP` bytes. TFLM
reports failures by writing to file descriptor 2 from C, never to Python: that descriptor
is captured around every call, both to keep a bisection's dozen "Failed to resize buffer"
lines out of the log and to say why a model cannot run at all.

The wheel exists for x86-64 Linux (Python 3.10-3.13). Elsewhere `unavailable()` says why,
and the offline figures (`fallopt.tflite_graph`) still work.
"""

from __future__ import annotations

import logging
import re
import time
from functools import cache
from types import ModuleType

import numpy as np

from fallopt.backend import stderr_captured
from fallopt.errors import FalloptError
from fallopt.target import TFLM_REFUSED
from fallopt.tflite_graph import WEIGHT_OPS, Graph
from fallopt.timing import timed

log = logging.getLogger(__name__)

ARENA_STEP = 16  # TFLM aligns its arena's buffers to 16 bytes
# Beyond any arena worth measuring on a microcontroller: a model that does not allocate in
# this much cannot run at all (a kernel refused it).
ARENA_CEILING = 256 << 20
PROGRESS_SECONDS = 10.0

# TFLite builtin op -> `tflite::MicroMutableOpResolver` method, parsed from TFLM's
# micro_mutable_op_resolver.h (tflite-micro 90b983c2b3f1, 2026-08-20; docs/tflm-research.md
# §7). The casing cannot be guessed (AddBatchToSpaceNd, AddPrelu, AddSvdf, AddL2Pool2D).
TFLM_OP_METHOD: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin", "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast",
    "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEPTH_TO_SPACE": "AddDepthToSpace", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "ELU": "AddElu",
    "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected",
    "GATHER": "AddGather", "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater",
    "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish", "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog",
    "LOGICAL_AND": "AddLogicalAnd", "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr",
    "LOGISTIC": "AddLogistic", "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MINIMUM": "AddMinimum",
    "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual",
    "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}  # fmt: skip


class TflmUnsupported(FalloptError):
    """TFLM cannot run the model: a kernel refused it (hybrid or float16 ops, say)."""


@cache
def _runtime() -> ModuleType | str:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as e:
        return f"tflite-micro is not installed here ({e}; wheels exist for x86-64 Linux only)"
    return runtime


def unavailable() -> str | None:
    """Why TFLM cannot run in this Python, or None when it can."""
    runtime = _runtime()
    return runtime if isinstance(runtime, str) else None


def _interpreter(content: bytes, arena_bytes: int) -> object:
    """TFLM's interpreter with its tensors allocated in `arena_bytes`.

    Raises:
        RuntimeError: when they do not fit or a kernel refuses the model; `.args[1]` holds
            what TFLM wrote to descriptor 2.
    """
    runtime = _runtime()
    if isinstance(runtime, str):
        raise FalloptError(runtime)
    with stderr_captured() as written:
        try:
            return runtime.Interpreter.from_bytes(content, arena_size=arena_bytes)
        except RuntimeError as e:
            failure = e
    raise RuntimeError(str(failure), b"".join(written).decode(errors="replace"))


def allocates(content: bytes, arena_bytes: int) -> bool:
    """Whether TFLM allocates the model in an arena of `arena_bytes`."""
    try:
        _interpreter(content, arena_bytes)
    except RuntimeError:
        return False
    return True


def _reason(written: str) -> str:
    """TFLM's own words on why a kernel refused the model, without source paths."""
    lines = [re.sub(r"^\S+\.(cc|h)(:\d+)? ", "", line.strip()) for line in written.splitlines()]
    kept = [line.rstrip(".") for line in lines if line and not line.startswith("Failed ")]
    return "; ".join(kept) or "TFLM failed to allocate tensors without saying why"


def _known_obstacle(graph: Graph) -> str | None:
    """What TFLM has no kernel for, in plain words: an op, or a variant conversions make."""
    missing = [op for op in graph.op_names() if op not in TFLM_OP_METHOD]
    if missing:
        return f"no TFLM kernel for {', '.join(missing)}"
    for op in graph.ops:
        inputs = [graph.tensors[i] for i in op.inputs if i >= 0]
        if op.name == "DEQUANTIZE" and inputs[0].dtype == "FLOAT16":
            return "float16 weights (quant=float16): TFLM has no float16 kernels"
        if op.name in WEIGHT_OPS and inputs[0].dtype == "FLOAT32" and inputs[1].dtype == "INT8":
            return ("int8 weights with float activations (quant=dynamic): TFLM has no hybrid "
                    "kernels")  # fmt: skip
    return None


@timed("tflm")
def minimal_arena(content: bytes, graph: Graph) -> int:
    """The smallest arena, to `ARENA_STEP` bytes, in which TFLM allocates the model.

    `graph` is the same file's; its peak activation bytes set where the search starts.

    Raises:
        TflmUnsupported: when the model does not allocate even in `ARENA_CEILING` bytes.
    """
    hi = max(1 << 20, 2 * graph.peak_activation_bytes)
    while True:
        try:
            _interpreter(content, hi)
            break
        except RuntimeError as e:
            if hi >= ARENA_CEILING:
                said = f"TFLM: {_reason(e.args[1])}"
                known = _known_obstacle(graph)
                why = f"{known} ({said})" if known else said
                raise TflmUnsupported(f"{TFLM_REFUSED}: {why}") from None
            hi = min(4 * hi, ARENA_CEILING)
    lo = 0  # invariant: fails at lo (or lo is 0), allocates at hi
    while hi - lo > ARENA_STEP:
        mid = (lo + hi) // 2 // ARENA_STEP * ARENA_STEP
        if allocates(content, mid):
            hi = mid
        else:
            lo = mid
    return hi


@timed("tflm")
def classes(content: bytes, arena_bytes: int, inputs: np.ndarray) -> np.ndarray:
    """The class TFLM predicts for each input, one invoke per image, in `arena_bytes`.

    `inputs` are already what the model's input tensor takes (int8 for a full-integer
    model), batch first; TFLM's tensors have batch 1.
    """
    interpreter = _interpreter(content, arena_bytes)
    found = np.empty(len(inputs), dtype=np.int64)
    start = last = time.perf_counter()
    for i, x in enumerate(inputs):
        interpreter.set_input(x[None], 0)
        interpreter.invoke()
        found[i] = int(np.argmax(interpreter.get_output(0)[0]))
        if time.perf_counter() - last > PROGRESS_SECONDS:
            last = time.perf_counter()
            log.info("[tflm] %d of %d images, %.0f s", i + 1, len(inputs), last - start)
    return found
