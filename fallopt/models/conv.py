"""CNN architectures: conv blocks then dense layers, all shapes from config.

The named architectures (`fallopt/conf/model/*.yaml`) are presets of one builder:
`cauca_cnn` (the lab's), `cauca_cnn_qat` (QAT-friendly block order), `hds_cnn`, `cifar_cnn`.
Layer names are stable (`conv1`, `bn1`, `relu1`, `pool1`, ..., `dense1`, `output`) so that
pruning scopes and reports can refer to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from omegaconf import MISSING

from fallopt.backend import keras
from fallopt.config import ModelConfig, check_fraction, require
from fallopt.errors import ConfigError

if TYPE_CHECKING:
    import tf_keras


class BlockOrder(str, Enum):
    """Layer order inside a conv block. QAT can wrap BatchNorm only right after a Conv2D."""

    conv_relu_bn = "conv_relu_bn"  # the lab's CNN
    conv_bn_relu = "conv_bn_relu"  # quantization-aware-training friendly
    conv_relu = "conv_relu"  # no BatchNorm


@dataclass
class ConvNetConfig(ModelConfig):
    """A CNN of conv blocks (conv -> [bn] -> relu -> maxpool) then dense layers."""

    filters: list[int] = MISSING
    kernel_size: int = 3
    pool_size: int = 2
    dense_units: list[int] = field(default_factory=list)
    block_order: BlockOrder = BlockOrder.conv_relu_bn
    # Keras' 0.99 leaves the inference statistics far from the batch statistics after the
    # few hundred steps of a short training (measured: 0.70 vs 0.90 on the training images).
    bn_momentum: float = 0.9
    width: float = 1.0  # scales every layer's filters and units (a search dimension)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.block_order = BlockOrder(self.block_order)  # a string from Python code, not Hydra
        require(self.width > 0, "model.width", self.width, "must be > 0 (1.0 = as listed)")
        require(len(self.filters) >= 1, "model.filters", self.filters, "needs >= 1 conv block")
        for key in ("filters", "dense_units"):
            values = getattr(self, key)
            require(all(v >= 1 for v in values), f"model.{key}", values, "widths must be >= 1")
        require(self.kernel_size >= 1, "model.kernel_size", self.kernel_size, "must be >= 1")
        require(self.pool_size >= 1, "model.pool_size", self.pool_size, "must be >= 1")
        check_fraction("model.bn_momentum", self.bn_momentum, allow_zero=True)

    def ignored(self) -> set[str]:
        """Without BatchNorm there is no momentum."""
        return {"bn_momentum"} if self.block_order is BlockOrder.conv_relu else set()


def feature_map_sizes(
    cfg: ConvNetConfig, input_shape: tuple[int, int, int]
) -> list[tuple[int, int]]:
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


def build(
    cfg: ConvNetConfig, input_shape: tuple[int, int, int], num_classes: int
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


SCHEMA = ConvNetConfig
