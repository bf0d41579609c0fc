"""A user's trained Keras model file, loaded as a tf_keras (Keras 2) model.

tfmot prunes and quantizes only Keras 2 models, but since TensorFlow 2.16 `model.save` writes
Keras 3 files. A file saved by Keras 2 (tf_keras, or tf.keras up to TF 2.15) loads with tf_keras
directly. A Keras 3 file is opened with Keras 3 (`import keras`, which stays Keras 3 beside
tf_keras), its config translated to the one tf_keras would have written, the same architecture
rebuilt in tf_keras with identical layer names (pruning scopes refer to them), the weights
copied layer by layer, and the predictions of both models compared.
"""

from __future__ import annotations

import inspect
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from omegaconf import MISSING

from fallopt.backend import keras
from fallopt.config import ModelConfig
from fallopt.errors import ConfigError
from fallopt.identity import file_digest

if TYPE_CHECKING:
    import tf_keras

_FORMATS = "expected a .keras file saved by Keras 3 or tf_keras, or an .h5 file saved by Keras 2"
_MODELS = {"Sequential", "Functional", "Model"}
# Rescaling's (scale, offset) computing Keras 3's operation on a tensor x and a number c, keyed
# by the operation and whether x comes first: x + c, c + x, x - c, c - x, x * c, c * x, x / c.
_AFFINE = {
    ("Add", True): lambda c: (1, c),
    ("Add", False): lambda c: (1, c),
    ("Subtract", True): lambda c: (1, -c),
    ("Subtract", False): lambda c: (-1, c),
    ("Multiply", True): lambda c: (c, 0),
    ("Multiply", False): lambda c: (c, 0),
    ("TrueDivide", True): lambda c: (1 / c, 0),
}


def load_keras_file(path: Path) -> tf_keras.Model:
    """Load the model in `path` as an uncompiled tf_keras model of one input and one output.

    The loader changes the model only so that it outputs one probability per class:
    a model ending in logits (no softmax) gets a `Softmax` layer named "probabilities"
    appended; a binary head `Dense(1)` with sigmoid or no activation becomes `Dense(2,
    softmax)` of the same name, kernel `[0 | w]` and bias `[0 | b]`, so that its outputs are
    exactly `[1 - sigmoid(z), sigmoid(z)]`, for classes 0 and 1. A Keras 3 model's arithmetic on
    symbolic tensors (`x + 3.0`, `x * y`), which Keras 3 keeps as operations, not layers,
    becomes Rescaling, Add, Subtract or Multiply layers of the same names.

    Raises:
        ConfigError: the file is missing or not a Keras model, has a layer tf_keras cannot
            rebuild (custom, Lambda, a class or activation only Keras 3 has, another Keras 3
            operation), or is no classifier of one input and one output.
        RuntimeError: the rebuilt model does not predict what the Keras 3 model predicts.
    """
    keras3, config = _read(path)
    if keras3:  # translated first: a layer Keras 3 cannot deserialize gets the same error
        model, source = _rebuild(path, config), _load_keras3(path)
    else:
        try:
            model = keras().models.load_model(path, compile=False)
        except Exception as error:  # a user's file: any failure is theirs to fix
            raise ConfigError(
                f"model.path={path}: tf_keras cannot load it ({_first_line(error)}); save it "
                "with built-in layers only"
            ) from error
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(
            f"model.path={path} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "fallopt expects an image classifier with one input and one output"
        )
    if keras3:
        _copy_weights(source, model)
        batch = np.random.default_rng(0).random(
            (2, *(d or 32 for d in model.input_shape[1:])), dtype=np.float32
        )
        if not np.allclose(source(batch, training=False), model(batch, training=False), atol=1e-5):
            raise RuntimeError(f"model.path={path}: the tf_keras rebuild predicts otherwise")
    return _with_probabilities(model, path)


def outputs_probabilities(model: tf_keras.Model) -> bool:
    """Whether `model` ends in a softmax (a Softmax layer, or a layer activated by softmax)."""
    layer = _output_layer(model)
    while isinstance(layer, keras().Model):  # a nested model's own output layer decides
        layer = _output_layer(layer)
    return isinstance(layer, keras().layers.Softmax) or _activation(layer) == "softmax"


