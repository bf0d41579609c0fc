"""Device figures: TFLM's arena, MACs, peak activations, flash and the board verdict.

Each figure is checked against an independent one: TFLM allocating (or not) at the logged
arena, MACs counted from the Keras layers, the planner's own activation total.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fallopt import device, target, tflm
from fallopt.backend import keras, stderr_captured
from fallopt.compress.quantize import convert
from fallopt.config import KIB, QuantMode, TargetConfig, validate
from fallopt.data import InputRule
from fallopt.data.dataset import Split
from fallopt.errors import ConfigError
from fallopt.identity import config_hash
from fallopt.litert import TFLiteModel
from fallopt.models.conv import ConvNetConfig, build
from fallopt.task import run_experiment
from fallopt.tflite_graph import Graph

needs_tflm = pytest.mark.skipif(tflm.unavailable() is not None, reason="tflite-micro absent")


def keras_macs(model) -> int:
    """Multiply-accumulates counted from the layers, as a textbook does."""
    layers = keras().layers
    total = 0
    for layer in model.layers:
        out = int(np.prod(layer.output_shape[1:]))
        if isinstance(layer, layers.DepthwiseConv2D):  # a Conv2D subclass: first
            total += out * int(np.prod(layer.kernel_size))
        elif isinstance(layer, layers.Conv2D):
            total += out * int(np.prod(layer.kernel_size)) * layer.input_shape[-1] // layer.groups
        elif isinstance(layer, layers.Dense):
            total += out * layer.input_shape[-1]
    return total


def _lab_cnn(size: int):
    cfg = ConvNetConfig(name="cauca_cnn", filters=[32, 32, 64], kernel_size=5, dense_units=[64])
    return build(cfg, (size, size, 3), 2)


def _calibration(size: int) -> np.ndarray:
    return np.random.default_rng(0).random((8, size, size, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def lab_files() -> dict[str, bytes]:
    model = _lab_cnn(48)
    return {
        mode.value: convert(model, mode, _calibration(48) if mode is QuantMode.int8 else None)
        for mode in (QuantMode.none, QuantMode.int8, QuantMode.dynamic, QuantMode.float16)
    } | {"keras_macs": keras_macs(model)}  # type: ignore[dict-item]


def test_macs_equal_a_count_from_the_keras_layers(lab_files):
    for mode in ("none", "int8", "dynamic", "float16"):
        assert Graph.from_bytes(lab_files[mode]).macs == lab_files["keras_macs"], mode
    # and on the lab's 96 px input, the figure the README quotes
    assert keras_macs(_lab_cnn(96)) == 80_531_072


def test_depthwise_and_pointwise_macs():
    k = keras()
    model = k.Sequential(
        [
            k.layers.InputLayer(input_shape=(16, 16, 3)),
            k.layers.Conv2D(8, 3, strides=2, padding="same"),
            k.layers.DepthwiseConv2D(3, depth_multiplier=2),
            k.layers.Conv2D(4, 1),
            k.layers.GlobalAveragePooling2D(),
            k.layers.Dense(3),
        ]
    )
    graph = Graph.from_bytes(convert(model, QuantMode.none))
    assert {k.split(":")[1] for k in graph.macs_per_op()} == {
        "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"
    }  # fmt: skip
    assert graph.macs == keras_macs(model) == 8 * 8 * 8 * 27 + 6 * 6 * 16 * 9 + 6 * 6 * 4 * 16 + 12


def _allocations(content: bytes, arena: int) -> str:
    """What TFLM's recording allocator prints about one allocation (from descriptor 2)."""
    from tflite_micro.python.tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(content, arena_size=arena)
    with stderr_captured() as written:
        interpreter.print_allocations()
    return written[0].decode()


