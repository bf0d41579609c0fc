"""Channel pruning: exact thinning, consistent slices, groups, criteria, refusals, the stage."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.backend import keras
from fallopt.compress import channels
from fallopt.compress.channels import (
    CRITERIA,
    check_prunable,
    choose,
    plan,
    prune_channels,
    thin,
    zero_removed,
)
from fallopt.compress.prune import PruningError, flatten_model
from fallopt.config import CHANNEL_CRITERIA, ConfigError, PruneConfig, PruneMethod, TrainConfig
from fallopt.models.conv import BlockOrder, ConvNetConfig, build
from fallopt.size import save_model
from fallopt.train import seed_everything, train_model

from .conftest import bright_squares

SMALL = (24, 24, 3)


def _images(n: int = 8, shape: tuple[int, ...] = SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def _randomize_bn(model, seed: int = 0):
    """BatchNorms far from identity: a removed channel would not output 0 by itself."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras().layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            gamma, beta = rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n)
            layer.set_weights([gamma, beta, rng.normal(0, 0.5, n), rng.uniform(0.5, 2, n)])
    return model


def _logits(model):
    """Output logits: a slicing bug cannot hide in a saturated softmax."""
    model.get_layer("output").activation = keras().activations.linear
    return model


def _predict(model, x):
    return model(x, training=False).numpy()


def _thin_exactly(model, x, ratio=0.5, **kwargs):
    """Thin `model`, check it predicts what the zeroed original does; (keep, thin, zeroed)."""
    keep = choose(model, ratio, **kwargs)
    zeroed = keras().models.clone_model(model)
    zeroed.set_weights(model.get_weights())
    zero_removed(zeroed, keep)
    thinner = thin(model, keep)
    expected = _predict(zeroed, x)
    assert np.abs(expected - _predict(thinner, x)).max() < 1e-5
    # The removed channels mattered: without zeroing them the outputs differ.
    assert np.abs(expected - _predict(model, x)).max() > 1e-3
    return keep, thinner, zeroed


def _lab(order=BlockOrder.conv_relu_bn, filters=(8, 16), dense=(16,), shape=SMALL, kernel=3):
    cfg = ConvNetConfig(
        name="lab", filters=list(filters), kernel_size=kernel, dense_units=list(dense),
        block_order=order,
    )  # fmt: skip
    return build(cfg, shape, 2)


def _residual():
    """conv_a -> BN -> ReLU -> conv_b -> BN, added to conv_a's branch: one group."""
    layers = keras().layers
    x = keras().Input(SMALL, name="image")
    a = layers.Conv2D(4, 3, padding="same", name="conv_a")(x)
    a = layers.ReLU(name="relu_a")(layers.BatchNormalization(name="bn_a")(a))
    b = layers.Conv2D(4, 3, padding="same", name="conv_b")(a)
    b = layers.BatchNormalization(name="bn_b")(b)
    s = layers.GlobalAveragePooling2D(name="gap")(layers.Add(name="add")([a, b]))
    return _randomize_bn(keras().Model(x, layers.Dense(3, name="output")(s), name="residual"))


# --- exactness: the thin model computes what the zeroed original computes --------------------


@pytest.mark.parametrize(
    ("order", "criterion"), [(BlockOrder.conv_relu_bn, "l1"), (BlockOrder.conv_bn_relu, "bn_gamma")]
)
def test_lab_cnn_thins_exactly_in_both_block_orders(order, criterion):
    model = _logits(_randomize_bn(_lab(order)))
    keep, thinner, zeroed = _thin_exactly(model, _images(), criterion=criterion)
    assert {name: len(k) for name, k in keep.items()} == {"conv1": 4, "conv2": 8, "dense1": 8}
    assert thinner.get_layer("output").units == 2
    # In the zeroed copy the removed channels output exactly 0 after the whole block.
    block = keras().Model(zeroed.inputs, zeroed.get_layer("pool1").output)
    removed = np.setdiff1d(np.arange(8), keep["conv1"])
    assert (_predict(block, _images())[..., removed] == 0).all()
    kernel, bias = zeroed.get_layer("conv1").get_weights()
    assert (kernel[..., removed] == 0).all() and (bias[removed] == 0).all()
    assert (
        kernel[..., keep["conv1"]] == model.get_layer("conv1").kernel.numpy()[..., keep["conv1"]]
    ).all()


