"""The deploy bundle: a run's model as the C++ sources a TensorFlow Lite Micro project builds.

`write_bundle` writes `deploy/`: the model bytes (`model_data.cc/.h`), the constants device
code needs (`model_settings.h`: shapes, quantization, the pixel lookup table, class names,
the tensor arena), a minimal TFLM program that checks itself on one image (`main.cc`,
`sample_image.cc/.h`) and a README. Everything comes from the file's own flatbuffer
(`fallopt.tflite_graph`), not from an interpreter, so the bundle can be written wherever
fallopt runs.

A model TFLM cannot run (a dynamic-range or float16 file, an op TFLM has no kernel for)
still gets its bundle, but its `main.cc` starts with `#error`: it fails at build time, with
the reason, rather than on the device.
"""

from __future__ import annotations

import re
import secrets
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fallopt.data import InputRule
from fallopt.tflite_graph import Graph, Tensor

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

# Tensor types device code can feed and read: schema name -> (C type, numpy, TfLiteType).
_TYPES = {
    "INT8": ("int8_t", np.int8, "kTfLiteInt8"),
    "UINT8": ("uint8_t", np.uint8, "kTfLiteUInt8"),
    "INT16": ("int16_t", np.int16, "kTfLiteInt16"),
    "FLOAT32": ("float", np.float32, "kTfLiteFloat32"),
}

_HEX = [f"0x{b:02x}" for b in range(256)]  # a lookup: formatting each byte took 0.2 s a model


def _hex_rows(data: bytes) -> str:
    rows = (
        "  " + ", ".join(map(_HEX.__getitem__, data[i : i + 12])) for i in range(0, len(data), 12)
    )
    return ",\n".join(rows)


def c_array(content: bytes, out_dir: Path, name: str = "model_data") -> tuple[Path, Path]:
    """Write `<name>.h` and `<name>.cc` holding the model bytes, 16-byte aligned.

    Returns the (source, header) paths. `name` becomes the C identifier `g_<name>`.
    """
    ident = "g_" + re.sub(r"\W", "_", name)
    header = out_dir / f"{name}.h"
    source = out_dir / f"{name}.cc"
    header.write_text(
        f"// Generated by fallopt: a TFLite model for TensorFlow Lite for Microcontrollers.\n"
        f"#ifndef {ident.upper()}_H_\n#define {ident.upper()}_H_\n\n"
        f"extern const unsigned char {ident}[];\n"
        f"extern const unsigned int {ident}_len;  // {len(content)} bytes\n\n"
        f"#endif  // {ident.upper()}_H_\n"
    )
    source.write_text(
        f'#include "{header.name}"\n\n'
        f"alignas(16) const unsigned char {ident}[] = {{\n" + _hex_rows(content) + "\n};\n"
        f"const unsigned int {ident}_len = {len(content)};\n"
    )
    return source, header


@dataclass(frozen=True)
class DeploySettings:
    """What the bundle needs besides the model file.

    Attributes:
        class_names: One name per output class, in output order.
        rule: How a uint8 pixel becomes the model's float input (`model.input_range`).
        arena_bytes: `kTensorArenaSize`, margin included.
        arena_note: Where `arena_bytes` comes from (written beside it as a comment).
        sample: One uint8 test image (height, width, channels), or None for no self-check.
        sample_label: The sample's true class.
        sample_expected: The class TFLM's Python interpreter predicted for the sample on the
            host: what `main.cc` must reproduce on the device. None when TFLM did not run.
        unsupported: Why TFLM cannot run this model, if it cannot (`main.cc` gets `#error`).
    """

    class_names: tuple[str, ...]
    rule: InputRule
    arena_bytes: int
    arena_note: str
    sample: np.ndarray | None = None
    sample_label: int | None = None
    sample_expected: int | None = None
    unsupported: str | None = None


def missing_ops(content: bytes) -> list[str]:
    """The ops of a `.tflite` file TFLM's op resolver has no method for (custom ops too).

    Offline, from the flatbuffer: a reason to skip TFLM before trying to allocate.
    """
    return [op for op in Graph.from_bytes(content).op_names() if op not in TFLM_OP_METHOD]