@needs_tflm
def test_arena_is_minimal_and_peak_activations_equal_the_planners(lab_files):
    for mode in ("none", "int8"):
        content = lab_files[mode]
        graph = Graph.from_bytes(content)
        arena = tflm.minimal_arena(content, graph)
        assert tflm.allocates(content, arena)
        assert not tflm.allocates(content, arena - tflm.ARENA_STEP)
        assert not tflm.allocates(content, int(0.95 * arena))
        printed = _allocations(content, 4 * arena)
        total = int(re.search(r"Arena allocation total (\d+) bytes", printed).group(1))
        head = int(re.search(r"Arena allocation head (\d+) bytes", printed).group(1))
        assert arena == total  # the bisection finds what the allocator says it used
        assert graph.peak_activation_bytes == head  # the offline lifetimes, the planner's total


def _split(n: int, size: int) -> Split:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(x, rng.integers(0, 2, n))


def _measure(content: bytes, board: TargetConfig, test: Split | None = None):
    test = test or _split(6, 48)
    litert = TFLiteModel(content)
    litert_classes = litert.predict(test.x).argmax(axis=1)
    return device.measure(content, litert, test, litert_classes, board, seed=0)


@needs_tflm
def test_tflm_predicts_as_litert_does_in_the_minimal_arena(lab_files):
    test = _split(12, 48)
    figures = _measure(lab_files["int8"], target.load("nano33ble"), test)
    m = figures.metrics
    assert m["tflm_arena_bytes"] == tflm.minimal_arena(lab_files["int8"], figures.graph)
    assert m["tflm_samples_used"] == 12 and m["tflm_agreement"] >= 11 / 12
    classes = tflm.classes(lab_files["int8"], figures.arena_bytes, TFLiteModel(
        lab_files["int8"]).model_input(test.x))  # fmt: skip
    assert m["tflm_test_accuracy"] == pytest.approx(np.mean(classes == test.y))
    assert figures.tags["fallopt.fits"] == "yes" and figures.tags["fallopt.target"] == "nano33ble"
    assert figures.sample == 0 and figures.sample_class == classes[0]


@needs_tflm
def test_a_sample_cap_draws_that_many_test_images(lab_files):
    board = TargetConfig(tflm_samples=5)
    figures = _measure(lab_files["none"], board, _split(9, 48))
    assert figures.metrics["tflm_samples_used"] == 5
    assert "fallopt.fits" not in figures.tags  # the host has no budget
    none = _measure(lab_files["none"], TargetConfig(tflm_samples=0))
    assert "tflm_arena_bytes" in none.metrics and "tflm_agreement" not in none.metrics


@needs_tflm
@pytest.mark.parametrize(
    ("mode", "why"),
    [("dynamic", "int8 weights with float activations"), ("float16", "float16 weights")],
)
def test_files_tflm_cannot_run_are_named_and_the_rest_is_still_measured(lab_files, mode, why):
    figures = _measure(lab_files[mode], target.load("nano33ble"))
    assert figures.tags["fallopt.tflm"].startswith(f"skipped: TFLM cannot run this model: {why}")
    assert figures.tags["fallopt.fits"].startswith(f"no: TFLM cannot run this model: {why}")
    assert not any(k.startswith("tflm_") for k in figures.metrics)
    assert figures.metrics["macs"] == lab_files["keras_macs"]
    assert figures.unsupported and figures.arena_bytes is None
    settings = device.deploy_settings(figures, ("a", "b"), InputRule(), _split(1, 48),
                                      target.load("nano33ble"))  # fmt: skip
    assert settings.unsupported.startswith(why)  # the bundle adds "TFLM cannot run ..." once
    assert settings.arena_bytes == target.recommended_arena(
        figures.graph.peak_activation_bytes, target.load("nano33ble")
    )
    assert "a lower bound, as TFLM did not run" in settings.arena_note


@needs_tflm
def test_an_op_tflm_lacks_is_named():
    k = keras()
    model = k.Sequential([k.layers.InputLayer(input_shape=(8, 8, 3)), k.layers.Flatten(),
                          k.layers.Dense(4, activation="gelu"), k.layers.Dense(2)])  # fmt: skip
    figures = _measure(convert(model, QuantMode.none), TargetConfig(), _split(2, 8))
    assert figures.tags["fallopt.tflm"].startswith(
        "skipped: TFLM cannot run this model: no TFLM kernel for GELU (TFLM: Didn't find op"
    )