def _read(path: Path) -> tuple[bool, dict[str, Any]]:
    """Whether Keras 3 saved `path`, and the model config saved in it."""
    import h5py

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"model.path={path} is not a Keras model file ({problem}); {_FORMATS}")

    if not path.is_file():
        raise refuse("a directory" if path.is_dir() else "no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"config.json", "metadata.json"} <= names:
                raise refuse("a zip without config.json and metadata.json")
            version = json.loads(archive.read("metadata.json")).get("keras_version", "")
            config = json.loads(archive.read("config.json"))
        suffixes = (".keras",)
    elif h5py.is_hdf5(path):
        with h5py.File(path, "r") as file:
            if "model_config" not in file.attrs:
                raise refuse("an HDF5 file without a model, e.g. weights only")
            version = file.attrs.get("keras_version", "")
            config = json.loads(file.attrs["model_config"])
        suffixes = (".h5", ".hdf5")
    else:
        raise refuse("neither a zip nor an HDF5 file")
    if path.suffix not in suffixes:  # both Keras load formats by name
        raise ConfigError(
            f"model.path={path} holds a {suffixes[0]} model: rename it to {suffixes[0]}"
        )
    version = version.decode() if isinstance(version, bytes) else str(version)
    return version.startswith("3"), config


def _load_keras3(path: Path) -> Any:
    import keras as keras3

    try:
        return keras3.saving.load_model(path, compile=False)
    except Exception as error:  # a user's file: any failure is theirs to fix
        raise ConfigError(
            f"model.path={path}: Keras 3 cannot load it ({_first_line(error)}); save it again "
            "with Keras 3 or tf_keras"
        ) from error


def _rebuild(path: Path, config: dict[str, Any]) -> tf_keras.Model:
    """The tf_keras model (random weights) of the Keras 3 `config`."""
    spec = _layer(config, path)
    try:
        return keras().layers.deserialize(spec, use_legacy_format=True)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"model.path={path}: tf_keras cannot rebuild this Keras 3 model "
            f"({_first_line(error)}); save the model with tf_keras"
        ) from error