def pixel_table(tensor: Tensor, rule: InputRule) -> np.ndarray:
    """What each uint8 pixel value becomes at an input tensor: float32, or quantized.

    `InputRule.table`, as LiteRT uses it: the device sees exactly the values LiteRT and TFLM
    were evaluated with.

    Raises:
        ValueError: for an input type device code cannot feed, or an unquantized int input.
    """
    if tensor.dtype not in _TYPES:
        raise ValueError(f"input type {tensor.dtype} is not supported by the deploy bundle")
    dtype = _TYPES[tensor.dtype][1]
    if dtype == np.float32:
        return rule.table(dtype)
    if tensor.scale is None:
        raise ValueError(f"the {tensor.dtype} input has no quantization scale")
    return rule.table(dtype, tensor.scale, tensor.zero_point or 0)


def _c_float(value: float) -> str:
    """A float literal that reads back as the same float32 (9 significant digits)."""
    text = f"{float(np.float32(value)):.9g}"
    return text + ("f" if any(c in text for c in ".e") else ".0f")


def _c_string(text: str) -> str:
    """A C string literal of UTF-8 `text`; octal escapes because hex ones are greedy."""
    out = []
    for b in text.encode():
        c = chr(b)
        if c in '"\\?':  # `?`: no trigraph can form, whatever the compiler's standard
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    """`text` as `//` comment lines (a `/* */` one would end at any `*/` inside)."""
    lines = [f"// {line}".rstrip() for line in text.splitlines() or [""]]
    # A backslash at the end of a line would splice the next line into the comment.
    return "\n".join(line + "." if line.endswith("\\") else line for line in lines)


def _error(message: str) -> str:
    # One line, and a string literal, so no character in it can break the directive.
    return f"#error {_c_string(' '.join(message.split()))}\n"


def _values(table: np.ndarray) -> str:
    if table.dtype == np.float32:
        items, per_row = [_c_float(v) for v in table], 6
    else:
        items, per_row = [str(int(v)) for v in table], 16
    rows = range(0, len(items), per_row)
    return ",\n".join("  " + ", ".join(items[i : i + per_row]) for i in rows)


def _quantization(prefix: str, tensor: Tensor) -> str:
    if tensor.scale is None:  # TFLite stores (0, 0) for a tensor that is not quantized
        return (
            f"// {tensor.dtype.lower()}: not quantized (TFLite's scale 0, zero point 0).\n"
            f"constexpr float k{prefix}Scale = 0.0f;\nconstexpr int k{prefix}ZeroPoint = 0;\n"
        )
    return (
        f"// real value = k{prefix}Scale * (q - k{prefix}ZeroPoint)\n"
        f"constexpr float k{prefix}Scale = {_c_float(tensor.scale)};\n"
        f"constexpr int k{prefix}ZeroPoint = {tensor.zero_point or 0};\n"
    )


def _model_settings(graph: Graph, settings: DeploySettings, table: np.ndarray) -> str:
    inp, out = graph.input, graph.output
    _, height, width, channels = inp.shape
    rule = settings.rule
    names = ", ".join(_c_string(n) for n in settings.class_names)
    if inp.dtype == "FLOAT32":
        how = "and x is fed to the float32 input as is."
    else:
        how = "then quantized: q = round(x / kInputScale) + kInputZeroPoint, clamped."
    return f"""\
// Generated by fallopt: the constants device code needs to feed and read this model.
#ifndef FALLOPT_MODEL_SETTINGS_H_
#define FALLOPT_MODEL_SETTINGS_H_

#include <cstdint>

// Input tensor {list(inp.shape)}, {inp.dtype.lower()}: height, width, channels, HWC order.
constexpr int kInputHeight = {height};
constexpr int kInputWidth = {width};
constexpr int kInputChannels = {channels};
constexpr int kInputSize = kInputHeight * kInputWidth * kInputChannels;
using InputType = {_TYPES[inp.dtype][0]};
constexpr char kInputDtype[] = "{inp.dtype.lower()}";
{_quantization("Input", inp)}
// A uint8 camera pixel v enters the model as x = kInputLow + v * (kInputHigh - kInputLow) / 255,
// {how}
constexpr float kInputLow = {_c_float(rule.low)};
constexpr float kInputHigh = {_c_float(rule.high)};
// Exactly what each pixel value becomes at the input tensor: input[i] = kPixelToInput[pixel[i]].
constexpr InputType kPixelToInput[256] = {{
{_values(table)}
}};

// Output tensor {list(out.shape)}, {out.dtype.lower()}: one score per class.
using OutputType = {_TYPES[out.dtype][0]};
constexpr char kOutputDtype[] = "{out.dtype.lower()}";
{_quantization("Output", out)}
constexpr int kNumClasses = {len(settings.class_names)};
constexpr const char* kClassNames[kNumClasses] = {{{names}}};

// Tensor arena for tflite::MicroInterpreter, in bytes. Where the figure comes from:
{_comment(settings.arena_note)}
constexpr int kTensorArenaSize = {settings.arena_bytes};

#endif  // FALLOPT_MODEL_SETTINGS_H_
"""