def test_residual_add_prunes_its_inputs_as_one_group():
    model = _residual()
    groups = plan(model).groups
    assert [(g.members, g.joins, g.prunable) for g in groups] == [
        (("conv_a", "conv_b"), ("add",), True),
        (("output",), (), False),
    ]
    keep, thinner, _ = _thin_exactly(model, _images())
    np.testing.assert_array_equal(keep["conv_a"], keep["conv_b"])
    assert thinner.get_layer("conv_b").kernel.shape == (3, 3, 2, 2)


def test_concatenate_offsets_its_parts():
    layers = keras().layers
    x = keras().Input(SMALL, name="image")
    c1, c2 = layers.Conv2D(4, 3, name="c1")(x), layers.Conv2D(6, 3, name="c2")(x)
    c = layers.Conv2D(8, 3, name="c3")(layers.Concatenate(name="cat")([c1, c2]))
    c = layers.Flatten(name="flat")(layers.BatchNormalization(name="bn3")(c))
    model = _randomize_bn(keras().Model(x, layers.Dense(2, name="output")(c)))
    keep, thinner, _ = _thin_exactly(model, _images())
    rows = np.concatenate([keep["c1"], 4 + keep["c2"]])  # c2's channels come after c1's 4
    want = model.get_layer("c3").kernel.numpy()[:, :, rows][..., keep["c3"]]
    np.testing.assert_array_equal(thinner.get_layer("c3").kernel.numpy(), want)
    assert thinner.get_layer("cat").output_shape[-1] == 2 + 3


def test_depthwise_with_multiplier_two_follows_its_input():
    layers = keras().layers
    x = keras().Input(SMALL, name="image")
    d = layers.BatchNormalization(name="bn1")(layers.Conv2D(8, 3, name="c1")(x))
    d = layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(layers.ReLU(6.0, name="relu6")(d))
    d = layers.Conv2D(6, 1, name="pw")(layers.BatchNormalization(name="bn_dw")(d))
    out = layers.Dense(2, name="output")(layers.GlobalMaxPooling2D(name="gmp")(d))
    model = _randomize_bn(keras().Model(x, out))
    keep, thinner, _ = _thin_exactly(model, _images(), layers=["c1"])
    assert list(keep) == ["c1"]
    kept = keep["c1"]
    dw = thinner.get_layer("dw").get_weights()
    assert dw[0].shape == (3, 3, 4, 2) and dw[1].shape == (8,)
    np.testing.assert_array_equal(dw[0], model.get_layer("dw").get_weights()[0][:, :, kept, :])
    outputs = (kept[:, None] * 2 + np.arange(2)).ravel()  # channel c makes outputs 2c, 2c+1
    for got, was in zip(thinner.get_layer("bn_dw").get_weights(),
                        model.get_layer("bn_dw").get_weights(), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, was[outputs])
    np.testing.assert_array_equal(
        thinner.get_layer("pw").kernel.numpy(), model.get_layer("pw").kernel.numpy()[:, :, outputs]
    )


