"""Pruning nested models (a backbone inside a Sequential or Functional model) layer by layer."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.backend import keras
from fallopt.compress.prune import (
    TOLERANCE,
    PruningError,
    check_m_by_n,
    flatten_model,
    prune_and_fine_tune,
    select_layers,
    wrap_for_pruning,
)
from fallopt.compress.quantize import convert
from fallopt.compress.schedule import plan_schedule
from fallopt.config import ConfigError, PruneConfig, PruneMethod, QuantMode, TrainConfig
from fallopt.data import Split
from fallopt.size import save_model
from fallopt.train import seed_everything, steps_per_epoch

TRAIN = TrainConfig(epochs=1, batch_size=16)
# The course's study: PolynomialDecay from 0.5 to 0.75, masks updated every step.
STUDY = {"method": PruneMethod.polynomial, "initial_sparsity": 0.5, "sparsity": 0.75}


def _data(size: int, n: int = 32, classes: int = 3) -> tuple[Split, Split]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n + 16, size, size, 3), dtype=np.uint8)
    y = np.arange(n + 16) % classes
    return Split(x[:n], y[:n]), Split(x[n:], y[n:])


def _prune(model, tmp_path, scope: str, size: int, **kwargs):
    """Save `model` as the baseline, prune it for one epoch; return the result and the file."""
    baseline = save_model(model, tmp_path / "baseline.keras")
    train, val = _data(size)
    cfg = PruneConfig(scope=scope, fine_tune_epochs=1, frequency=1, **kwargs)
    schedule = plan_schedule(cfg, steps_per_epoch(len(train), TRAIN.batch_size))
    out = tmp_path / "pruned.keras"
    return prune_and_fine_tune(baseline, train, val, cfg, schedule, TRAIN, 0, out), baseline


def _zeros(model, name: str) -> float:
    return float((model.get_layer(name).kernel.numpy() == 0).mean())


def _assert_on_target(result, target: float) -> None:
    """Count the zeros of every pruned kernel in the returned model again."""
    for layer in result.layers:
        within = max(TOLERANCE, 1 / layer.params)  # a small kernel moves by whole weights
        assert _zeros(result.model, layer.layer) == pytest.approx(target, abs=within), layer


def _vgg_like(name: str = "backbone"):
    """A small Functional backbone named like VGG16's layers."""
    k = keras()
    inputs = k.Input((16, 16, 3))
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv1")(inputs)
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="block1_conv2")(x)
    x = k.layers.MaxPooling2D(name="block1_pool")(x)
    x = k.layers.Conv2D(16, 3, padding="same", activation="relu", name="block2_conv1")(x)
    return k.Model(inputs, k.layers.MaxPooling2D(name="block2_pool")(x), name=name)


def _head(backbone, classes: int = 3):
    """The course's transfer model: backbone, Flatten, Dense(64), Dense(n, softmax)."""
    layers = keras().layers
    return keras().Sequential(
        [
            backbone,
            layers.Flatten(),
            layers.Dense(64, activation="relu", name="fc"),
            layers.Dense(classes, activation="softmax", name="predictions"),
        ]
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The course's study on a small VGG-like backbone in a Sequential, scope `all`."""
    tmp_path = tmp_path_factory.mktemp("study")
    seed_everything(0)
    model = _head(_vgg_like())
    x = np.random.default_rng(1).random((4, 16, 16, 3), dtype=np.float32)
    before = model.predict(x, verbose=0)
    result, baseline = _prune(model, tmp_path, "all", 16, **STUDY)
    return result, baseline, x, before


@pytest.mark.slow  # the study fixture fine-tunes a VGG-like backbone: 20-30 s
def test_every_nested_kernel_reaches_the_final_sparsity(study):
    result, *_ = study
    names = [layer.layer for layer in result.layers]
    assert names == ["block1_conv1", "block1_conv2", "block2_conv1", "fc", "predictions"]
    _assert_on_target(result, 0.75)


@pytest.mark.slow  # shares the study
def test_the_pruned_file_is_flat_loads_converts_and_predicts(study):
    result, baseline, x, _ = study
    loaded = keras().models.load_model(baseline.with_name("pruned.keras"), compile=False)
    assert not any(isinstance(layer, keras().Model) for layer in loaded.layers)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0))
    assert convert(loaded, QuantMode.none)[4:8] == b"TFL3"


@pytest.mark.slow  # shares the study
def test_the_baseline_is_not_pruned_with_its_flattened_copy(study):
    """tfmot prunes the very layer objects it wraps: those of the flat copy, never the baseline."""
    _, baseline, x, before = study
    model = keras().models.load_model(baseline, compile=False)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
    assert _zeros(model.get_layer("backbone"), "block1_conv1") == 0
    flat = flatten_model(model)
    assert not {id(w) for w in flat.weights} & {id(w) for w in model.weights}
    for weight in flat.weights:
        weight.assign(np.zeros(weight.shape))  # what pruning does, and more
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)
    assert [layer.name for layer in model.layers][0] == "backbone"


