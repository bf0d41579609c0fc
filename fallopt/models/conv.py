"""CNN architectures: conv blocks then dense layers, all shapes from config.

The named architectures (`fallopt/conf/model/*.yaml`) are presets of one builder:
`cauca_cnn` (the lab's), `cauca_cnn_qat` (QAT-friendly block order), `hds_cnn`, `cifar_cnn`.
Layer names are stable (`conv1`, `bn1`, `relu1`, `pool1`, ..., `dense1`, `output`) so that
pruning scopes and reports can refer to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fallopt.backend import keras
from fallopt.config import BlockOrder, ModelConfig
from fallopt.errors import ConfigError

if TYPE_CHECKING:
    import tf_keras


def feature_map_sizes(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    """Spatial size after each conv block (valid convolution, then max-pooling).

    Raises:
        ConfigError: when a block would shrink the image below one pixel, naming the block.
    """
    h, w = input_shape[:2]
    sizes = []
    for i, _ in enumerate(cfg.filters, start=1):
        conv_h, conv_w = h - cfg.kernel_size + 1, w - cfg.kernel_size + 1
        h, w = conv_h // cfg.pool_size, conv_w // cfg.pool_size
        if min(h, w) < 1:
            raise ConfigError(
                f"model={cfg.name} cannot take {input_shape[0]}x{input_shape[1]} input: block {i} "
                f"(conv {cfg.kernel_size}x{cfg.kernel_size} -> {max(conv_h, 0)}x{max(conv_w, 0)}, "
                f"pool {cfg.pool_size} -> {max(h, 0)}x{max(w, 0)}) leaves no pixel. Use larger "
                "images (e.g. dataset.image_size), fewer blocks (model.filters) or a smaller "
                "model.kernel_size"
            )
        sizes.append((h, w))
    return sizes


def _scaled(widths: list[int], factor: float) -> list[int]:
    return [max(1, round(w * factor)) for w in widths]


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int
) -> tf_keras.Model:
    """Build the (uncompiled) model for images of `input_shape` and `num_classes` classes."""
    feature_map_sizes(cfg, input_shape)
    k = keras()
    layers = k.layers
    stack: list[tf_keras.layers.Layer] = [layers.InputLayer(input_shape=input_shape, name="input")]
    for i, filters in enumerate(_scaled(cfg.filters, cfg.width), start=1):
        conv_activation = "relu" if cfg.block_order is not BlockOrder.conv_bn_relu else None
        stack.append(
            layers.Conv2D(filters, cfg.kernel_size, activation=conv_activation, name=f"conv{i}")
        )
        if cfg.block_order is BlockOrder.conv_relu_bn:
            stack.append(layers.BatchNormalization(momentum=cfg.bn_momentum, name=f"bn{i}"))
        elif cfg.block_order is BlockOrder.conv_bn_relu:
            stack += [
                layers.BatchNormalization(momentum=cfg.bn_momentum, name=f"bn{i}"),
                layers.ReLU(name=f"relu{i}"),
            ]
        stack.append(layers.MaxPooling2D(cfg.pool_size, name=f"pool{i}"))
    stack.append(layers.Flatten(name="flatten"))
    for i, units in enumerate(_scaled(cfg.dense_units, cfg.width), start=1):
        stack.append(layers.Dense(units, activation="relu", name=f"dense{i}"))
    stack.append(layers.Dense(num_classes, activation="softmax", name="output"))
    return k.Sequential(stack, name=cfg.name)