def _layer(entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """A Keras 3 layer or model entry of a config, as tf_keras (legacy format) writes it."""
    name, config = entry["class_name"], dict(entry["config"])
    module = entry.get("module", "keras.layers")
    what = "operation" if module.startswith("keras.src.ops") else "layer"  # e.g. `x + 3.0`
    activation = config.get("activation")
    foreign = isinstance(activation, str) and not _tf_keras_has(activation)
    unbuildable = ConfigError(
        f"model.path={path}: {what} '{config.get('name')}' ({name}"
        f"{f', activation {activation}' if foreign else ''}) cannot be rebuilt in tf_keras, "
        "which pruning and quantization need; save the model with tf_keras, or replace "
        f"'{config.get('name')}' with built-in layers"
    )
    if foreign:
        raise unbuildable
    if what == "operation":
        return _operation(entry, unbuildable)
    if name in _MODELS:
        config = {k: _value(v, unbuildable) for k, v in config.items() if k != "layers"}
        config["layers"] = [_layer(layer, path) for layer in entry["config"]["layers"]]
        _count_own_nodes(config)
    else:
        cls = _builtin(module, name)
        if cls is None or name == "Lambda":  # Keras 3 stores a Lambda's code its own way
            raise unbuildable
        if "batch_shape" in config:  # InputLayer
            config["batch_size"], *config["input_shape"] = config.pop("batch_shape")
        if name == "LeakyReLU":
            config["alpha"] = config.pop("negative_slope")
        config = _accepted(cls, _value(config, unbuildable))
    spec = {"class_name": name, "config": config}
    if "inbound_nodes" in entry:  # a layer of a Functional graph
        spec["name"] = entry["name"]
        spec["inbound_nodes"] = [_node(node) for node in entry["inbound_nodes"]]
    return spec


def _operation(entry: dict[str, Any], unbuildable: ConfigError) -> dict[str, Any]:
    """A Keras 3 arithmetic operation in a graph as the built-in layer computing it.

    Keras 3 records `x + y` on symbolic tensors as an operation, not a layer (MobileNetV3's
    hard sigmoid is `relu6(x + 3.0) * (1.0 / 6.0)`). Two tensors become an Add, Subtract or
    Multiply layer; a tensor and a number a Rescaling (`x * scale + offset`).
    """
    kind, nodes = entry["class_name"], entry["inbound_nodes"]
    args = nodes[0]["args"] if len(nodes) == 1 else []
    tensors = [arg for arg in args if isinstance(arg, dict)]
    numbers = [arg for arg in args if isinstance(arg, int | float)]
    if len(tensors) == 2 and kind in ("Add", "Subtract", "Multiply"):
        layer, config, inputs = kind, {}, tensors
    elif len(tensors) == len(numbers) == 1 and (kind, args[0] is tensors[0]) in _AFFINE:
        scale, offset = _AFFINE[kind, args[0] is tensors[0]](numbers[0])
        layer, config, inputs = "Rescaling", {"scale": scale, "offset": offset}, tensors[0]
    else:
        raise unbuildable
    name = entry["name"]
    return {
        "class_name": layer,
        "config": {"name": name, **config},
        "name": name,
        "inbound_nodes": [_node({"args": [inputs], "kwargs": {}})],
    }


def _count_own_nodes(config: dict[str, Any]) -> None:
    """Shift each call of a nested model one node on, as tf_keras expects.

    tf_keras counts a model's own graph as its node 0, Keras 3 does not; unshifted, tf_keras
    would wait forever for the nested model's node 0 to be called.
    """
    nested = {
        layer["config"]["name"] for layer in config["layers"] if layer["class_name"] in _MODELS
    }
    outputs = config.get("output_layers") or []
    calls = [
        call
        for layer in config["layers"]
        for node in layer.get("inbound_nodes", [])
        for call in node
    ]
    calls += [outputs] if outputs and isinstance(outputs[0], str) else outputs
    for call in calls:
        if call[0] in nested:
            call[1] += 1


def _value(obj: Any, unbuildable: ConfigError) -> Any:
    """A config value with Keras 3 objects (initializers, regularizers, ...) as tf_keras's."""
    if isinstance(obj, list | tuple):
        return [_value(item, unbuildable) for item in obj]
    if not isinstance(obj, dict):
        return obj
    if not {"module", "class_name", "config"} <= obj.keys():
        return {key: _value(item, unbuildable) for key, item in obj.items()}
    if obj["class_name"].endswith("DTypePolicy"):  # tf_keras takes the policy's name
        return obj["config"]["name"]
    cls = _builtin(obj["module"], obj["class_name"])
    if cls is None:
        raise unbuildable
    return {
        "class_name": obj["class_name"],
        "config": _accepted(cls, _value(obj["config"], unbuildable)),
    }


def _node(node: dict[str, Any]) -> list[list[Any]]:
    """A Keras 3 call `{"args", "kwargs"}` as tf_keras's `[[layer, node, tensor, kwargs], ...]`."""
    inputs = node["args"][0]
    kwargs = {k: v for k, v in node["kwargs"].items() if v is not None}  # Keras 3 adds mask=None
    return [
        [*tensor["config"]["keras_history"], kwargs]
        for tensor in (inputs if isinstance(inputs, list) else [inputs])
    ]


def _builtin(module: str, name: str) -> type | None:
    """The tf_keras class of a class Keras 3 serialized from `module`; None if not built in."""
    top, _, namespace = module.partition(".")
    return getattr(getattr(keras(), namespace, None), name, None) if top == "keras" else None


def _tf_keras_has(activation: str) -> bool:
    """Whether tf_keras computes Keras 3's `activation` (measured: many are missing)."""
    try:
        keras().activations.get(activation)
    except ValueError:
        return False
    return activation != "hard_sigmoid"  # Keras 3's is relu6(x + 3) / 6, Keras 2's 0.2x + 0.5


def _accepted(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """`config` without the keys `cls` does not take (Keras 3 adds some, e.g. `lora_rank`)."""
    taken = {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name in inspect.signature(klass.__init__).parameters
    }
    return {key: value for key, value in config.items() if key in taken}


def _copy_weights(source: Any, target: tf_keras.Model) -> None:
    """Copy a Keras 3 model's weights into its tf_keras rebuild, layer by layer by name."""
    twins = {layer.name: layer for layer in target.layers}
    for layer in source.layers:
        if hasattr(layer, "layers"):  # a nested model
            _copy_weights(layer, twins[layer.name])
        else:
            twins[layer.name].set_weights(layer.get_weights())


def _with_probabilities(model: tf_keras.Model, path: Path) -> tf_keras.Model:
    """`model` ending in a softmax over classes (see `load_keras_file`)."""
    if outputs_probabilities(model):
        return model
    k = keras()
    last = _output_layer(model)
    if model.output_shape[-1] > 1:
        if _activation(last) == "sigmoid":
            raise ConfigError(
                f"model.path={path} ends in a sigmoid per class (multi-label); fallopt expects "
                "one softmax over classes: end the model with Dense(classes, softmax)"
            )
        return _replace_output(model, k.layers.Softmax(name="probabilities"), replace=False)
    if not isinstance(last, k.layers.Dense) or _activation(last) not in ("sigmoid", "linear"):
        raise ConfigError(
            f"model.path={path} ends in one unit ({last.name}, {type(last).__name__}); fallopt "
            "expects one output per class: end the model with Dense(classes, softmax)"
        )
    kernel, *bias = last.get_weights()
    binary = k.layers.Dense.from_config({**last.get_config(), "units": 2, "activation": "softmax"})
    model = _replace_output(model, binary, replace=True)
    # softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]: a zero logit for class 0
    binary.set_weights([np.concatenate([np.zeros_like(w), w], axis=-1) for w in (kernel, *bias)])
    return model


def _replace_output(
    model: tf_keras.Model, layer: tf_keras.layers.Layer, replace: bool
) -> tf_keras.Model:
    """`model` with `layer` after its output layer, or instead of it if `replace`."""
    if isinstance(model, keras().Sequential):  # stays Sequential
        if replace:
            model.pop()
        model.add(layer)
        return model
    inputs = _output_layer(model).input if replace else model.output
    return keras().Model(model.inputs, layer(inputs), name=model.name)


def _output_layer(model: tf_keras.Model) -> tf_keras.layers.Layer:
    return model.get_layer(model.output_names[0])


def _activation(layer: tf_keras.layers.Layer) -> str | None:
    return getattr(getattr(layer, "activation", None), "__name__", None)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@dataclass
class KerasFileConfig(ModelConfig):
    """A trained model file (`model.path`), which is the baseline: taken as it is by default.

    Its content, not its path, is the model's identity: the same file moved is the same run,
    another file at the same path a new one.
    """

    name: str = "keras_file"
    path: str = MISSING

    default_epochs: ClassVar[int] = 0

    def ignored(self) -> set[str]:
        """The path: the content counts (`sources`)."""
        return {"path"}

    def sources(self) -> dict[str, str]:
        """The file's content."""
        return {"file": file_digest(self.path)}

    def source_file(self) -> Path:
        """The file the baseline is loaded from."""
        return Path(self.path)


def build(cfg: KerasFileConfig, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """The file's model, checked against the data: same image shape, one output per class.

    Raises:
        ConfigError: naming both shapes, or both class counts, and what to change.
    """
    model = load_keras_file(Path(cfg.path))
    takes = tuple(model.input_shape[1:])
    if any(want is not None and want != got for want, got in zip(takes, input_shape, strict=True)):
        h, w, c = (d or "any" for d in takes)
        raise ConfigError(
            f"model.path={cfg.path} takes {h}x{w}x{c} images but the data set's are "
            f"{'x'.join(map(str, input_shape))}: set dataset.image_size and dataset.channels "
            "to the model's (file-based data sets resize), or use the model's own data"
        )
    outputs = model.output_shape[-1]
    if outputs != num_classes:
        raise ConfigError(
            f"model.path={cfg.path} outputs {outputs} classes but the data set has "
            f"{num_classes}: use the data set the model was trained for, or a model with "
            f"{num_classes} outputs"
        )
    return model


SCHEMA = KerasFileConfig
