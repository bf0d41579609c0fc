"""Weight clustering, CQAT and PCQAT: counted in the saved model and in the .tflite files."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.compress.cluster import (
    ClusterError,
    LayerClusters,
    check_clusters,
    cluster_and_fine_tune,
    max_distinct,
    select_clusterable,
    tflite_clusters,
    verify_tflite,
)
from fallopt.compress.quantize import (
    AWARE,
    FULL_INTEGER,
    check_quantizable,
    convert,
    quantization_aware_fine_tune,
    representative_images,
)
from fallopt.config import ClusterConfig, ClusterMethod, ConfigError, QuantMode, TrainConfig
from fallopt.data import Split
from fallopt.litert import TFLiteModel
from fallopt.models.conv import BlockOrder, ConvNetConfig, build
from fallopt.size import save_model
from fallopt.train import seed_everything

K = 8
LAYERS = ["conv1", "conv2", "dense1", "output"]
PRUNED = ["conv2", "dense1"]  # conv1 and output keep no zero (the PCQAT bug's trigger)
TRAIN = TrainConfig(batch_size=16)


def kmeans(**changes: object) -> ClusterConfig:
    return ClusterConfig(**{"method": ClusterMethod.kmeans, "clusters": K, **changes})


def tiny(order: BlockOrder = BlockOrder.conv_bn_relu, seed: int = 0):
    """5,538 parameters: conv1 3x3x3x8, conv2 3x3x8x16, dense1 256x16, output 16x2."""
    seed_everything(seed)
    cfg = ConvNetConfig(
        name="t", filters=[8, 16], kernel_size=3, dense_units=[16], block_order=order
    )
    return build(cfg, (24, 24, 3), 2)


def kernel(model, name: str) -> np.ndarray:
    return model.get_layer(name).kernel.numpy()


def tflite_layout(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 0, 1, 2) if w.ndim == 4 else w.T


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 24, 24, 3), dtype=np.uint8)
    y = np.arange(64) % 2
    x[y == 1, 6:18, 6:18] = 255
    return Split(x[:48], y[:48]), Split(x[48:], y[48:])


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, data):
    """conv_bn_relu (BatchNorm folds into the convs), every kernel clustered to 8, 1 epoch."""
    tmp = tmp_path_factory.mktemp("cluster")
    source = save_model(tiny(), tmp / "base.keras")
    train, val = data
    seed_everything(0)
    outcome = cluster_and_fine_tune(source, train, val, kmeans(), TRAIN, 0, tmp / "c.keras")
    return tmp / "c.keras", outcome


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The tiny model with half of conv2's and dense1's weights zero (smallest magnitudes)."""
    model = tiny()
    for name in PRUNED:
        layer = model.get_layer(name)
        weights = layer.get_weights()
        weights[0][np.abs(weights[0]) < np.median(np.abs(weights[0]))] = 0
        layer.set_weights(weights)
    return save_model(model, tmp_path_factory.mktemp("pruned") / "pruned.keras")


@pytest.fixture(scope="module")
def pruned_clustered(tmp_path_factory, data, pruned):
    """conv2 and dense1 clustered keeping their zeros; conv1 and output left without zeros."""
    out = tmp_path_factory.mktemp("pc") / "pc.keras"
    seed_everything(0)
    cfg = kmeans(scope="|".join(PRUNED), preserve_sparsity=True)
    outcome = cluster_and_fine_tune(pruned, *data, cfg, TRAIN, 0, out)
    return out, outcome


def load(path):
    from fallopt.backend import keras

    return keras().models.load_model(path, compile=False)


def test_the_saved_model_has_at_most_k_values_per_kernel(clustered):
    path, outcome = clustered
    model = load(path)
    for name in LAYERS:
        assert len(np.unique(kernel(model, name))) <= K
    assert [row["layer"] for row in outcome.rows] == LAYERS
    for row in outcome.rows:
        n = len(np.unique(kernel(model, row["layer"])))
        assert row["distinct_values"] == n == outcome.metrics[f"clusters_{row['layer']}"]
        assert row["clusters"] == K and row["zeros_before"] == 0
    assert outcome.metrics["clusters_achieved"] == max(r["distinct_values"] for r in outcome.rows)
    assert outcome.rows[0]["kernel_shape"] == "3x3x3x8"
    assert outcome.summary.startswith("k-means 8 (kmeans_plus_plus, per tensor): conv1 ")
    assert len(outcome.history["val_accuracy"]) == 1