def test_without_tflite_micro_the_offline_figures_remain(lab_files, monkeypatch, caplog):
    monkeypatch.setattr(tflm, "_runtime", lambda: "tflite-micro is not installed here (test)")
    figures = _measure(lab_files["int8"], target.load("nano33ble"))
    assert figures.tags["fallopt.tflm"] == "skipped: tflite-micro is not installed here (test)"
    assert figures.tags["fallopt.fits"].startswith("unknown: tflite-micro is not installed")
    assert set(figures.metrics) == {"macs", "peak_activation_bytes", "flash_bytes"}
    assert figures.metrics["flash_bytes"] == len(lab_files["int8"]) + 64 * 1024
    skipped = [r for r in caplog.records if "[tflm] skipped" in r.getMessage()]
    assert len(skipped) == 1  # one clear line


def test_verdicts_name_the_binding_budget():
    nano = target.load("nano33ble")
    assert target.verdict(547_040, 400_000, nano).text == "no: RAM 534 KiB > 256 KiB"
    assert target.verdict(119_200, 120_000, nano) == target.Fit(True, "yes")
    tight = TargetConfig(name="custom", ram_bytes=256 * 1024, flash_bytes=100 * 1024,
                         ram_reserved_bytes=200 * 1024)  # fmt: skip
    fit = target.verdict(119_200, 120_000, tight)
    assert fit.binding == ("RAM", "flash")
    assert fit.text == (
        "no: RAM 316 KiB (arena + 200 KiB reserved) > 256 KiB; flash 117 KiB > 100 KiB"
    )
    h747 = target.load("stm32h747")  # 1 MiB of RAM, but no block over 512 KiB
    assert target.verdict(600_000, 400_000, h747).binding == ("arena",)
    assert target.verdict(None, 400_000, nano, "why").text == "unknown: why"


def test_every_board_loads_with_its_data_sheet_figures():
    expected = {  # RAM, flash in KiB
        "nano33ble": (256, 1024), "stm32f746": (320, 1024), "stm32h747": (1024, 2048),
        "rp2040": (264, 2048), "esp32s3": (512, 8192), "host": (None, None),
    }  # fmt: skip
    assert set(target.names()) == set(expected)
    for name, (ram, flash) in expected.items():
        board = target.load(name)
        assert (board.ram_bytes, board.flash_bytes) == (
            ram and ram * 1024, flash and flash * 1024
        ), name  # fmt: skip
        assert board.is_board == (ram is not None) and board.description
    with pytest.raises(ConfigError, match="no such board; choose from"):
        target.load("nano34")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("target.ram_reserved_bytes=300000", "must be below target.ram_bytes=262144"),
        ("target.tflm_samples=-1", "target.tflm_samples=-1 is invalid"),
        ("target.arena_margin=-0.1", "target.arena_margin=-0.1 is invalid"),
    ],
)
def test_bad_target_values_fail_before_any_training(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg("target=nano33ble", override))


def test_a_custom_board_overrides_a_profile(compose_cfg):
    typed = validate(compose_cfg("target=nano33ble", "target.ram_bytes=524288"))
    assert typed.target.ram_bytes == 524288 and typed.target.flash_bytes == 1024 * 1024
    custom = validate(compose_cfg("target.ram_bytes=1000", "target.flash_bytes=2000"))
    assert custom.target.is_board and custom.target.name == "host"