def _sample_files(settings: DeploySettings) -> dict[str, str]:
    sample = settings.sample
    if sample is None:
        return {}
    names = settings.class_names

    def described(k: int | None, what: str) -> str:
        if k is None:
            return f"-1;  // {what}: not known"
        return f"{k};  // {what}: {_c_string(names[k])}"

    header = f"""\
// Generated by fallopt: one test image, for main.cc to check the model on the device.
#ifndef FALLOPT_SAMPLE_IMAGE_H_
#define FALLOPT_SAMPLE_IMAGE_H_

#include <cstdint>

// uint8 pixels as a camera gives them, {" x ".join(map(str, sample.shape))} (HWC order).
extern const uint8_t kSampleImage[];
constexpr int kSampleImageSize = {sample.size};
constexpr int kSampleLabel = {described(settings.sample_label, "its true class")}
// The class TFLM's Python interpreter predicted for it on the host.
constexpr int kSampleExpected = {described(settings.sample_expected, "TFLM on the host")}

#endif  // FALLOPT_SAMPLE_IMAGE_H_
"""
    source = (
        '#include "sample_image.h"\n\n'
        "const uint8_t kSampleImage[kSampleImageSize] = {\n"
        + _hex_rows(np.ascontiguousarray(sample).tobytes())
        + "\n};\n"
    )
    return {"sample_image.h": header, "sample_image.cc": source}


