"""keras_app: Keras Applications backbones with a classification head (weights=None, 32x32)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fallopt.backend import keras as tf_keras
from fallopt.config import TrainConfig, as_dict, validate
from fallopt.data import InputRule, Split
from fallopt.errors import ConfigError
from fallopt.models import keras_app
from fallopt.models.keras_app import KerasAppConfig

SHAPE = (32, 32, 3)
RULES = {
    "mobilenet_v2": [-1.0, 1.0],
    "mobilenet_v3_small": [-1.0, 1.0],
    "vgg16": [0.0, 255.0],
    "efficientnet_b0": [0.0, 255.0],
}


def _cfg(**changes: object) -> KerasAppConfig:
    return KerasAppConfig(**{"weights": None, "freeze": True, **changes})


def _images(n: int, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _split(n: int, seed: int) -> Split:
    return Split(_images(n, seed=seed), np.arange(n, dtype=np.int64) % 2)


def _state(model: Any) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in model.layers}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _perturbed(model: Any) -> Any:
    """`model` with weights no fresh build has (BatchNorm's zeros and ones included)."""
    rng = np.random.default_rng(4)
    for weight in model.weights:
        weight.assign(weight.numpy() + rng.uniform(0.5, 1.0, weight.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def keras_v2() -> Any:
    """tf_keras' own MobileNetV2 alpha 0.35 backbone at 32x32, random weights."""
    return _perturbed(
        tf_keras().applications.MobileNetV2(
            alpha=0.35, include_top=False, weights=None, input_shape=SHAPE
        )
    )


# The one model each architecture's tests share; mobilenet_v2 is the cheapest to train.
BUILT = {"mobilenet_v2": {"alpha": 0.35, "dense_units": [8]}}


@pytest.fixture(scope="module")
def built() -> Callable[[str], Any]:
    """Each architecture's model at 32x32, 2 classes, built once for the module."""
    models: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in models:
            models[arch] = keras_app.build(_cfg(arch=arch, **BUILT.get(arch, {})), SHAPE, 2)
        return models[arch]

    return get


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """No network, and a private HOME: Keras' cache folder is tmp_path/.keras/models."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".keras").mkdir()
    return tmp_path / ".keras" / "models"


@pytest.mark.parametrize("arch", sorted(RULES))
def test_every_arch_builds_flat_with_a_softmax_output(built, arch):
    model = built(arch)
    assert model.output_shape == (None, 2)
    assert model.get_layer("output").activation.__name__ == "softmax"
    assert not any(isinstance(layer, tf_keras().Model) for layer in model.layers)  # flat
    rule = InputRule(*KerasAppConfig(arch=arch, weights=None).input_range)
    probabilities = model(rule.apply(_images(2)), training=False).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_mobilenet_v2_is_keras_own_backbone_plus_the_head(built, keras_v2):
    model = built("mobilenet_v2")  # alpha 0.35, dense_units [8]
    assert model.count_params() == keras_v2.count_params() + (1280 * 8 + 8) + (8 * 2 + 2)
    assert [layer.name for layer in keras_app.backbone_layers(model)] == [
        layer.name for layer in keras_v2.layers[1:]
    ]


@pytest.mark.parametrize("arch", sorted(RULES))
def test_input_range_is_the_archs_own(arch):
    assert _cfg(arch=arch).input_range == RULES[arch]
    assert _cfg(arch=arch, input_range=RULES[arch]).input_range == RULES[arch]
    with pytest.raises(ConfigError, match=rf"model.input_range=.*model.arch={arch} takes"):
        _cfg(arch=arch, input_range=[0.0, 0.5])


def test_vgg16_preprocessing_in_the_model_is_keras_caffe_preprocessing(built):
    model = built("vgg16")
    layer = model.get_layer(keras_app.CAFFE)
    assert not layer.trainable
    front = tf_keras().Model(model.input, layer.output)
    images = _images(4, seed=3)
    ours = front(InputRule(*RULES["vgg16"]).apply(images)).numpy()
    theirs = tf_keras().applications.vgg16.preprocess_input(images.astype(np.float32))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_frozen_head_phase_then_fine_tune_of_the_last_layers(built):
    cfg = _cfg(**BUILT["mobilenet_v2"], fine_tune_epochs=1, unfreeze_layers=10)
    model = built("mobilenet_v2")  # trained here: the module's other tests only read it
    backbone = [layer.name for layer in keras_app.backbone_layers(model)]
    assert not any(model.get_layer(name).trainable for name in backbone)  # model.freeze
    head = ["head_dense1", "output"]
    bn = {layer.name for layer in model.layers if "BatchNorm" in type(layer).__name__}
    start, seen = _state(model), []

    def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
        seen.append((epoch, _state(model)))

    train_cfg = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3)
    history = keras_app.fit_baseline(
        cfg, model, _split(24, 1), _split(8, 2), train_cfg, 0, on_epoch_end, InputRule(-1, 1)
    )
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert all(len(values) == 2 for values in history.values())
    after_head, after_tune = seen[0][1], seen[1][1]
    # Head phase: the backbone (BatchNorm statistics included: inference mode) is untouched.
    assert all(_same(start[name], after_head[name]) for name in backbone)
    assert not any(_same(start[name], after_head[name]) for name in head)
    # Fine-tune: its last 10 layers learn, except BatchNorm; the rest stays.
    tuned = [name for name in backbone[-10:] if not _same(after_head[name], after_tune[name])]
    assert tuned and not set(tuned) & bn
    assert all(_same(after_head[name], after_tune[name]) for name in backbone[:-10])
    assert all(_same(after_head[name], after_tune[name]) for name in bn)
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)


V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{}_{}_no_top.h5"


@pytest.mark.parametrize(
    ("arch", "alpha", "shape", "file"),
    [
        ("mobilenet_v2", 0.35, (96, 96, 3), V2_FILE.format(0.35, 96)),
        ("mobilenet_v2", None, (48, 48, 1), V2_FILE.format(1.0, 224)),  # Keras' other sizes
        (
            "mobilenet_v3_small",
            0.75,
            SHAPE,
            "weights_mobilenet_v3_small_224_0.75_float_no_top_v2.h5",
        ),
        ("vgg16", None, SHAPE, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("efficientnet_b0", None, SHAPE, "efficientnetb0_notop.h5"),
    ],
)
def test_imagenet_weights_not_in_keras_cache_are_refused_naming_file_and_folder(
    offline, arch, alpha, shape, file
):
    cfg = KerasAppConfig(arch=arch, alpha=alpha, weights="imagenet")
    with pytest.raises(ConfigError) as error:
        keras_app.build(cfg, shape, 2)
    message = str(error.value)
    assert f"needs {file} in {offline}," in message and "\n" not in message


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A VGG16 backbone weights file (random weights) and its weights by layer."""
    own = _perturbed(tf_keras().applications.VGG16(include_top=False, weights=None))
    path = tmp_path_factory.mktemp("weights") / "vgg16_backbone.h5"
    own.save_weights(path)
    return path, {layer.name: layer.get_weights() for layer in own.layers[1:]}


def _check_backbone(model, expected: dict[str, list[np.ndarray]]) -> None:
    layers = keras_app.backbone_layers(model)
    assert [layer.name for layer in layers] == list(expected)
    assert all(_same(layer.get_weights(), expected[layer.name]) for layer in layers)
    for layer in model.layers:  # one graph: no layer shared with the model loaded into
        assert len(layer.inbound_nodes) == 1


def test_imagenet_weights_in_keras_cache_load(offline, keras_v2, tmp_path):
    offline.mkdir()
    keras_v2.save_weights(
        offline / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    )
    model = keras_app.build(_cfg(alpha=0.35, weights="imagenet"), SHAPE, 2)
    _check_backbone(model, {layer.name: layer.get_weights() for layer in keras_v2.layers[1:]})


def test_a_weights_file_loads_behind_preprocessing_layers(vgg_file):
    path, expected = vgg_file
    model = keras_app.build(_cfg(arch="vgg16", weights=str(path)), (32, 32, 1), 2)
    assert model.input_shape == (None, 32, 32, 1)
    assert [layer.name for layer in model.layers[1:3]] == [keras_app.GRAY_TO_RGB, keras_app.CAFFE]
    _check_backbone(model, expected)
    gray = _images(2, (32, 32, 1)).astype(np.float32)
    rgb = tf_keras().Model(model.input, model.get_layer(keras_app.GRAY_TO_RGB).output)(gray)
    assert (rgb.numpy() == np.repeat(gray, 3, axis=-1)).all()


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"arch": "resnet9"}, "model.arch='resnet9' is invalid: choose from"),
        ({"arch": "vgg16", "alpha": 0.5}, "model.alpha=0.5 is invalid: model.arch=vgg16 has no"),
        ({"alpha": 0.6, "weights": "imagenet"}, "ImageNet weights of mobilenet_v2 for alpha in"),
        ({"weights": "no/such.h5"}, "model.weights='no/such.h5' is invalid: no such file"),
        ({"fine_tune_epochs": 1, "freeze": False}, "needs model.freeze=true"),
        ({"dropout": 1.0}, "model.dropout=1.0 is invalid"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(changes, says):
    with pytest.raises(ConfigError, match=says):
        _cfg(**changes)


@pytest.mark.parametrize("arch", ["vgg16", "mobilenet_v3_small"])
def test_too_small_images_are_refused_naming_arch_minimum_and_image_size(arch):
    says = rf"{arch} needs images of at least 32x32 .* 16x16: set dataset.image_size >= 32"
    with pytest.raises(ConfigError, match=says):
        keras_app.build(_cfg(arch=arch), (16, 16, 3), 2)


def test_yaml_composes_to_the_schema_with_the_rule_applied(compose_cfg):
    cfg = validate(compose_cfg("model=keras_app", "model.arch=mobilenet_v2", "model.weights=null"))
    assert isinstance(cfg.model, keras_app.SCHEMA)
    assert cfg.model.input_range == [-1.0, 1.0] and cfg.model.alpha == 1.0
    assert cfg.model.freeze is False  # random weights: the backbone trains
    assert as_dict(cfg)["model"]["input_range"] == [-1.0, 1.0]  # what the run logs
    assert {"unfreeze_layers", "fine_tune_learning_rate"} <= cfg.model.ignored()
    with pytest.raises(ConfigError, match="model.arch='resnet9'"):
        validate(compose_cfg("model=keras_app", "model.arch=resnet9"))


@pytest.mark.slow  # MobileNetV2 at 96x96: head training, pruning and PQAT, about 2 minutes
def test_transfer_learning_mobilenet_v2_pruned_then_prune_preserving_qat_to_int8(
    compose_cfg, tmp_path, tracking_uri
):
    """The lab's optional part end to end: a frozen backbone, its head trained, the whole
    model pruned, then quantization-aware training that keeps the zeros, to an int8 file."""
    from mlflow.tracking import MlflowClient

    from fallopt.identity import config_hash
    from fallopt.litert import TFLiteModel
    from fallopt.task import run_experiment

    overrides = [
        "model=keras_app", "model.arch=mobilenet_v2", "model.alpha=0.35", "model.weights=null",
        "model.freeze=true", "model.fine_tune_epochs=1", "dataset.image_size=96",
        "dataset.n_train=60", "dataset.n_test=20", "train.epochs=1", "train.batch_size=16",
        "prune.scope=all", "prune.sparsity=0.5", "prune.fine_tune_epochs=1", "quant=pqat",
        f"tracking.uri={tracking_uri}",
    ]  # fmt: skip
    cfg = validate(compose_cfg(*overrides))
    run_experiment(cfg, config_hash(cfg), tmp_path / "out")

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags["fallopt.stage.quant"] == "pqat"
    assert run.data.params["model.input_range"] == "[-1.0, 1.0]"
    assert m["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    steps = [h.step for h in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [1, 2, 3, 4]  # head, backbone fine-tune, pruning, QAT: one epoch each
    path = client.download_artifacts(run.info.run_id, "model.tflite", str(tmp_path / "dl"))
    tflite = TFLiteModel(Path(path).read_bytes())
    # int8 weights whose pruned zeros survived QAT: at least the pruned kernels' share.
    assert tflite.weight_sparsity() > 0.3
    assert tflite.predict(_images(2, (96, 96, 3))).shape == (2, 2)
