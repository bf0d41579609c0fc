"""Keras Applications backbones (tf_keras, Keras 2) with a classification head.

`model=keras_app model.arch=NAME` builds `tf_keras.applications` NAME without its top, then
global average pooling, optional hidden Dense layers and `Dense(classes, softmax)` named
`output`. The model is flat: the backbone's layers, with their Keras names, are layers of the
model itself, so that pruning scopes reach them and tfmot can wrap them (it quantizes no
nested model).

Each architecture takes pixels its own way, and `model.input_range` follows it: MobileNets
[-1, 1] (MobileNetV3's own Rescaling layer is left out for it), EfficientNet [0, 255] (it
rescales and normalizes inside), VGG16 [0, 255] followed by a fixed 1x1 convolution,
`fixed_caffe_preprocess`, that swaps RGB to BGR and subtracts the ImageNet channel means as Keras'
`vgg16.preprocess_input` does. A grayscale image is repeated into three channels
(`gray_to_rgb`).

Frozen layers run in inference mode: tf_keras runs a BatchNormalization layer that is not
trainable on its moving statistics, which is what calling a nested backbone with
`training=False` achieves. BatchNormalization layers stay frozen in the fine-tune too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fallopt.backend import keras
from fallopt.config import ModelConfig, check_fraction, require
from fallopt.errors import ConfigError
from fallopt.identity import file_digest
from fallopt.models import FIXED_PREFIX

if TYPE_CHECKING:  # fallopt.data imports scikit-learn: seconds of `--help`
    import tf_keras

    from fallopt.config import TrainConfig
    from fallopt.data import InputRule, Split
    from fallopt.train import EpochHook

IMAGENET = "imagenet"
GRAY_TO_RGB = "gray_to_rgb"
CAFFE = f"{FIXED_PREFIX}caffe_preprocess"  # fixed preprocessing: never trained nor pruned
HEAD_PREFIX = "head_"  # head_pool, head_dropout<i>, head_dense<i>; then `output`
# ImageNet channel means in BGR order, as `preprocess_input(mode="caffe")` subtracts them.
CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)
_GOOGLEAPIS = "https://storage.googleapis.com/"


@dataclass(frozen=True)
class Arch:
    """One backbone: its tf_keras constructor and what its ImageNet weights need."""

    constructor: str  # in tf_keras.applications
    input_range: tuple[float, float]
    url: str  # folder Keras downloads the ImageNet weights from
    # Alphas Keras has ImageNet weights for; empty: the architecture has no alpha.
    imagenet_alphas: tuple[float, ...] = ()
    caffe: bool = False
    kwargs: tuple[tuple[str, Any], ...] = ()
    min_size: int = 32  # Keras refuses smaller inputs (measured: 31 fails for all four)

    @property
    def has_alpha(self) -> bool:
        """Whether `model.alpha` (width multiplier) applies."""
        return bool(self.imagenet_alphas)


ARCHS: dict[str, Arch] = {
    "mobilenet_v2": Arch(
        "MobileNetV2",
        (-1.0, 1.0),
        f"{_GOOGLEAPIS}tensorflow/keras-applications/mobilenet_v2/",
        imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    ),
    "mobilenet_v3_small": Arch(
        "MobileNetV3Small",
        (-1.0, 1.0),
        f"{_GOOGLEAPIS}tensorflow/keras-applications/mobilenet_v3/",
        imagenet_alphas=(0.75, 1.0),
        # Its Rescaling to [-1, 1] is what input_range does; tfmot QAT has no Rescaling.
        kwargs=(("include_preprocessing", False),),
    ),
    "vgg16": Arch(
        "VGG16",
        (0.0, 255.0),
        f"{_GOOGLEAPIS}tensorflow/keras-applications/vgg16/",
        caffe=True,
    ),
    "efficientnet_b0": Arch("EfficientNetB0", (0.0, 255.0), f"{_GOOGLEAPIS}keras-applications/"),
}


@dataclass
class KerasAppConfig(ModelConfig):
    """A Keras Applications backbone and a classification head, trained in one or two phases.

    `input_range` [] takes the architecture's (set on validation, so logged as applied);
    any other value must equal it. `alpha` null is 1.0 on MobileNets and refused elsewhere.
    `weights`: null (random), `imagenet` (from Keras' cache folder, never downloaded), or the
    path of a weights file for the backbone, as `backbone.save_weights("x.h5")` writes it.
    `freeze` null is true with weights and false without (set on validation too).
    With `freeze` the backbone is frozen while the head trains for `train.epochs`; then
    `fine_tune_epochs` unfreeze it (all, or its last `unfreeze_layers` layers) at
    `fine_tune_learning_rate` (null: train.learning_rate / 10).
    """

    name: str = "keras_app"
    arch: str = "mobilenet_v2"
    alpha: float | None = None
    weights: str | None = IMAGENET
    freeze: bool | None = None  # null: frozen if pretrained (weights set), trained if random
    dense_units: list[int] = field(default_factory=list)
    dropout: float = 0.2
    fine_tune_epochs: int = 0
    unfreeze_layers: int | None = None
    fine_tune_learning_rate: float | None = None
    # []: the arch's. (Not null: a base field's type cannot become optional in Hydra's merge.)
    input_range: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.arch in ARCHS, "model.arch", self.arch, f"choose from {sorted(ARCHS)}")
        spec = ARCHS[self.arch]
        rule = list(spec.input_range)
        if not self.input_range:
            self.input_range = rule
        require(
            [float(v) for v in self.input_range] == rule,
            "model.input_range",
            self.input_range,
            f"model.arch={self.arch} takes pixels in {rule} (its ImageNet preprocessing); "
            "leave it [] to get it",
        )
        super().__post_init__()
        if not spec.has_alpha:
            require(
                self.alpha is None,
                "model.alpha",
                self.alpha,
                f"model.arch={self.arch} has no width multiplier (only "
                f"{sorted(a for a, s in ARCHS.items() if s.has_alpha)} do); leave it null",
            )
        else:
            self.alpha = 1.0 if self.alpha is None else float(self.alpha)
            require(self.alpha > 0, "model.alpha", self.alpha, "must be > 0")
            if self.weights == IMAGENET:
                require(
                    self.alpha in spec.imagenet_alphas,
                    "model.alpha",
                    self.alpha,
                    f"Keras has ImageNet weights of {self.arch} for alpha in "
                    f"{list(spec.imagenet_alphas)} only",
                )
        if self.weights not in (None, IMAGENET):
            require(
                Path(self.weights).is_file(),
                "model.weights",
                self.weights,
                "no such file: expected null, imagenet, or a weights file for the backbone",
            )
        if self.freeze is None:  # a random frozen backbone would leave only the head to learn
            self.freeze = self.weights is not None
        units = self.dense_units
        require(all(u >= 1 for u in units), "model.dense_units", units, "widths must be >= 1")
        check_fraction("model.dropout", self.dropout, allow_zero=True)
        epochs = self.fine_tune_epochs
        require(epochs >= 0, "model.fine_tune_epochs", epochs, "must be >= 0")
        require(
            epochs == 0 or self.freeze,
            "model.fine_tune_epochs",
            epochs,
            "the fine-tune unfreezes a backbone frozen for the head's training: needs "
            "model.freeze=true",
        )
        if self.unfreeze_layers is not None:
            n = self.unfreeze_layers
            require(n >= 1, "model.unfreeze_layers", n, "must be >= 1 (null: all)")
        lr = self.fine_tune_learning_rate
        if lr is not None:
            require(0 < lr < 10, "model.fine_tune_learning_rate", lr, "0 < lr < 10")

    def ignored(self) -> set[str]:
        """Fine-tune settings without a fine-tune; a weights path (its content counts)."""
        ignored = set()
        if self.fine_tune_epochs == 0:
            ignored |= {"unfreeze_layers", "fine_tune_learning_rate"}
        if self.weights not in (None, IMAGENET):
            ignored.add("weights")
        return ignored

    def sources(self) -> dict[str, str]:
        """A weights file's content. Keras' ImageNet files are fixed by their names."""
        if self.weights in (None, IMAGENET):
            return {}
        return {"weights": file_digest(self.weights)}


SCHEMA = KerasAppConfig


def imagenet_file(cfg: KerasAppConfig, input_shape: tuple[int, int, int]) -> tuple[str, str]:
    """The file name of `cfg`'s ImageNet weights without top, and its download URL.

    The names are tf_keras.applications' own; MobileNetV2 has files for square inputs of
    96, 128, 160, 192 or 224 pixels and takes the 224 one for any other input.
    """
    if cfg.arch == "mobilenet_v2":
        h, w = input_shape[:2]
        rows = h if h == w and h in (96, 128, 160, 192, 224) else 224
        name = (
            f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(cfg.alpha)}_{rows}_no_top.h5"
        )
    elif cfg.arch == "mobilenet_v3_small":
        name = f"weights_mobilenet_v3_small_224_{cfg.alpha}_float_no_top_v2.h5"
    elif cfg.arch == "vgg16":
        name = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    else:
        name = "efficientnetb0_notop.h5"
    return name, ARCHS[cfg.arch].url + name


def keras_models_dir() -> Path:
    """Where tf_keras' `get_file` keeps application weights: ~/.keras/models.

    As tf_keras decides it: `~/.keras` (HOME, not KERAS_HOME), or `/tmp/.keras` when that
    is not writable (or does not exist).
    """
    base = os.path.expanduser(os.path.join("~", ".keras"))
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return Path(base) / "models"


def check_input(cfg: KerasAppConfig, input_shape: tuple[int, int, int]) -> None:
    """Refuse, before TensorFlow builds anything, images or ImageNet weights `cfg` cannot use.

    Raises:
        ConfigError: images below the architecture's minimum or of neither 1 nor 3 channels;
            `weights=imagenet` whose file is not in Keras' cache folder (never downloaded).
    """
    h, w, channels = input_shape
    spec = ARCHS[cfg.arch]
    if min(h, w) < spec.min_size:
        raise ConfigError(
            f"model.arch={cfg.arch} needs images of at least {spec.min_size}x{spec.min_size} "
            f"pixels, but the data set's are {h}x{w}: set dataset.image_size >= {spec.min_size}"
        )
    if channels not in (1, 3):
        raise ConfigError(
            f"model.arch={cfg.arch} takes RGB (or grayscale) images, not {channels} channels"
        )
    if cfg.weights == IMAGENET:
        name, url = imagenet_file(cfg, input_shape)
        folder = keras_models_dir()
        if not (folder / name).is_file():
            raise ConfigError(
                f"model.weights=imagenet: {cfg.arch} needs {name} in {folder}, where Keras "
                f"looks for it, and fallopt does not download: put the file there (from {url}), "
                "or set model.weights=null or model.weights=PATH (a backbone weights file)"
            )


def build(
    cfg: KerasAppConfig, input_shape: tuple[int, int, int], num_classes: int
) -> tf_keras.Model:
    """Build the (uncompiled, flat) model for images of `input_shape` and `num_classes`.

    Raises:
        ConfigError: see `check_input`; the weights do not load; `unfreeze_layers` exceeds
            the backbone's layers.
    """
    check_input(cfg, input_shape)
    k = keras()
    spec = ARCHS[cfg.arch]
    make = getattr(k.applications, spec.constructor)
    # input_shape also with input_tensor: MobileNetV2 picks its ImageNet file by it.
    kwargs: dict[str, Any] = {
        "include_top": False,
        "weights": cfg.weights,
        "input_shape": (*input_shape[:2], 3),
        **dict(spec.kwargs),
    }
    if spec.has_alpha:
        kwargs["alpha"] = cfg.alpha
    inputs = k.Input(input_shape, name="input")
    x = inputs
    if input_shape[-1] == 1:
        x = k.layers.Concatenate(name=GRAY_TO_RGB)([x, x, x])
    if spec.caffe:
        x = _caffe_preprocess()(x)
    rebuild = x is not inputs and cfg.weights is not None
    try:
        if rebuild:
            # Keras loads weights by position, into a model of its own layers only: the
            # backbone is built alone, then its layers are called on the preprocessed input.
            source = make(**kwargs)
            features = source.call(x)
        else:  # built on `x` itself, so its layers are the model's
            features = make(input_tensor=x, **kwargs).output
    except Exception as error:  # a user's weights file: any failure is theirs to fix
        if cfg.weights is None:
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"model.weights={cfg.weights}: {cfg.arch} cannot load it ({first})"
        ) from error
    model = k.Model(inputs, _head(cfg, features, num_classes), name=cfg.name)
    if rebuild:
        # The backbone's layers now also hold the nodes of the discarded model, which makes
        # their `input` and `output` ambiguous: the same graph from fresh layers, same names.
        weights = model.get_weights()
        model = k.Model.from_config(model.get_config())
        model.set_weights(weights)
    if cfg.unfreeze_layers is not None and cfg.fine_tune_epochs:
        n = len(backbone_layers(model))
        require(
            cfg.unfreeze_layers <= n,
            "model.unfreeze_layers",
            cfg.unfreeze_layers,
            f"model.arch={cfg.arch} has {n} backbone layers",
        )
    set_backbone_trainable(model, not cfg.freeze)
    return model


def _caffe_preprocess() -> tf_keras.layers.Layer:
    """RGB to BGR minus the ImageNet means, as a frozen 1x1 convolution (TFLite: CONV_2D)."""
    k = keras()
    swap = [[[[1.0 if i + o == 2 else 0.0 for o in range(3)] for i in range(3)]]]
    return k.layers.Conv2D(
        3,
        1,
        name=CAFFE,
        trainable=False,
        kernel_initializer=k.initializers.Constant(swap),
        bias_initializer=k.initializers.Constant([-m for m in CAFFE_MEANS_BGR]),
    )


def _head(cfg: KerasAppConfig, features: Any, num_classes: int) -> Any:
    """Pooling, then per hidden width [dropout, Dense relu], then dropout, Dense softmax."""
    layers = keras().layers

    def dropout(x: Any, i: int) -> Any:
        return layers.Dropout(cfg.dropout, name=f"{HEAD_PREFIX}dropout{i}")(x) if cfg.dropout else x

    x = layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(features)
    for i, units in enumerate(cfg.dense_units, start=1):
        x = layers.Dense(units, activation="relu", name=f"{HEAD_PREFIX}dense{i}")(dropout(x, i))
    x = dropout(x, len(cfg.dense_units) + 1)
    return layers.Dense(num_classes, activation="softmax", name="output")(x)


def backbone_layers(model: tf_keras.Model) -> list[tf_keras.layers.Layer]:
    """The backbone's layers in Keras' order: neither input, preprocessing nor head."""
    own = (GRAY_TO_RGB, CAFFE, "output")
    return [
        layer
        for layer in model.layers
        if not isinstance(layer, keras().layers.InputLayer)
        and layer.name not in own
        and not layer.name.startswith(HEAD_PREFIX)
    ]


def set_backbone_trainable(
    model: tf_keras.Model, trainable: bool, last: int | None = None, batch_norm: bool = True
) -> None:
    """Freeze or unfreeze the backbone (only its `last` layers if given; the rest frozen).

    With `batch_norm` False its BatchNormalization layers stay frozen, in inference mode.
    """
    bn = keras().layers.BatchNormalization
    layers = backbone_layers(model)
    first = 0 if last is None else len(layers) - last
    for i, layer in enumerate(layers):
        layer.trainable = trainable and i >= first and (batch_norm or not isinstance(layer, bn))


def fit_baseline(
    cfg: KerasAppConfig,
    model: tf_keras.Model,
    train: Split,
    val: Split,
    train_cfg: TrainConfig,
    seed: int,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule | None = None,
) -> dict[str, list[float]]:
    """Train the head (and the backbone unless frozen), then fine-tune the unfrozen backbone.

    The fine-tune (`model.fine_tune_epochs`) trains the backbone's last `unfreeze_layers`
    layers (all if null) at `fine_tune_learning_rate`, its BatchNormalization layers frozen.
    Returns one history over both phases; `on_epoch_end` counts epochs on across them.
    `rule` None is fallopt's UNIT, as for `train_model`.
    """
    from fallopt.data import UNIT
    from fallopt.train import fit

    rule = rule or UNIT
    set_backbone_trainable(model, not cfg.freeze)
    epochs = train_cfg.epochs or 0
    history = fit(model, train, val, train_cfg, epochs, seed, on_epoch_end, rule=rule)
    if not cfg.fine_tune_epochs:
        return history
    set_backbone_trainable(model, True, cfg.unfreeze_layers, batch_norm=False)
    lr = cfg.fine_tune_learning_rate or train_cfg.learning_rate / 10
    tuned = fit(
        model,
        train,
        val,
        dataclasses.replace(train_cfg, learning_rate=lr),
        cfg.fine_tune_epochs,
        seed,
        _counted_on(on_epoch_end, epochs),
        rule=rule,
    )
    return {key: history.get(key, []) + tuned.get(key, []) for key in {**history, **tuned}}


def _counted_on(hook: EpochHook | None, offset: int) -> EpochHook | None:
    """`hook` told epoch `offset + epoch`: one count across training phases."""
    if hook is None:
        return None
    return lambda epoch, logs: hook(offset + epoch, logs)