def test_scope_patterns_match_nested_names_and_paths(tmp_path):
    model = _head(_vgg_like())
    assert select_layers(model, "backbone/.*") == ["block1_conv1", "block1_conv2", "block2_conv1"]
    assert select_layers(model, "conv") == ["block1_conv1", "block1_conv2", "block2_conv1"]
    result, _ = _prune(model, tmp_path, "block2_conv.*|pred.*", 16, sparsity=0.6)
    assert [layer.layer for layer in result.layers] == ["block2_conv1", "predictions"]
    assert _zeros(result.model, "block2_conv1") == pytest.approx(0.6, abs=TOLERANCE)
    assert _zeros(result.model, "block1_conv1") == 0 and _zeros(result.model, "fc") == 0


def test_names_shared_by_two_backbones_are_qualified_by_path(tmp_path):
    k = keras()
    inputs = k.Input((16, 16, 3))
    joined = k.layers.Concatenate()(
        [k.layers.Flatten()(_vgg_like(side)(inputs)) for side in ("left", "right")]
    )
    model = k.Model(inputs, k.layers.Dense(3, activation="softmax", name="head")(joined))
    assert select_layers(model, "left/.*") == [
        "left/block1_conv1",
        "left/block1_conv2",
        "left/block2_conv1",
    ]
    result, _ = _prune(model, tmp_path, "right/block1_conv1|head", 16, sparsity=0.5)
    assert [layer.layer for layer in result.layers] == ["right/block1_conv1", "head"]
    assert _zeros(result.model, "right/block1_conv1") == pytest.approx(0.5, abs=TOLERANCE)
    assert _zeros(result.model, "left/block1_conv1") == 0


def test_training_false_of_a_nested_call_stays_with_its_layers():
    """A frozen backbone called with training=False keeps BatchNorm in inference mode."""
    k = keras()
    inner_in = k.Input((8, 8, 3))
    bn = k.layers.BatchNormalization(name="bn")(k.layers.Conv2D(4, 3, name="conv")(inner_in))
    backbone = k.Model(inner_in, bn, name="backbone")
    inputs = k.Input((8, 8, 3))
    model = k.Model(inputs, k.layers.Flatten()(backbone(inputs, training=False)))
    x = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32) * 10
    flat = flatten_model(model)
    np.testing.assert_array_equal(flat(x, training=True), model(x, training=True))


def test_m_by_n_is_checked_on_nested_kernels():
    model = _head(_vgg_like())
    with pytest.raises(ConfigError, match="layer block1_conv1 has 3 inputs.*block1_conv2"):
        check_m_by_n(model, select_layers(model, "all"), [2, 4])


def test_a_layer_tfmot_cannot_wrap_is_named():
    """tfmot's registry knows Keras classes, not their subclasses."""
    k = keras()

    class ScaledDense(k.layers.Dense):
        pass

    inputs = k.Input((4,))
    inner = k.Model(inputs, ScaledDense(2, name="scaled")(inputs), name="inner")
    model = k.Sequential([inner, k.layers.Dense(2, name="out")])
    with pytest.raises(ConfigError, match=r"tfmot cannot wrap layer\(s\) scaled \(ScaledDense\)"):
        select_layers(model, "all")
    cfg = PruneConfig(fine_tune_epochs=1, sparsity=0.5)
    with pytest.raises(PruningError, match=r"tfmot cannot prune layer scaled \(ScaledDense\)"):
        wrap_for_pruning(flatten_model(model), {"scaled": 0.5}, plan_schedule(cfg, 2), None)


def test_mobilenetv2_depthwise_convs_are_left_dense():
    """tfmot 0.8.1 registers DepthwiseConv2D with no prunable weights: scope `all` skips it."""
    k = keras()
    backbone = k.applications.MobileNetV2(
        alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    names = select_layers(backbone, "all")
    assert "Conv1" in names and "block_16_project" in names
    assert not any("depthwise" in name for name in names)
    with pytest.raises(ConfigError, match="matches no Dense or Conv2D layer"):
        select_layers(backbone, "block_1_depthwise")


@pytest.mark.slow  # MobileNetV2's 150 layers: over a minute on 2 busy cores
def test_mobilenetv2_backbone_with_a_head_is_pruned(tmp_path):
    k = keras()
    backbone = k.applications.MobileNetV2(
        alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    inputs = k.Input((32, 32, 3))
    pooled = k.layers.GlobalAveragePooling2D()(backbone(inputs, training=False))
    model = k.Model(inputs, k.layers.Dense(3, activation="softmax", name="head")(pooled))
    result, _ = _prune(model, tmp_path, "conv", 32, sparsity=0.5)
    assert len(result.layers) == 35 and result.layers[0].layer == "Conv1"
    _assert_on_target(result, 0.5)
    depthwise = result.model.get_layer("block_1_depthwise").depthwise_kernel.numpy()
    assert not (depthwise == 0).any() and _zeros(result.model, "head") == 0


@pytest.mark.slow  # VGG16's 14.7 M weights: about a minute on 2 busy cores
def test_vgg16_in_a_sequential_reaches_the_course_sparsity(tmp_path):
    vgg = keras().applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    result, _ = _prune(_head(vgg), tmp_path, "all", 32, **STUDY)
    assert [layer.layer for layer in result.layers][:2] == ["block1_conv1", "block1_conv2"]
    assert len(result.layers) == 15  # 13 convs and 2 dense
    _assert_on_target(result, 0.75)
    loaded = keras().models.load_model(tmp_path / "pruned.keras", compile=False)
    assert convert(loaded, QuantMode.none)[4:8] == b"TFL3"