def _main_cc(graph: Graph, settings: DeploySettings) -> str:
    ops = graph.op_names()
    known = [op for op in ops if op in TFLM_OP_METHOD]
    errors = [f"TFLM cannot run this model: {settings.unsupported}"] if settings.unsupported else []
    errors += [f"TFLM has no kernel for op {op}" for op in ops if op not in TFLM_OP_METHOD]
    register = "\n".join(
        f"  TF_LITE_ENSURE_STATUS(resolver.{TFLM_OP_METHOD[op]}());  // {op}" for op in known
    )
    sample = settings.sample is not None
    include_sample = '#include "sample_image.h"\n' if sample else ""
    # Without a sample a black image still shows the model allocates and runs.
    fill = "kPixelToInput[kSampleImage[i]]" if sample else "kPixelToInput[0]"
    in_type, out_type = _TYPES[graph.input.dtype][2], _TYPES[graph.output.dtype][2]
    if not sample:
        verdict = '  MicroPrintf("no sample image: nothing to compare with");\n  return 0;\n'
    elif settings.sample_expected is None:
        verdict = (
            '  MicroPrintf("true class %d; no host prediction to compare with", kSampleLabel);\n'
            "  return 0;\n"
        )
    else:
        verdict = """\
  MicroPrintf("expected class %d (%s), true class %d", kSampleExpected,
              kClassNames[kSampleExpected], kSampleLabel);
  if (best != kSampleExpected) {
    MicroPrintf("FAIL: the device disagrees with TFLM on the host");
    return 1;
  }
  MicroPrintf("PASS");
  return 0;
"""
    return f"""\
// Generated by fallopt: runs the model once with TensorFlow Lite Micro and checks its class.
{"".join(map(_error, errors))}#include <cstdint>

#include "model_data.h"
#include "model_settings.h"
{include_sample}#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {{

// TFLM aligns its buffers to 16 bytes: an unaligned arena would lose up to 16 of them.
alignas(16) uint8_t tensor_arena[kTensorArenaSize];

// Exactly the ops in the model: every registered kernel is linked in and costs flash.
using OpResolver = tflite::MicroMutableOpResolver<{len(known)}>;

TfLiteStatus RegisterOps(OpResolver& resolver) {{
{register}
  return kTfLiteOk;
}}

}}  // namespace

int main() {{
  tflite::InitializeTarget();
  const tflite::Model* model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {{
    MicroPrintf("model schema %d, TFLM reads %d", static_cast<int>(model->version()),
                TFLITE_SCHEMA_VERSION);
    return 1;
  }}
  OpResolver resolver;
  if (RegisterOps(resolver) != kTfLiteOk) {{
    MicroPrintf("registering the ops failed");
    return 1;
  }}
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, kTensorArenaSize);
  if (interpreter.AllocateTensors() != kTfLiteOk) {{
    MicroPrintf("AllocateTensors failed with a %d-byte arena", kTensorArenaSize);
    return 1;
  }}
  MicroPrintf("arena used: %u of %d bytes", static_cast<unsigned>(interpreter.arena_used_bytes()),
              kTensorArenaSize);

  TfLiteTensor* input = interpreter.input(0);
  if (input->type != {in_type} || input->bytes != kInputSize * sizeof(InputType)) {{
    MicroPrintf("the input tensor is not what model_settings.h says");
    return 1;
  }}
  InputType* pixels = static_cast<InputType*>(input->data.data);
  for (int i = 0; i < kInputSize; ++i) pixels[i] = {fill};
  if (interpreter.Invoke() != kTfLiteOk) {{
    MicroPrintf("Invoke failed");
    return 1;
  }}

  const TfLiteTensor* output = interpreter.output(0);
  if (output->type != {out_type} ||
      output->bytes != kNumClasses * sizeof(OutputType)) {{
    MicroPrintf("the output tensor is not what model_settings.h says");
    return 1;
  }}
  // Scores rise with the real value whatever the (positive) scale: compare them raw.
  const OutputType* scores = static_cast<const OutputType*>(output->data.data);
  int best = 0;
  for (int c = 1; c < kNumClasses; ++c) {{
    if (scores[c] > scores[best]) best = c;  // the first of equal scores, as numpy's argmax
  }}
  MicroPrintf("predicted class %d (%s)", best, kClassNames[best]);
{verdict}}}
"""


def _readme(graph: Graph, settings: DeploySettings, model_bytes: int) -> str:
    ops = graph.op_names()
    lacking = [op for op in ops if op not in TFLM_OP_METHOD]
    status = ""
    if settings.unsupported or lacking:
        why = settings.unsupported or "no kernel for " + ", ".join(lacking)
        status = (
            f"\n**TFLM cannot run this model** ({why}). `main.cc` starts with `#error`, so "
            "nobody deploys it unknowingly; the other files are written for reference.\n"
        )
    main = textwrap.fill(
        f"- `main.cc`: a minimal program. It registers exactly the model's ops "
        f"({', '.join(ops)}), allocates the arena, prints `arena_used_bytes()`, runs one "
        "image and prints its class.",
        width=90,
        subsequent_indent="  ",
        break_on_hyphens=False,
    )
    sample = ""
    if settings.sample is not None:
        sample = (
            "- `sample_image.h`, `sample_image.cc`: one test image (uint8, HWC), its true class\n"
            "  and the class TFLM predicted for it on the host; `main.cc` returns 1 when the\n"
            "  device predicts another.\n"
        )
    return f"""\
# Deploy bundle

Generated by fallopt: this run's model for TensorFlow Lite Micro (TFLM).
{status}
## Files

- `model_data.cc`, `model_data.h`: the `.tflite` file ({model_bytes:,} bytes) as
  `g_model_data`, 16-byte aligned, and its length `g_model_data_len`.
- `model_settings.h`: input shape, type and quantization; `kPixelToInput`, what each uint8
  pixel becomes at the input tensor; output type and quantization; class names;
  `kTensorArenaSize`.
{main}
{sample}
## Build

Add the `.cc` files to a TFLM project (your board's, or a folder of the tflite-micro tree)
and link TFLM's library. Include paths: the tflite-micro root and, under
`tensorflow/lite/micro/tools/make/downloads/`, `flatbuffers/include`, `gemmlowp` and
`kissfft`. Define `TF_LITE_STATIC_MEMORY` as the library was built (TFLM's Makefile does):
it changes the layout of `TfLiteTensor`. On a Linux host, to try it:

```sh
# in a tflite-micro checkout: fetches flatbuffers, gemmlowp, kissfft, ruy, then builds
make -f tensorflow/lite/micro/tools/make/Makefile -j4 microlite
# here:
TFLM=/path/to/tflite-micro; DL=$TFLM/tensorflow/lite/micro/tools/make/downloads
g++ -std=c++17 -O2 -DTF_LITE_STATIC_MEMORY -I. -I$TFLM -I$DL/flatbuffers/include \\
    -I$DL/gemmlowp -I$DL/kissfft *.cc \\
    $TFLM/gen/linux_x86_64_default_gcc/lib/libtensorflow-microlite.a -o main && ./main
```

## Tensor arena

`kTensorArenaSize` = {settings.arena_bytes:,} bytes: {" ".join(settings.arena_note.split())}

## Caveats

- The arena figure is for TFLM's reference kernels. Optimised kernels (CMSIS-NN on Arm,
  ESP-NN) request scratch buffers the reference ones do not: check the `arena used` line
  `main.cc` prints on the device, and raise `kTensorArenaSize` if allocation fails.
- Keep `tensor_arena` and `g_model_data` `alignas(16)`: TFLM aligns its buffers to 16
  bytes, and an unaligned arena needs up to 16 bytes more (TFLM's `micro_interpreter.h`).
- Feed pixels through `kPixelToInput`: the model was evaluated with exactly these inputs.
"""