def test_a_sequential_from_a_users_keras_file_thins_and_saves(tmp_path):
    layers = keras().layers
    model = keras().Sequential(
        [
            layers.Conv2D(8, 3, activation="relu", input_shape=(12, 12, 3), name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(8, 3, name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(8, activation="relu", name="dense1"),
            layers.Dropout(0.2, name="drop"),
            layers.Dense(2, name="output"),
        ]
    )
    _randomize_bn(model)
    loaded = keras().models.load_model(save_model(model, tmp_path / "user.keras"), compile=False)
    assert not any(isinstance(layer, keras().layers.InputLayer) for layer in loaded.layers)
    x = _images(shape=(12, 12, 3))
    _, thinner, _ = _thin_exactly(loaded, x)
    assert isinstance(thinner, keras().Sequential)
    again = keras().models.load_model(save_model(thinner, tmp_path / "thin.keras"), compile=False)
    np.testing.assert_array_equal(_predict(again, x), _predict(thinner, x))
    assert again.get_layer("conv2").kernel.shape == (3, 3, 4, 4)


def test_a_removed_channel_that_is_not_zero_adds_nothing():
    """sigmoid(0) = 0.5: the zeroed copy must also zero the rows that read removed channels,
    here in a Conv2D and, through pooling and a concatenation, in the output Dense."""
    layers = keras().layers
    x = keras().Input(SMALL, name="image")
    y = layers.Activation("sigmoid", name="sig")(layers.Conv2D(8, 3, name="c1")(x))
    a = layers.Flatten(name="flat")(layers.Conv2D(4, 3, strides=4, name="c2")(y))
    b = layers.GlobalAveragePooling2D(name="gap")(y)
    out = layers.Dense(2, name="output")(layers.Concatenate(name="cat")([a, b]))
    model = keras().Model(x, out)
    keep, _, zeroed = _thin_exactly(model, _images(), layers=["c1"])
    removed = np.setdiff1d(np.arange(8), keep["c1"])
    assert (zeroed.get_layer("c2").kernel.numpy()[:, :, removed] == 0).all()
    assert (zeroed.get_layer("output").kernel.numpy()[5 * 5 * 4 + removed] == 0).all()


def test_nested_models_are_refused_until_flattened():
    layers = keras().layers
    inner_in = keras().Input((12, 12, 3), name="inner_in")
    inner_out = layers.ReLU(name="r")(layers.Conv2D(6, 3, name="inner_conv")(inner_in))
    inner = keras().Model(inner_in, inner_out, name="backbone")
    model = keras().Sequential(
        [keras().Input((12, 12, 3)), inner, layers.Flatten(), layers.Dense(2, name="output")]
    )
    with pytest.raises(ConfigError, match=r"backbone \(Functional\).*flatten it first"):
        plan(model)
    assert check_prunable(model, "all") == ["inner_conv"]
    _thin_exactly(_logits(flatten_model(model)), _images(shape=(12, 12, 3)))


@pytest.mark.slow
def test_mobilenet_v2_thins_exactly():
    """Inverted residuals: the `block_*_project` convs their Adds join form groups."""
    model = keras().applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=3
    )
    _randomize_bn(model)
    groups = [g.members for g in plan(model).groups if len(g.members) > 1]
    assert ("block_1_project", "block_2_project") in groups
    _, thinner, _ = _thin_exactly(model, _images(4, (32, 32, 3)))
    assert thinner.count_params() < model.count_params() / 3


# --- dependent layers stay consistent --------------------------------------------------------


def test_batchnorm_next_conv_and_flatten_rows_are_sliced_to_the_kept_channels():
    model = _randomize_bn(_lab())
    keep = choose(model, 0.5)
    k1, k2, kd = keep["conv1"], keep["conv2"], keep["dense1"]
    thinner = thin(model, keep)

    def weights(m, name):
        return m.get_layer(name).get_weights()

    for got, was in zip(weights(thinner, "bn1"), weights(model, "bn1"), strict=True):
        assert got.shape == (4,)
        np.testing.assert_array_equal(got, was[k1])  # gamma, beta, mean, variance
    conv2, conv2_was = weights(thinner, "conv2"), weights(model, "conv2")
    assert conv2[0].shape == (3, 3, 4, 8)
    np.testing.assert_array_equal(conv2[0], conv2_was[0][:, :, k1][..., k2])
    np.testing.assert_array_equal(conv2[1], conv2_was[1][k2])
    # Flatten of (4, 4, C): row (h*4 + w)*C + c. Thin row of (h=1, w=2, c=3) is original
    # row (1*4 + 2)*16 + k2[3].
    dense, dense_was = weights(thinner, "dense1"), weights(model, "dense1")
    assert dense[0].shape == (4 * 4 * 8, 8)
    assert dense[0][(1 * 4 + 2) * 8 + 3, 5] == dense_was[0][(1 * 4 + 2) * 16 + k2[3], kd[5]]
    rows = np.arange(4 * 4 * 16).reshape(4, 4, 16)[:, :, k2].ravel()
    np.testing.assert_array_equal(dense[0], dense_was[0][rows][:, kd])
    out, out_was = weights(thinner, "output"), weights(model, "output")
    np.testing.assert_array_equal(out[0], out_was[0][kd])
    np.testing.assert_array_equal(out[1], out_was[1])  # the classes are untouched


def test_lab_cnn_at_half_width():
    model = _lab(filters=(32, 32, 64), dense=(64,), shape=(96, 96, 3), kernel=5)
    assert model.count_params() == 342_178
    names = check_prunable(model, "all")
    assert names == ["conv1", "conv2", "conv3", "dense1"]  # never the output layer
    thinner = thin(model, choose(model, 0.5, layers=names))
    sizes = {n: thinner.get_layer(n).output_shape[-1] for n in [*names, "output"]}
    assert sizes == {"conv1": 16, "conv2": 16, "conv3": 32, "dense1": 32, "output": 2}
    assert thinner.count_params() <= 342_178 / 2
    assert thinner.count_params() == 86_354
    x = _images(2, (96, 96, 3))
    assert _predict(thinner, x).shape == (2, 2)


# --- criteria and choice ---------------------------------------------------------------------


def _filters_with_l1(layer, l1):
    """Set each filter's weights to one value so that its L1 norm is `l1[c]`."""
    kernel, bias = layer.get_weights()
    per_filter = kernel[..., 0].size
    layer.set_weights([np.ones_like(kernel) * np.asarray(l1, np.float32) / per_filter, bias])


def test_the_registry_has_the_configs_criteria():
    assert tuple(CRITERIA) == CHANNEL_CRITERIA


@pytest.mark.parametrize("order", [BlockOrder.conv_bn_relu, BlockOrder.conv_relu_bn])
def test_bn_gamma_keeps_the_largest_gammas_not_the_largest_filters(order):
    model = _lab(order, filters=(8,))
    _filters_with_l1(model.get_layer("conv1"), [8, 1, 7, 1, 1, 6, 5, 1])
    bn = model.get_layer("bn1")
    gamma = np.array([0.1, -5, 0.2, 3, -4, 0.01, 1, 2], np.float32)
    bn.set_weights([gamma, *bn.get_weights()[1:]])
    assert choose(model, 0.5, "bn_gamma", layers=["conv1"])["conv1"].tolist() == [1, 3, 4, 7]
    assert choose(model, 0.5, "l1", layers=["conv1"])["conv1"].tolist() == [0, 2, 5, 6]


def test_bn_gamma_falls_back_to_l1_without_batchnorm():
    model = _lab(BlockOrder.conv_relu, filters=(8,))
    _filters_with_l1(model.get_layer("conv1"), [8, 1, 7, 1, 1, 6, 5, 1])
    assert choose(model, 0.5, "bn_gamma", layers=["conv1"])["conv1"].tolist() == [0, 2, 5, 6]


def test_a_groups_scores_are_summed():
    model = _residual()
    _filters_with_l1(model.get_layer("conv_a"), [10, 0, 0, 6])  # alone: keep 0 and 3
    _filters_with_l1(model.get_layer("conv_b"), [0, 12, 0, 5])  # sums 10, 12, 0, 11
    keep = choose(model, 0.5)
    assert keep["conv_a"].tolist() == keep["conv_b"].tolist() == [1, 3]


def test_rounding_and_min_keep():
    model = _lab(filters=(5,), dense=(8,))
    assert len(choose(model, 0.5, layers=["conv1"])["conv1"]) == 3  # 2.5 rounds up
    assert len(choose(model, 0.9, layers=["dense1"])["dense1"]) == 1
    assert len(choose(model, 0.9, min_keep=4, layers=["dense1"])["dense1"]) == 4
    assert len(choose(model, 0.5, min_keep=16, layers=["dense1"])["dense1"]) == 8  # all of them


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [
        (lambda: keras().layers.Rescaling(1 / 255, name="rescaling"), r"rescaling \(Rescaling\)"),
        (lambda: keras().layers.Reshape((24, 24, 3), name="reshape"), r"reshape \(Reshape\)"),
    ],
)
def test_a_layer_it_cannot_rebuild_is_refused_by_name(layer, pattern):
    layers = keras().layers
    x = keras().Input(SMALL)
    y = layers.Conv2D(4, 3, name="conv")(layer()(x))
    model = keras().Model(x, layers.Dense(2, name="output")(layers.Flatten()(y)))
    with pytest.raises(ConfigError, match=f"cannot rebuild layer {pattern}.*prune=constant"):
        check_prunable(model, "all")


