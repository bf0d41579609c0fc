"""TFLite conversion per mode, checked by loading each file with LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.compress.quantize import convert, representative_images
from fallopt.config import ConfigError, QuantMode, TrainConfig
from fallopt.data import Split, to_float
from fallopt.deploy import c_array
from fallopt.evaluate import evaluate_probabilities
from fallopt.litert import TFLiteModel
from fallopt.models import build_model
from fallopt.models.conv import BlockOrder, ConvNetConfig
from fallopt.train import seed_everything, train_model


@pytest.fixture(scope="module")
def trained():
    """A small CNN whose dense kernel (1,152 x 32) is large enough to be quantized."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(96, 16, 16, 1), dtype=np.uint8)
    y = np.arange(96) % 2
    x[y == 1, 4:12, 4:12] = 255
    seed_everything(0)
    model = build_model(
        ConvNetConfig(
            name="q", filters=[8], kernel_size=3, dense_units=[32], block_order=BlockOrder.conv_relu
        ),
        (16, 16, 1),
        2,
    )
    cfg = TrainConfig(epochs=4, batch_size=16)
    train_model(model, Split(x[:64], y[:64]), Split(x[64:], y[64:]), cfg, 0)
    return model, Split(x[:64], y[:64]), Split(x[64:], y[64:])


@pytest.fixture(scope="module")
def files(trained):
    model, train, _ = trained
    rep = representative_images(train, 32, seed=0)
    return {mode: convert(model, mode, rep) for mode in QuantMode}


def test_float32_tflite_predicts_like_keras(trained, files):
    model, _, test = trained
    tflite = TFLiteModel(files[QuantMode.none])
    assert tflite.input_dtype == np.float32 and tflite.output_dtype == np.float32
    keras_probs = model.predict(test.x.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(tflite.predict(test.x), keras_probs, atol=1e-5)


@pytest.mark.parametrize("mode", [QuantMode.none, QuantMode.int8])
def test_every_pixel_value_is_fed_as_training_normalised_it(files, mode):
    tflite = TFLiteModel(files[mode])
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)  # each value once
    expected = to_float(x)
    if mode is QuantMode.int8:
        scale, zero = tflite.input["quantization"]
        expected = np.clip(np.rint(expected / scale + zero), -128, 127).astype(np.int8)
    tflite._fill_input(x)
    np.testing.assert_array_equal(tflite.interpreter.get_tensor(tflite.input["index"]), expected)
    np.testing.assert_array_equal(tflite.model_input(x), expected)
    if mode is QuantMode.int8:  # an input quantized otherwise takes the general table path
        tflite._table = expected.reshape(-1).copy()
        tflite._table[0] = 5
        tflite._flip = False
        tflite._fill_input(x)
        fed = tflite.interpreter.get_tensor(tflite.input["index"]).reshape(-1)
        assert fed[0] == 5 and np.array_equal(fed[1:], expected.reshape(-1)[1:])


