"""Per-layer pruning sensitivity and per-layer int8 error, with layers kept float."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest

from fallopt.backend import keras
from fallopt.compress.prune import select_layers
from fallopt.compress.quant_error import (
    OpError,
    check_float_layers,
    check_float_ops,
    convert_with_float_layers,
    error_table,
    float_ops,
    layer_errors,
    propose_float_layers,
)
from fallopt.compress.quantize import convert, representative_images
from fallopt.compress.sensitivity import (
    LayerDrop,
    heatmap_png,
    magnitude_mask,
    propose_per_layer,
    sensitivity_table,
    weight_sensitivity,
)
from fallopt.config import ConfigError, QuantMode, TrainConfig
from fallopt.data import Split, to_float
from fallopt.errors import FalloptError
from fallopt.evaluate import evaluate_keras
from fallopt.litert import TFLiteModel
from fallopt.models.conv import ConvNetConfig, build
from fallopt.tflite_graph import WEIGHT_OPS, Graph
from fallopt.train import seed_everything, train_model


@pytest.fixture(scope="module")
def trained():
    """The research's tiny conv_relu_bn CNN, trained on noise with a bright square.

    BatchNorm momentum 0.5 lets the moving statistics settle in 30 steps (at 0.9 the model
    still predicted one class on the validation images): baseline accuracy about 0.93.
    """
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(260, 24, 24, 3), dtype=np.uint8)
    y = np.arange(260) % 2
    for i in np.flatnonzero(y == 1):
        r, c = rng.integers(0, 14, size=2)
        x[i, r : r + 10, c : c + 10] = 255
    seed_everything(0)
    cfg = ConvNetConfig(name="t", filters=[8, 16], kernel_size=3, dense_units=[16], bn_momentum=0.5)
    model = build(cfg, (24, 24, 3), 2)
    train, val = Split(x[:160], y[:160]), Split(x[160:], y[160:])
    train_model(model, train, val, TrainConfig(epochs=3, batch_size=16), 0)
    return model, train, val


# --- pruning sensitivity -------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77, 0.95])
def test_mask_zeros_exactly_the_smallest_weights(trained, sparsity):
    kernel = trained[0].get_layer("dense1").kernel.numpy()
    original = kernel.copy()
    masked = magnitude_mask(kernel, sparsity)
    zero = masked == 0
    assert zero.sum() == round(sparsity * kernel.size) and not (kernel == 0).any()
    assert np.abs(kernel[zero]).max() <= np.abs(kernel[~zero]).min()
    np.testing.assert_array_equal(masked[~zero], kernel[~zero])
    np.testing.assert_array_equal(kernel, original)  # the input is left alone


def test_mask_count_is_exact_with_ties():
    kernel = np.ones((3, 3, 2, 4), np.float32)
    assert (magnitude_mask(kernel, 0.5) == 0).sum() == 36
    assert (magnitude_mask(-kernel, 0.3) == 0).sum() == round(0.3 * 72)


def _by_hand(clone, weights, name, sparsity, val) -> float:
    """Accuracy with one kernel pruned, computed apart: a threshold on sorted |w|."""
    clone.set_weights(weights)
    layer = clone.get_layer(name)
    kernel, *rest = layer.get_weights()
    magnitudes = np.sort(np.abs(kernel).reshape(-1))
    k = round(sparsity * kernel.size)
    assert magnitudes[k - 1] < magnitudes[k]  # no tie at the threshold: the mask is unique
    layer.set_weights([np.where(np.abs(kernel) <= magnitudes[k - 1], 0, kernel), *rest])
    probs = clone.predict(to_float(val.x), batch_size=256, verbose=0)
    return float((probs.argmax(1) == val.y).mean())


def test_sensitivity_equals_an_independent_evaluation_and_restores_weights(trained, caplog):
    model, _, val = trained
    before = [w.copy() for w in model.get_weights()]
    layers = select_layers(model, "all")
    assert layers == ["conv1", "conv2", "dense1", "output"]
    with caplog.at_level(logging.INFO, logger="fallopt.compress.sensitivity"):
        baseline, rows = weight_sensitivity(model, val, layers, [0.5, 0.9])
    for now, then in zip(model.get_weights(), before, strict=True):  # bit for bit
        np.testing.assert_array_equal(now, then)
    assert baseline == evaluate_keras(model, val).accuracy
    assert [(r.layer, r.sparsity) for r in rows] == [
        (name, s) for name in layers for s in (0.5, 0.9)
    ]
    clone = keras().models.clone_model(model)
    for row in rows:
        assert row.params == model.get_layer(row.layer).kernel.numpy().size
        assert row.accuracy == _by_hand(clone, before, row.layer, row.sparsity, val)
        assert row.drop == baseline - row.accuracy
    assert baseline > 0.8
    assert any(row.drop > 0.2 for row in rows)  # pruning 90% of a small layer hurts
    conv1 = [r for r in rows if r.layer == "conv1"]
    line = f"[sensitivity] conv1: 0.5 {conv1[0].drop:+.3f}, 0.9 {conv1[1].drop:+.3f}"
    assert line in caplog.text
    assert f"baseline accuracy {baseline:.3f} on {len(val)} images" in caplog.text


def test_sensitivity_refuses_an_unknown_layer(trained):
    model, _, val = trained
    with pytest.raises(ConfigError, match="conv9, which model 't' lacks; its layers: conv1"):
        weight_sensitivity(model, val, ["conv1", "conv9"], [0.5])


def _rows(drops: dict[str, dict[float, float]]) -> list[LayerDrop]:
    return [
        LayerDrop(layer, 100, s, 0.8 - drop, drop)
        for layer, by_s in drops.items()
        for s, drop in by_s.items()
    ]


def test_proposal_stops_at_the_first_sparsity_that_drops_too_much():
    rows = _rows(
        {
            "conv1": {0.3: 0.0, 0.5: 0.01, 0.7: 0.03, 0.9: 0.0},  # 0.9 lucky: not proposed
            "conv2": {0.9: 0.0, 0.3: -0.02, 0.5: 0.72 - 0.70},  # unsorted; 0.02 by subtraction
            "dense1": {0.3: 0.021, 0.5: 0.0},  # too much from the start
            "output": {0.3: 0.0, 0.5: 0.0, 0.7: 0.0, 0.9: 0.0},
        }
    )
    assert 0.72 - 0.70 > 0.02  # the boundary case is a rounding error above it
    assert propose_per_layer(rows, 0.02) == {"conv1": 0.5, "conv2": 0.9, "output": 0.9}
    assert propose_per_layer(rows, 0.0) == {"conv1": 0.3, "conv2": 0.3, "output": 0.9}
    assert propose_per_layer(rows, 0.5) == {"conv1": 0.9, "conv2": 0.9, "dense1": 0.5,
                                            "output": 0.9}  # fmt: skip
    assert propose_per_layer([], 0.02) == {}


def test_table_and_heatmap_hold_the_rows(tmp_path):
    rows = _rows({"conv1": {0.3: -0.013, 0.5: 0.12}, "dense1": {0.5: 0.2 / 3}})
    table = sensitivity_table(rows, tmp_path / "sensitivity.csv")
    with table.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["layer", "params", "sparsity", "val_accuracy", "drop"]
    types = {"layer": str, "params": int, "sparsity": float, "val_accuracy": float, "drop": float}
    assert [LayerDrop(*(cast(r[k]) for k, cast in types.items())) for r in read] == rows  # exactly
    png = heatmap_png(rows, tmp_path / "sensitivity.png", "accuracy drop per layer")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# --- int8 error and float layers ------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(trained):
    model, train, _ = trained
    rep = representative_images(train, 32, seed=0)
    return rep, layer_errors(model, rep), convert(model, QuantMode.int8, rep)


def test_one_error_row_per_quantized_op_mapped_to_its_layer(quantized):
    _, errors, int8_file = quantized
    ops = [op.name for op in Graph.from_bytes(int8_file).ops]
    assert [e.op for e in errors] == ops  # quant=int8's file has no QUANTIZE or DEQUANTIZE
    assert [e.layer for e in errors] == [
        "conv1", "bn1", "bn1", "pool1", "conv2", "bn2", "bn2", "pool2", "flatten", "dense1",
        "output", "",  # the softmax is named after the model's call
    ]  # fmt: skip
    for e in errors:
        assert e.rmse_over_scale == math.sqrt(e.mean_squared_error) / e.scale
        if e.op in WEIGHT_OPS:  # about 1/sqrt(12) = 0.29, ideal rounding
            assert 0.05 < e.rmse_over_scale < 1.5, e
    assert "/dense1/" in next(e.tensor for e in errors if e.layer == "dense1")


@pytest.fixture(scope="module")
def dense1_float(trained, quantized):
    return convert_with_float_layers(trained[0], quantized[0], ["dense1"])


def test_float_layer_computes_in_float_between_int8_input_and_output(
    trained, quantized, dense1_float
):
    model, _, val = trained
    graph = Graph.from_bytes(dense1_float)
    assert graph.input.dtype == "INT8" and graph.output.dtype == "INT8"
    weight_ops = [op for op in graph.ops if op.name in WEIGHT_OPS]
    kinds = {graph.tensors[op.outputs[0]].name.split("/")[1]: op for op in weight_ops}
    assert list(kinds) == ["conv1", "conv2", "dense1", "output"]
    for name, op in kinds.items():
        dtypes = {graph.tensors[i].dtype for i in (*op.inputs, *op.outputs) if i >= 0}
        if name == "dense1":
            assert dtypes == {"FLOAT32"}
        else:
            assert "FLOAT32" not in dtypes, name
    names = [op.name for op in graph.ops]
    at = names.index("FULLY_CONNECTED")
    assert names[at - 1 : at + 2] == ["DEQUANTIZE", "FULLY_CONNECTED", "QUANTIZE"]
    plain = [op.name for op in Graph.from_bytes(quantized[2]).ops]
    assert [n for n in names if n not in ("QUANTIZE", "DEQUANTIZE")] == plain

    assert float_ops(dense1_float) == ["dense1"]  # from the tensor names alone
    assert float_ops(dense1_float, model) == ["dense1"]
    assert float_ops(quantized[2], model) == []

    tflite = TFLiteModel(dense1_float)
    assert tflite.input_dtype == np.int8 and tflite.output_dtype == np.int8
    probs = tflite.predict(val.x)
    keras_probs = model.predict(to_float(val.x), verbose=0)
    assert probs.shape == (len(val), 2)
    assert (probs.argmax(1) == keras_probs.argmax(1)).mean() >= 0.9
    reference = TFLiteModel(dense1_float, xnnpack=False)  # as runs evaluate int8 files
    assert (reference.predict(val.x).argmax(1) == probs.argmax(1)).mean() >= 0.95


def test_a_quantized_layer_is_caught(trained, quantized):
    with pytest.raises(FalloptError, match="layer dense1's FULLY_CONNECTED is not float32"):
        check_float_ops(quantized[2], trained[0], ["dense1"])
    with pytest.raises(FalloptError, match="no op of layer bn1"):
        check_float_ops(quantized[2], trained[0], ["bn1"])


def test_float_layers_must_be_layers_with_weights(trained, quantized):
    model = trained[0]
    check_float_layers(model, ["conv1", "output"])
    check_float_layers(model, [])
    known = "its layers with weights: conv1, conv2, dense1, output"
    with pytest.raises(ConfigError, match=f"names conv9, which model t lacks; {known}$"):
        check_float_layers(model, ["conv1", "conv9"])
    with pytest.raises(ConfigError, match=r"bn1 \(BatchNormalization\), which has no Conv"):
        check_float_layers(model, ["bn1"])
    with pytest.raises(ConfigError, match="conv9"):  # refused before converting
        convert_with_float_layers(model, quantized[0], ["conv9"])


def test_float_layer_proposal_and_table(tmp_path):
    def row(layer: str, op: str, error: float) -> OpError:
        return OpError(layer, op, f"t/{layer}/x", error, (error * 0.01) ** 2, 0.01)

    errors = [
        row("conv1", "CONV_2D", 0.8),
        row("bn1", "MUL", 2.0),  # cannot be kept float: not proposed
        row("conv2", "CONV_2D", 0.7),  # at the threshold, not above
        row("dense1", "FULLY_CONNECTED", 1.2),
        row("", "SOFTMAX", 3.0),
    ]
    assert propose_float_layers(errors, 0.7) == ["dense1", "conv1"]
    assert propose_float_layers(errors, 5.0) == []
    path = error_table(errors, tmp_path / "quant_error.csv")
    with path.open() as f:
        read = list(csv.DictReader(f))
    columns = ["layer", "op", "tensor", "rmse_over_scale", "mean_squared_error", "scale"]
    assert list(read[0]) == columns
    assert [
        OpError(*(r[k] if k in columns[:3] else float(r[k]) for k in columns)) for r in read
    ] == errors