def test_a_layer_called_twice_is_refused():
    layers = keras().layers
    x = keras().Input((8, 8, 4))
    shared = layers.Conv2D(4, 3, padding="same", name="shared")
    y = layers.Flatten()(shared(shared(x)))
    model = keras().Model(x, layers.Dense(2, name="output")(y))
    with pytest.raises(ConfigError, match=r"layer shared \(Conv2D\): it is called 2 times"):
        plan(model)


def test_an_add_whose_inputs_keep_different_channels_is_refused():
    model = _residual()
    with pytest.raises(ConfigError, match=r"add \(Add\) joins channels that conv_a .*conv_b"):
        thin(model, {"conv_a": [0, 1], "conv_b": [2, 3]})
    with pytest.raises(ConfigError, match=r"add \(Add\)"):
        zero_removed(model, {"conv_a": [0, 1]})  # conv_b keeps all 4


def test_a_scope_selecting_part_of_a_group_is_refused():
    with pytest.raises(ConfigError, match=r"conv_a \(Conv2D\) but not conv_b .*add \(Add\)"):
        check_prunable(_residual(), "conv_a")
    assert check_prunable(_residual(), "conv_.") == ["conv_a", "conv_b"]


def test_the_output_layer_is_never_pruned():
    model = _lab()
    assert check_prunable(model, "dense") == ["dense1"]
    with pytest.raises(ConfigError, match=r"prune.scope='output'.*output \(Dense\).*model's out"):
        check_prunable(model, "output")
    with pytest.raises(ConfigError, match=r"output \(Dense\) must keep all its channels"):
        thin(model, {"output": [0]})


