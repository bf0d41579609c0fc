"""Architectures: the lab's exact parameter counts, block orders, and shapes they refuse."""

from __future__ import annotations

import pytest

from fallopt.config import ConfigError, validate
from fallopt.models import build_model
from fallopt.models.conv import BlockOrder, ConvNetConfig, feature_map_sizes


@pytest.mark.parametrize(
    ("model", "input_shape", "classes", "params"),
    [
        ("cauca_cnn", (96, 96, 3), 2, 342_178),
        ("cauca_cnn_qat", (96, 96, 3), 2, 342_178),
        ("hds_cnn", (14, 14, 1), 3, 37_443),
        ("cifar_cnn", (32, 32, 3), 10, 167_562),
    ],
)
def test_parameter_counts_match_the_lab(compose_cfg, model, input_shape, classes, params):
    cfg = validate(compose_cfg(f"model={model}")).model
    assert build_model(cfg, input_shape, classes).count_params() == params


def _layer_kinds(model):
    return [type(layer).__name__ for layer in model.layers]


def test_block_orders(compose_cfg):
    lab = build_model(validate(compose_cfg("model=cauca_cnn")).model, (96, 96, 3), 2)
    qat = build_model(validate(compose_cfg("model=cauca_cnn_qat")).model, (96, 96, 3), 2)
    assert _layer_kinds(lab)[:3] == ["Conv2D", "BatchNormalization", "MaxPooling2D"]
    assert lab.get_layer("conv1").activation.__name__ == "relu"
    # QAT can wrap BatchNorm only right after a Conv2D without activation.
    assert _layer_kinds(qat)[:4] == ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"]
    assert qat.get_layer("conv1").activation.__name__ == "linear"


@pytest.mark.parametrize("order", ["conv_bn_relu", "conv_relu"])
def test_a_block_order_given_as_a_string_in_python_is_the_same_order(order):
    """Built from Python (tests, scripts), not Hydra: a string once built no BatchNorm at all."""
    cfg = ConvNetConfig(name="t", filters=[4], kernel_size=3, dense_units=[8], block_order=order)
    enum = ConvNetConfig(name="t", filters=[4], kernel_size=3, dense_units=[8],
                         block_order=BlockOrder(order))  # fmt: skip
    assert cfg.block_order is BlockOrder(order)
    got, want = (_layer_kinds(build_model(c, (12, 12, 1), 2)) for c in (cfg, enum))
    assert got == want
    assert ("BatchNormalization" in got) == (order == "conv_bn_relu")


def test_widths_and_kernel_come_from_config(compose_cfg):
    cfg = validate(compose_cfg("model.filters=[8,16,16]", "model.kernel_size=3")).model
    model = build_model(cfg, (32, 32, 3), 2)
    assert model.get_layer("conv2").filters == 16
    assert model.get_layer("conv1").kernel_size == (3, 3)
    assert model.output_shape == (None, 2)


def test_input_that_shrinks_below_a_pixel_names_the_block(compose_cfg):
    cfg = validate(compose_cfg("model=cifar_cnn")).model
    with pytest.raises(ConfigError, match=r"model=cifar_cnn cannot take 8x8 input: block 2"):
        feature_map_sizes(cfg, (8, 8, 1))
    assert feature_map_sizes(cfg, (32, 32, 3)) == [(15, 15), (6, 6)]