@pytest.mark.parametrize("mode", [QuantMode.none, QuantMode.float16, QuantMode.int8])
def test_tflite_files_keep_at_most_k_values_per_output_channel(clustered, data, mode):
    path, _ = clustered
    model = load(path)
    representative = representative_images(data[0], 32, 0) if mode is QuantMode.int8 else None
    content = convert(model, mode, representative)
    counts = verify_tflite(content, model, LAYERS, K, keep_zeros=False)
    assert set(counts) == set(LAYERS) and max(counts.values()) <= K
    assert counts == tflite_clusters(content, LAYERS)
    if mode is QuantMode.none:  # BatchNorm folded into the conv: more values per tensor
        from fallopt.compress.cluster import _tensors_of

        (conv2,) = _tensors_of(content, ["conv2"])["conv2"]
        assert len(np.unique(conv2)) > K
        with pytest.raises(ClusterError, match=r"more than 4 distinct weights.*conv1 \d"):
            verify_tflite(content, model, LAYERS, 4, keep_zeros=False)
        with pytest.raises(ClusterError, match=r"\['bn1'\] have no conv or fully connected op"):
            tflite_clusters(content, ["bn1"])


@pytest.mark.slow  # 15-20 s; PCQAT below runs the same cluster-preserving scheme
def test_cqat_keeps_the_clusters_per_output_channel_in_int8(clustered, data):
    path, _ = clustered
    aware, history = quantization_aware_fine_tune(path, QuantMode.cqat, *data, TRAIN, 1, 0)
    assert len(history["val_accuracy"]) == 1
    content = convert(aware, QuantMode.cqat)
    tflite = TFLiteModel(content)
    assert tflite.input_dtype == np.float32  # converted as qat is: int8 inside
    assert verify_tflite(content, load(path), LAYERS, K, keep_zeros=False)
    assert tflite.predict(data[1].x).shape == (16, 2)


def test_preserve_sparsity_keeps_the_pruned_zeros(pruned, pruned_clustered):
    before, (path, outcome) = load(pruned), pruned_clustered
    after = load(path)
    for name in PRUNED:
        zero = kernel(before, name) == 0
        assert zero.mean() == 0.5 and (kernel(after, name)[zero] == 0).all()
        assert len(np.unique(kernel(after, name))) <= K
    for name in ("conv1", "output"):  # not clustered, and without a zero
        assert (kernel(after, name) != 0).all() and len(np.unique(kernel(after, name))) > K
    rows = {row["layer"]: row for row in outcome.rows}
    assert rows["dense1"]["zeros_before"] == 2048 and rows["dense1"]["zeros_after"] >= 2048
    assert outcome.summary.endswith("; zeros kept (2,624)")


def test_the_zero_check_catches_a_file_that_lost_zeros(clustered, pruned):
    content = convert(load(clustered[0]), QuantMode.none)  # clustered without the zeros
    with pytest.raises(ClusterError, match=r"lost zeros of clustered layers: conv2 \d+ of 576"):
        verify_tflite(content, load(pruned), LAYERS, K, keep_zeros=True)


def test_sparse_weight_storage_is_read_through_densify(pruned_clustered):
    model = load(pruned_clustered[0])
    content = convert(model, QuantMode.none, sparse_weights=True)
    assert verify_tflite(content, model, PRUNED, K, keep_zeros=True) == {"conv2": 8, "dense1": 8}


@pytest.mark.slow
def test_pcqat_keeps_every_pruned_zero_and_the_clusters_in_int8(pruned_clustered, data):
    """conv1 and output have no zero: tfmot's own PCQAT scheme would drop dense1's zeros."""
    path, _ = pruned_clustered
    aware, _ = quantization_aware_fine_tune(path, QuantMode.pcqat, *data, TRAIN, 1, 0)
    content = convert(aware, QuantMode.pcqat)
    counts = verify_tflite(content, load(path), PRUNED, K, keep_zeros=True)
    assert max(counts.values()) <= K


@pytest.mark.slow
def test_tfmots_own_pcqat_scheme_loses_the_zeros(pruned_clustered, data, monkeypatch):
    """The tfmot 0.8.1 bug fallopt works around: when this fails, the workaround can go."""
    import tensorflow_model_optimization as tfmot

    from fallopt.compress import quantize

    own = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme
    monkeypatch.setattr(quantize, "_aware_scheme", lambda mode: own(preserve_sparsity=True))
    path, _ = pruned_clustered
    aware, _ = quantization_aware_fine_tune(path, QuantMode.pcqat, *data, TRAIN, 1, 0)
    content = convert(aware, QuantMode.pcqat)
    with pytest.raises(ClusterError, match=r"lost zeros.*dense1 \d+ of 2048"):
        verify_tflite(content, load(path), PRUNED, K, keep_zeros=True)