def test_frozen_groups_fixed_layers_and_concatenations_joined_by_add():
    layers = keras().layers
    x = keras().Input(SMALL, name="image")
    pre = layers.Conv2D(3, 1, name="fixed_pre")(x)
    c1, c2 = layers.Conv2D(4, 3, name="c1")(pre), layers.Conv2D(6, 3, name="c2")(pre)
    c3 = layers.Conv2D(10, 3, name="c3")(pre)
    s = layers.Add(name="add")([layers.Concatenate(name="cat")([c1, c2]), c3])
    model = keras().Model(x, layers.Dense(2, name="output")(layers.GlobalAveragePooling2D()(s)))
    p = plan(model)
    assert not any(g.prunable for g in p.groups)
    assert p.group_of("fixed_pre").frozen == ("is fixed preprocessing (fixed_*)",)
    assert "stacked" in p.group_of("c1").frozen[0]
    with pytest.raises(ConfigError, match="selects only layers that must keep all their channels"):
        check_prunable(model, "all")


# --- the stage -------------------------------------------------------------------------------

TRAIN = TrainConfig(epochs=1, batch_size=8)
PRUNE = PruneConfig(method=PruneMethod.channels, sparsity=0.5, scope="all", fine_tune_epochs=1)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A tiny CNN trained one epoch and saved, and its data."""
    train, val = bright_squares(64, 48)
    seed_everything(0)
    model = _lab(filters=(8,), dense=(16,), shape=(12, 12, 1))
    train_model(model, train, val, TRAIN, 0)
    return save_model(model, tmp_path_factory.mktemp("baseline") / "model.keras"), train, val


def test_prune_channels_end_to_end(baseline, tmp_path):
    path, train, val = baseline
    before = path.read_bytes()
    out = prune_channels(path, train, val, PRUNE, TRAIN, 0, tmp_path / "thin.keras")
    assert path.read_bytes() == before
    loaded = keras().models.load_model(tmp_path / "thin.keras", compile=False)
    base = keras().models.load_model(path, compile=False)
    assert loaded.get_layer("conv1").kernel.shape == (3, 3, 1, 4)
    assert loaded.get_layer("bn1").get_weights()[0].shape == (4,)
    assert loaded.get_layer("dense1").kernel.shape == (5 * 5 * 4, 8)
    assert loaded.get_layer("output").kernel.shape == (8, 2)
    assert out.rows == [
        {"layer": name, "class": cls, "channels_before": n, "channels_after": n // 2,
         "params_before": base.get_layer(name).count_params(),
         "params_after": loaded.get_layer(name).count_params()}
        for name, cls, n in (("conv1", "Conv2D", 8), ("dense1", "Dense", 16))
    ]  # fmt: skip
    assert out.metrics == {
        "channels_conv1": 4,
        "channels_dense1": 8,
        "channels_removed_fraction": 0.5,
    }
    assert out.summary == (
        f"l1: conv1 8->4, dense1 16->8; {base.count_params():,} -> {loaded.count_params():,} "
        "parameters"
    )
    assert len(out.history["loss"]) == 1 and "val_accuracy" in out.history


def test_prune_channels_checks_the_slicing_before_the_fine_tune(baseline, tmp_path, monkeypatch):
    path, train, val = baseline
    real_thin = channels.thin

    def swapped(model, keep):  # a slicing bug: two kept filters of conv1 trade places
        thinner = real_thin(model, keep)
        kernel, bias = thinner.get_layer("conv1").get_weights()
        thinner.get_layer("conv1").set_weights([kernel[..., [1, 0, 2, 3]], bias[[1, 0, 2, 3]]])
        return thinner

    def no_fit(*args, **kwargs):
        raise AssertionError("fine-tuned a wrongly sliced model")

    monkeypatch.setattr(channels, "thin", swapped)
    monkeypatch.setattr(channels, "fit", no_fit)
    with pytest.raises(PruningError, match="removed channels zeroed"):
        prune_channels(path, train, val, PRUNE, TRAIN, 0, tmp_path / "thin.keras")
    assert not (tmp_path / "thin.keras").exists()