@pytest.mark.parametrize("input_range", [(0.0, 1.0), (0.0, 255.0), (-1.0, 1.0)])
def test_one_input_rule_for_training_litert_and_calibration(files, input_range):
    """Every consumer of pixels feeds low + v * (high - low) / 255, to the last bit."""
    from fallopt.data import InputRule
    from fallopt.train import batches

    rule = InputRule(*input_range)
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)  # each value once
    split = Split(x, np.zeros(1, np.int64))
    ((trained_on, _),) = batches(split, 1, rule=rule).as_numpy_iterator()  # training, Keras
    low, high = input_range
    np.testing.assert_allclose(trained_on, low + x * (high - low) / 255, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(representative_images(split, 1, 0, rule), trained_on)
    tflite = TFLiteModel(files[QuantMode.none], rule=rule)
    tflite._fill_input(x)
    np.testing.assert_array_equal(tflite.interpreter.get_tensor(tflite.input["index"]), trained_on)
    np.testing.assert_array_equal(tflite.model_input(x), trained_on)


def test_float16_is_about_half_and_dynamic_about_a_quarter(files):
    f32 = len(files[QuantMode.none])
    assert 0.4 < len(files[QuantMode.float16]) / f32 < 0.6
    assert 0.2 < len(files[QuantMode.dynamic]) / f32 < 0.35


def test_int8_has_int8_input_and_output_and_still_classifies(trained, files):
    _, _, test = trained
    tflite = TFLiteModel(files[QuantMode.int8])
    assert tflite.input_dtype == np.int8 and tflite.output_dtype == np.int8
    probs = tflite.predict(test.x, batch_size=7)  # a ragged last batch too
    assert probs.shape == (32, 2)
    keras_probs = trained[0].predict(test.x.astype(np.float32) / 255, verbose=0)
    assert evaluate_probabilities(test.y, keras_probs).accuracy > 0.9  # the square is easy
    assert evaluate_probabilities(test.y, probs).accuracy > 0.9
    assert (probs.argmax(1) == keras_probs.argmax(1)).mean() >= 0.9


def test_int8_calibrates_on_every_image_of_a_smaller_training_split(trained):
    _, train, _ = trained
    chosen = representative_images(train, 500, seed=0)
    assert len(chosen) == len(train)
    np.testing.assert_array_equal(chosen, to_float(train.x))


def test_weight_sparsity_is_read_from_the_file(trained):
    from fallopt.backend import keras

    model = trained[0]
    sparse = keras().models.clone_model(model)
    weights = model.get_weights()
    weights[0][...] = 0  # every conv kernel weight
    sparse.set_weights(weights)
    for mode in (QuantMode.none, QuantMode.float16, QuantMode.dynamic):
        tflite = TFLiteModel(convert(sparse, mode))
        n_conv, n_dense = weights[0].size, weights[2].size + weights[4].size
        assert tflite.weight_sparsity() == pytest.approx(n_conv / (n_conv + n_dense), abs=0.01)


def test_c_array_holds_the_exact_bytes(files, tmp_path):
    content = files[QuantMode.int8]
    source, header = c_array(content, tmp_path)
    text = source.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    assert bytes(int(v, 16) for v in body.replace("\n", "").split(",")) == content
    assert f"g_model_data_len = {len(content)};" in text
    assert "extern const unsigned char g_model_data[];" in header.read_text()


def test_tracked_int8_run_logs_the_file_it_evaluated(compose_cfg, tmp_path, tracking_uri):
    """The logged TFLite accuracy equals the lab's own loop over the logged file."""
    import mlflow
    from ai_edge_litert.interpreter import Interpreter
    from mlflow.tracking import MlflowClient

    from fallopt.backend import keras
    from fallopt.config import validate
    from fallopt.data import load_dataset
    from fallopt.identity import config_hash
    from fallopt.task import run_experiment

    from .conftest import TINY

    # More calibration images asked than the 48 training images: all 48 are used (logged).
    overrides = [*TINY, "prune.sparsity=0.5", "quant=int8", "quant.representative_samples=500"]
    cfg = compose_cfg(*overrides, f"tracking.uri={tracking_uri}")
    typed = validate(cfg)
    run_experiment(typed, config_hash(typed), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["fallopt.stage.quant"] == "int8"
    assert m["representative_samples_used"] == m["n_train"] == 48
    art = tmp_path / "dl"
    mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(art), tracking_uri=tracking_uri
    )
    content = (art / "model.tflite").read_bytes()
    assert m["tflite_size_bytes"] == len(content)

    # The lab's loop: one image per invoke, input quantized by hand.
    data = load_dataset(typed.dataset, typed.train.val_split, typed.seed)
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    scale, zero = inp["quantization"]
    predicted = []
    for image in data.test.x:
        q = np.clip(np.round(image / 255.0 / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], q[None])
        interpreter.invoke()
        predicted.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    predicted = np.array(predicted)
    assert m["tflite_test_accuracy"] == pytest.approx(np.mean(predicted == data.test.y))
    confusion = np.zeros((2, 2), int)
    np.add.at(confusion, (data.test.y, predicted), 1)
    import json

    assert json.loads((art / "tflite_confusion_matrix.json").read_text()) == confusion.tolist()

    # Pruned zeros survive int8 conversion: the file's weights are as sparse as the model's.
    model = keras().models.load_model(art / "model" / "model.keras", compile=False)
    kernels = [layer.kernel.numpy() for layer in model.layers if hasattr(layer, "kernel")]
    keras_zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert keras_zeros > 0.3
    assert m["tflite_sparsity"] == pytest.approx(keras_zeros, abs=0.02)
    assert 0 <= m["tflite_disagreement"] <= 1
    assert m["tflite_latency_ms"] > 0 and m["tflite_throughput_ips"] > 0
    assert run.data.tags["fallopt.host_cpu"]
    source = (art / "deploy" / "model_data.cc").read_text()
    assert f"g_model_data_len = {len(content)};" in source


@pytest.fixture(scope="module")
def pruned_qat_ready(tmp_path_factory):
    """A Conv -> BN -> ReLU model (QAT can wrap it) with half its conv and dense weights zero."""
    from fallopt.size import save_model

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(64, 16, 16, 1), dtype=np.uint8)
    y = np.arange(64) % 2
    model = build_model(
        ConvNetConfig(
            name="qat", filters=[8], kernel_size=3, dense_units=[64], block_order="conv_bn_relu"
        ),
        (16, 16, 1),
        2,
    )
    weights = model.get_weights()
    for w in weights:
        if w.ndim >= 2:  # kernels
            w[np.abs(w) < np.median(np.abs(w))] = 0
    model.set_weights(weights)
    path = save_model(model, tmp_path_factory.mktemp("qat") / "model.keras")
    return path, Split(x[:48], y[:48]), Split(x[48:], y[48:])