def test_per_channel_without_fine_tune(tmp_path, data):
    source = save_model(tiny(BlockOrder.conv_relu_bn), tmp_path / "base.keras")
    cfg = kmeans(clusters=4, per_channel=True, fine_tune_epochs=0, init="linear")
    outcome = cluster_and_fine_tune(source, *data, cfg, TRAIN, 0, tmp_path / "c.keras")
    assert outcome.history == {}
    model = load(tmp_path / "c.keras")
    for name in ("conv1", "conv2"):  # each output channel its own 4 values
        assert max_distinct(kernel(model, name), -1) <= 4 < len(np.unique(kernel(model, name)))
        assert outcome.metrics[f"clusters_{name}"] == max_distinct(kernel(model, name), -1)
    assert len(np.unique(kernel(model, "dense1"))) <= 4  # tfmot: per channel is Conv2D only
    assert "(linear, per channel)" in outcome.summary
    content = convert(model, QuantMode.float16)
    assert max(verify_tflite(content, model, LAYERS, 4, keep_zeros=False).values()) <= 4


def test_a_nested_model_is_clustered_flat(tmp_path, data):
    from fallopt.backend import keras

    k = keras()
    seed_everything(0)
    inner = k.Sequential(
        [k.Input((24, 24, 3)), k.layers.Conv2D(4, 3, name="conv_in"), k.layers.ReLU()],
        name="backbone",
    )
    x = k.Input((24, 24, 3))
    y = k.layers.Dense(2, activation="softmax", name="head")(
        k.layers.GlobalAveragePooling2D()(inner(x))
    )
    source = save_model(k.Model(x, y, name="nested"), tmp_path / "nested.keras")
    cfg = kmeans(clusters=4, scope="conv", fine_tune_epochs=0)
    outcome = cluster_and_fine_tune(source, *data, cfg, TRAIN, 0, tmp_path / "c.keras")
    assert [row["layer"] for row in outcome.rows] == ["conv_in"]
    assert len(np.unique(kernel(load(tmp_path / "c.keras"), "conv_in"))) <= 4


def test_kernels_too_small_for_k_are_refused_before_training():
    model = tiny()
    with pytest.raises(ConfigError, match=r"output \(kernel 16x2: 32 weights\).*cluster\.scope"):
        select_clusterable(model, kmeans(clusters=32))
    with pytest.raises(ConfigError, match=r"conv1 \(kernel 3x3x3x8: 27 weights per output"):
        select_clusterable(model, kmeans(clusters=27, per_channel=True))
    assert select_clusterable(model, kmeans(clusters=27, per_channel=True, scope="conv2")) == [
        "conv2"
    ]
    assert select_clusterable(model, kmeans(clusters=31)) == LAYERS  # the output layer too
    with pytest.raises(ConfigError, match=r"cluster\.scope=.nothing. matches no Dense or Conv2D"):
        select_clusterable(model, kmeans(scope="nothing"))


def test_depthwise_and_fixed_layers_are_never_selected():
    from fallopt.backend import keras

    k = keras()
    x = k.Input((8, 8, 3))
    h = k.layers.Conv2D(3, 1, name="fixed_colour")(x)
    h = k.layers.DepthwiseConv2D(3, name="depthwise")(h)
    h = k.layers.Conv2D(8, 3, name="conv")(h)
    y = k.layers.Dense(2, name="output")(k.layers.Flatten()(h))
    assert select_clusterable(k.Model(x, y), kmeans(clusters=4)) == ["conv", "output"]


def test_check_clusters_names_layers_over_k_and_lost_zeros():
    over = LayerClusters("conv2", (3, 3, 8, 16), True, 40, 9, 0, 0, 0)
    with pytest.raises(ClusterError, match=r"clusters=8 distinct values: conv2 9 per channel"):
        check_clusters([over], kmeans(per_channel=True))
    lost = LayerClusters("dense1", (256, 16), False, 8, 8, 2048, 2000, 48)
    check_clusters([lost], kmeans())  # zeros may go without preserve_sparsity
    with pytest.raises(ClusterError, match=r"made zeros non-zero: dense1 48 of 2048"):
        check_clusters([lost], kmeans(preserve_sparsity=True))


def test_every_aware_mode_is_full_integer_and_refuses_the_labs_block_order():
    assert set(AWARE) == {QuantMode.qat, QuantMode.pqat, QuantMode.cqat, QuantMode.pcqat}
    assert set(FULL_INTEGER) == {QuantMode.int8, *AWARE}
    lab = tiny(BlockOrder.conv_relu_bn)
    for mode in (QuantMode.cqat, QuantMode.pcqat):
        with pytest.raises(
            ConfigError, match=rf"quant={mode.value} cannot wrap layer bn1.*quant=int8 \("
        ):
            check_quantizable(lab, mode)