@needs_tflm
def test_the_lab_cnn_on_default_data_logs_a_minimal_arena(compose_cfg, tmp_path, tracking_uri):
    """The default data and architecture at 96x96, as int8, judged against the Nano 33 BLE."""
    cfg = compose_cfg(
        "dataset.n_train=80", "dataset.n_test=30", "train.epochs=1", "prune=none",
        "quant=int8", "target=nano33ble", f"tracking.uri={tracking_uri}",
    )  # fmt: skip
    typed = validate(cfg)
    assert typed.dataset.image_size == 96 and typed.model.name == "cauca_cnn"
    run_experiment(typed, config_hash(typed), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    m, tags = run.data.metrics, run.data.tags
    content = Path(client.download_artifacts(run.info.run_id, "model.tflite", str(tmp_path)))
    content = content.read_bytes()
    arena = int(m["tflm_arena_bytes"])
    assert tflm.allocates(content, arena)
    assert not tflm.allocates(content, int(0.95 * arena))
    assert 500 * 1024 < arena < 560 * 1024  # DESIGN.md: 534 KiB for the lab's CNN as int8
    assert tags["fallopt.fits"] == f"no: RAM {target.kib(arena)} > 256 KiB"
    model = keras().models.load_model(
        client.download_artifacts(run.info.run_id, "model/model.keras", str(tmp_path))
    )
    assert m["macs"] == keras_macs(model) == 80_531_072
    assert m["flash_bytes"] == len(content) + typed.target.runtime_flash_bytes
    # LiteRT evaluates int8 with its built-in kernels, bit-exact with TFLM reference ones
    assert m["tflm_samples_used"] == 30 and m["tflm_agreement"] == 1.0
    assert run.info.status == "FINISHED"
    # The bundle declares that arena plus the margin, and TFLM allocates the file in it.
    deploy = Path(client.download_artifacts(run.info.run_id, "deploy", str(tmp_path)))
    declared = re.search(r"kTensorArenaSize = (\d+);", (deploy / "model_settings.h").read_text())
    assert int(declared.group(1)) == target.recommended_arena(arena, typed.target)
    assert tflm.allocates(content, int(declared.group(1)))


@needs_tflm
@pytest.mark.slow  # nine runs from the command line, then the report: about 2 minutes
def test_the_fit_experiment_then_the_report_pick_the_best_run_that_fits(tmp_path):
    from fallopt.report.__main__ import main as report

    from .conftest import multirun

    sweep = multirun(
        tmp_path, "+experiment=fit_nano33ble", "tracking.experiment=fallopt",
        "dataset.n_train=80", "dataset.n_test=30", "train.epochs=1", "model.filters=[4,8]",
        "model.kernel_size=3", "model.dense_units=[8]", "target.tflm_samples=10", tiny=False,
    )  # fmt: skip
    runs = sweep.children
    assert len(runs) == 9 and {r.info.status for r in runs} == {"FINISHED"}
    sizes = {(r.data.params["model.width"], r.data.params["dataset.image_size"]) for r in runs}
    assert len(sizes) == 9  # width 0.25, 0.5, 1 x 48, 64, 96 px
    arena = {r.info.run_id: r.data.metrics["tflm_arena_bytes"] for r in runs}
    assert all(r.data.tags["fallopt.fits"] == "yes" for r in runs)  # tiny models, 256 KiB
    # Reserve RAM so that only the smaller half of the arenas fits beside it.
    cut = sorted(arena.values())[4]
    reserve_kib = (256 * KIB - cut) // KIB
    fits = [r for r in runs if arena[r.info.run_id] + reserve_kib * KIB <= 256 * KIB]
    assert 0 < len(fits) < len(runs)
    best = max(fits, key=lambda r: r.data.metrics["tflite_test_accuracy"])
    out = tmp_path / "report"
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"  # multirun's store
    code = report(["--tracking-uri", uri, "--parent-run",
                   sweep.parent.info.run_id, "--target", "nano33ble", "--ram-reserved-kb",
                   str(reserve_kib), "--out", str(out)])  # fmt: skip
    assert code == 0
    recommended = sweep.client.get_run(sweep.parent.info.run_id).data.tags[
        "fallopt.recommended_run_id.nano33ble"
    ]
    accuracy = {r.info.run_id: r.data.metrics["tflite_test_accuracy"] for r in runs}
    assert accuracy[recommended] == accuracy[best.info.run_id]  # the best (ties: any of them)
    assert recommended in {r.info.run_id for r in fits}
