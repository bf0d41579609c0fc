"""Loading a user's Keras file as tf_keras: Keras 2 files directly, Keras 3 files rebuilt."""

from __future__ import annotations

import zipfile

import fallopt  # noqa: F401  (sets TF_USE_LEGACY_KERAS before `keras` imports TensorFlow)

# isort: split
import keras
import numpy as np
import pytest

from fallopt.backend import keras as tf_keras
from fallopt.errors import ConfigError
from fallopt.models import keras_file
from fallopt.models.keras_file import load_keras_file, outputs_probabilities

SHAPE = (16, 16, 3)


def _randomized(model):
    """`model` with random weights (so a swap would show), small enough not to saturate."""
    rng = np.random.default_rng(1)
    for weight in model.weights:
        low, high = (0.5, 1.5) if "variance" in weight.name else (-0.5, 0.5)
        weight.assign(rng.uniform(low, high, weight.shape).astype(np.float32))
    return model


def _batch():
    return np.random.default_rng(2).random((4, *SHAPE), dtype=np.float32)


def _names(model):
    return [
        (layer.name, _names(layer) if hasattr(layer, "layers") else None) for layer in model.layers
    ]


def _saved(model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    model.save(path)
    return path


def _assert_rebuilt(source, path):
    loaded = load_keras_file(path)
    assert isinstance(loaded, tf_keras().Model)
    assert loaded.count_params() == source.count_params()
    assert _names(loaded) == _names(source)
    np.testing.assert_allclose(loaded(_batch()), source(_batch()), atol=1e-5)
    return loaded


def _cnn(lib, **head):
    layers = lib.layers
    return lib.Sequential(
        [
            layers.InputLayer(SHAPE, name="input"),
            layers.Conv2D(4, 3, activation="relu", name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Flatten(name="flatten"),
            layers.Dense(8, activation="relu", kernel_regularizer="l2", name="dense1"),
            layers.Dropout(0.2, name="dropout"),
            layers.Dense(**({"units": 3, "activation": "softmax"} | head), name="output"),
        ]
    )


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_sequential_is_rebuilt(tmp_path, suffix):
    source = _randomized(_cnn(keras))
    loaded = _assert_rebuilt(source, _saved(source, tmp_path, suffix))
    assert isinstance(loaded, tf_keras().Sequential)
    assert loaded.get_layer("dense1").kernel_regularizer.l2 == pytest.approx(0.01)
    assert outputs_probabilities(loaded)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_tf_keras_files_load_directly(tmp_path, suffix):
    source = _randomized(_cnn(tf_keras()))
    _assert_rebuilt(source, _saved(source, tmp_path, suffix))


def test_keras3_functional_with_add_and_concatenate(tmp_path):
    layers = keras.layers
    image = keras.Input(SHAPE, name="image")
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(image)
    y = layers.BatchNormalization(name="bn2")(layers.Conv2D(4, 3, padding="same", name="conv2")(x))
    x = layers.Concatenate(name="concat")([layers.Add(name="residual")([x, y]), x])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    source = _randomized(keras.Model(image, layers.Dense(2, "softmax", name="output")(x)))
    _assert_rebuilt(source, _saved(source, tmp_path, ".keras"))


def test_keras3_models_nested_in_functional(tmp_path):
    layers = keras.layers
    inner = keras.Input(SHAPE)
    backbone = keras.Model(inner, layers.BatchNormalization()(layers.Conv2D(4, 3)(inner)))
    branch = keras.Sequential([keras.Input(SHAPE), layers.Conv2D(4, 3)], name="branch")
    image = keras.Input(SHAPE)
    x = layers.Add()([backbone(image), branch(image)])
    head = layers.Dense(2, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    source = _randomized(keras.Model(image, head))
    _assert_rebuilt(source, _saved(source, tmp_path, ".keras"))


def test_keras3_arithmetic_on_tensors_becomes_layers(tmp_path):
    image = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, name="conv1")(image)
    y = keras.layers.Conv2D(4, 3, name="conv2")(image)
    x = keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # MobileNetV3's hard sigmoid
    x = (2.0 - x) / 4 - y * x
    head = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    source = _randomized(keras.Model(image, head))
    loaded = load_keras_file(_saved(source, tmp_path, ".keras"))
    np.testing.assert_allclose(loaded(_batch()), source(_batch()), atol=1e-5)
    kinds = [type(layer).__name__ for layer in loaded.layers]
    assert kinds.count("Rescaling") == 4 and {"Subtract", "Multiply"} <= set(kinds)


def test_keras3_application_nested_in_sequential(tmp_path):
    backbone = keras.applications.MobileNetV2(
        alpha=0.35, weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    head = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")]
    source = _randomized(keras.Sequential([keras.Input((32, 32, 3)), backbone, *head]))
    path = _saved(source, tmp_path, ".keras")
    loaded = load_keras_file(path)
    assert _names(loaded) == _names(source)
    assert loaded.layers[0].get_layer("block_1_expand").kernel.shape == (1, 1, 8, 48)
    batch = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(loaded(batch), source(batch), atol=1e-5)
    features = loaded.layers[0](batch)  # finer than the two probabilities
    np.testing.assert_allclose(features, source.layers[0](batch), atol=1e-5)


def test_a_rebuild_that_predicts_otherwise_is_a_bug(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_file, "_copy_weights", lambda source, target: None)
    path = _saved(_randomized(_cnn(keras)), tmp_path, ".keras")
    with pytest.raises(RuntimeError, match="predicts otherwise"):
        load_keras_file(path)


def test_logits_get_a_softmax(tmp_path):
    source = _randomized(_cnn(keras, activation=None))
    loaded = load_keras_file(_saved(source, tmp_path, ".keras"))
    assert loaded.layers[-1].name == "probabilities" and outputs_probabilities(loaded)
    probabilities = np.asarray(loaded(_batch()))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(1), np.argmax(source(_batch()), 1))


@pytest.mark.parametrize("activation", ["sigmoid", None])
def test_binary_head_becomes_two_class_softmax(tmp_path, activation):
    source = _randomized(_cnn(keras, units=1, activation=activation))
    loaded = load_keras_file(_saved(source, tmp_path, ".keras"))
    assert loaded.layers[-1].name == "output" and loaded.output_shape == (None, 2)
    positive = np.asarray(source(_batch()))[:, 0]
    if activation is None:
        positive = 1 / (1 + np.exp(-positive))
    np.testing.assert_allclose(
        np.asarray(loaded(_batch())), np.stack([1 - positive, positive], 1), atol=1e-5
    )


def test_multi_label_and_multi_output_models_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="sigmoid per class"):
        load_keras_file(_saved(_cnn(keras, activation="sigmoid"), tmp_path, ".keras"))
    image = keras.Input(SHAPE)
    x = keras.layers.Flatten()(image)
    two = keras.Model(image, [keras.layers.Dense(2)(x), keras.layers.Dense(3)(x)])
    with pytest.raises(ConfigError, match="2 outputs"):
        load_keras_file(_saved(two, tmp_path, ".keras"))


@keras.saving.register_keras_serializable(package="fallopt_test")
class Doubling(keras.layers.Layer):
    def call(self, x):
        return 2 * x


class Tripling(keras.layers.Layer):  # unregistered: Keras 3 itself cannot load it
    def call(self, x):
        return 3 * x


@pytest.mark.parametrize(
    ("odd", "named"),
    [
        (lambda: Doubling(name="odd"), "layer 'odd' (Doubling)"),
        (lambda: Tripling(name="odd"), "layer 'odd' (Tripling)"),
        (lambda: keras.layers.Lambda(lambda x: 2 * x, name="odd"), "layer 'odd' (Lambda)"),
        (
            lambda: keras.layers.Dense(2, activation="hard_silu", name="odd"),
            "layer 'odd' (Dense, activation hard_silu)",
        ),
        (lambda: keras.ops.relu, "operation 'relu' (Relu)"),
    ],
    ids=["registered", "unregistered", "lambda", "activation", "operation"],
)
def test_what_tf_keras_lacks_is_named(tmp_path, odd, named):
    image = keras.Input(SHAPE)
    x = keras.layers.Flatten()(odd()(image))
    path = _saved(keras.Model(image, keras.layers.Dense(2)(x)), tmp_path, ".keras")
    with pytest.raises(ConfigError) as raised:
        load_keras_file(path)
    assert str(raised.value).startswith(f"model.path={path}: {named} cannot be rebuilt")
    assert "save the model with tf_keras" in str(raised.value) and "\n" not in str(raised.value)


def _zip_without_config(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model.weights.h5", b"")


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("missing.keras", lambda path: None, "no such file"),
        ("folder.keras", lambda path: path.mkdir(), "a directory"),
        ("noise.keras", lambda path: path.write_bytes(bytes(range(256)) * 4), "neither a zip"),
        ("archive.keras", _zip_without_config, "zip without config.json"),
        ("weights.h5", lambda path: _cnn(tf_keras()).save_weights(path), "without a model"),
    ],
)
def test_files_that_are_no_keras_model_are_named(tmp_path, name, make, problem):
    path = tmp_path / name
    make(path)
    with pytest.raises(ConfigError, match=problem) as raised:
        load_keras_file(path)
    assert str(raised.value).startswith(f"model.path={path} is not a Keras model file")
    assert ".keras file saved by Keras 3 or tf_keras" in str(raised.value)