def _files(content: bytes, settings: DeploySettings) -> dict[str, str]:
    """The bundle's text files but model_data (written by `c_array`), after every check."""
    graph = Graph.from_bytes(content)
    inp, out = graph.input, graph.output
    if len(inp.shape) != 4 or inp.shape[0] != 1:
        raise ValueError(f"the deploy bundle needs a (1, h, w, c) input, not {list(inp.shape)}")
    if out.dtype not in _TYPES:
        raise ValueError(f"output type {out.dtype} is not supported by the deploy bundle")
    if out.shape[-1:] != (len(settings.class_names),):
        raise ValueError(
            f"{len(settings.class_names)} class names for output shape {list(out.shape)}"
        )
    if settings.arena_bytes <= 0:
        raise ValueError(f"arena_bytes must be > 0, not {settings.arena_bytes}")
    if settings.sample is not None:
        s = settings.sample
        if s.dtype != np.uint8 or s.shape != inp.shape[1:]:
            raise ValueError(f"sample must be uint8 {inp.shape[1:]}, not {s.dtype} {s.shape}")
        for key in ("sample_label", "sample_expected"):
            k = getattr(settings, key)
            if k is not None and not 0 <= k < len(settings.class_names):
                raise ValueError(f"{key} {k} is not a class index")
    return {
        "model_settings.h": _model_settings(graph, settings, pixel_table(inp, settings.rule)),
        "main.cc": _main_cc(graph, settings),
        **_sample_files(settings),
        "README.md": _readme(graph, settings, len(content)),
    }


def write_bundle(content: bytes, out_dir: Path, settings: DeploySettings) -> list[Path]:
    """Write the deploy bundle of a `.tflite` file to `out_dir`, replacing any old one.

    Files: model_data.cc/.h, model_settings.h, main.cc, sample_image.cc/.h (with a sample)
    and README.md. The bundle is built in a hidden folder beside `out_dir` and renamed into
    place, so a failure leaves the previous bundle (or none), never half of one.

    A model TFLM cannot run (`settings.unsupported`, or an op without a TFLM kernel: see
    `missing_ops`) still gets every file, but `main.cc` starts with an `#error` line per
    reason: a build fails with the reason instead of a device failing without one.

    Returns:
        The files written, in `out_dir`.

    Raises:
        ValueError: when the model or settings cannot make a bundle (input not (1, h, w, c),
            class names not matching the output, a sample of another shape, ...). Nothing is
            written then.
    """
    texts = _files(content, settings)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    staging.mkdir()
    try:
        written = [p.name for p in c_array(content, staging)]
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
            written.append(name)
        if out_dir.exists():
            old = staging.with_suffix(".old")
            out_dir.rename(old)
            try:
                staging.rename(out_dir)
            except BaseException:
                old.rename(out_dir)
                raise
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in written]