@pytest.mark.parametrize("mode", [QuantMode.qat, QuantMode.pqat])
def test_quantization_aware_modes_convert_and_pqat_keeps_the_zeros(pruned_qat_ready, mode):
    from fallopt.compress.quantize import quantization_aware_fine_tune

    path, train, val = pruned_qat_ready
    aware, history = quantization_aware_fine_tune(
        path, mode, train, val, TrainConfig(batch_size=16), 1, 0
    )
    assert len(history["val_accuracy"]) == 1
    tflite = TFLiteModel(convert(aware, mode))
    assert tflite.predict(val.x).shape == (16, 2)
    if mode is QuantMode.pqat:
        assert tflite.weight_sparsity() == pytest.approx(0.5, abs=0.01)
    else:  # plain QAT fine-tunes the zeros away
        assert tflite.weight_sparsity() < 0.4


def test_qat_on_the_labs_layer_order_is_refused_before_training():
    from fallopt.compress.quantize import check_quantizable

    lab = build_model(ConvNetConfig(name="l", filters=[4], kernel_size=3), (12, 12, 1), 2)
    with pytest.raises(ConfigError, match=r"cannot wrap layer bn1.*model=cauca_cnn_qat"):
        check_quantizable(lab, QuantMode.qat)


def test_sparse_weight_storage_shrinks_a_pruned_model_and_still_runs(pruned_qat_ready, trained):
    from fallopt.backend import keras

    model = keras().models.load_model(pruned_qat_ready[0], compile=False)
    dense = convert(model, QuantMode.none)
    sparse = convert(model, QuantMode.none, sparse_weights=True)
    assert len(sparse) < 0.8 * len(dense)
    x = pruned_qat_ready[2].x
    np.testing.assert_allclose(
        TFLiteModel(sparse, xnnpack=False).predict(x), TFLiteModel(dense).predict(x), atol=1e-5
    )


def test_latency_is_measured(files, trained):
    tflite = TFLiteModel(files[QuantMode.dynamic])
    assert 0 < tflite.latency_ms(trained[2].x[0], repeats=5) < 1000


@pytest.mark.slow
def test_a_qat_run_says_which_model_each_figure_describes_and_returns_what_it_logged(
    compose_cfg, tmp_path, tracking_uri, monkeypatch
):
    """Fresh or resumed, a job answers its sweeper with the values the run logged."""
    from mlflow.tracking import MlflowClient

    from fallopt import job
    from fallopt.config import OBJECTIVES, validate
    from fallopt.identity import config_hash
    from fallopt.stages import training_threads
    from fallopt.task import run_experiment

    from .conftest import TINY

    overrides = [*TINY, "model=cauca_cnn_qat", "quant=qat", "prune.sparsity=0.5", "threads=1"]
    typed = validate(compose_cfg(*overrides, f"tracking.uri={tracking_uri}"))
    # The job's thread cap, without capping this test process's TensorFlow.
    monkeypatch.setattr("fallopt.backend.set_threads", lambda threads: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert job.cap_threads(typed, job.Job(None, None, "", None, 1)) == 1
    fresh = run_experiment(typed, config_hash(typed), tmp_path / "out")

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    names = list(OBJECTIVES)
    assert job.objectives(names, fresh) == job.objectives(names, run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [h.step for h in history] == [1, 2, 3]  # baseline, pruning and QAT epochs
    assert fresh["val_accuracy"] == history[-1].value  # the QAT epoch's, as logged
    tags, params = run.data.tags, run.data.params
    assert (
        "model/model.keras (the final Keras model, before quantization-aware training)"
        in (tags["fallopt.figures"])
    )
    assert (
        "tflite_*, tflm_*, macs, peak_activation_bytes, flash_bytes: model.tflite"
        in tags["fallopt.figures"]
    )
    # LiteRT ran with the capped thread count, and the params say so.
    assert params["quant.threads"] == "1"
    assert tags["fallopt.baseline_threads"] == tags["fallopt.pruned_threads"]
    assert tags["fallopt.baseline_threads"] == str(training_threads())
