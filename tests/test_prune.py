"""Pruning that really prunes: schedules, scopes, verified sparsity, the shared-weight trap."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fallopt.cache import StageCache, stage_key
from fallopt.compress.prune import (
    LayerSparsity,
    PruningError,
    check_sparsity,
    prune_and_fine_tune,
    select_layers,
)
from fallopt.compress.schedule import plan_schedule
from fallopt.config import ConfigError, PruneConfig, PruneMethod, TrainConfig
from fallopt.models import build_model
from fallopt.models.conv import ConvNetConfig
from fallopt.size import file_size, nonzero_params, save_model
from fallopt.train import seed_everything, train_model

from .conftest import bright_squares

CONSTANT, POLYNOMIAL = PruneMethod.constant, PruneMethod.polynomial


# --- schedules (pure Python, tfmot's step semantics) -----------------------------------------


def test_tfmots_default_frequency_is_refused_for_a_short_fine_tune():
    # 2 epochs x 5 steps: tfmot's frequency=100 would never update the masks.
    with pytest.raises(ConfigError, match="prune.frequency=100 is larger than the steps"):
        plan_schedule(PruneConfig(sparsity=0.5, frequency=100), steps_per_epoch=5)


def test_steps_run_one_to_n_and_updates_land_on_the_grid():
    s = plan_schedule(PruneConfig(sparsity=0.5, frequency=4), steps_per_epoch=5)
    assert s.total_steps == 10 and s.update_steps() == [4, 8]
    s = plan_schedule(PruneConfig(sparsity=0.5, begin=3, unit="steps"), steps_per_epoch=5)
    assert s.update_steps() == list(range(3, 11))


def test_begin_after_the_fine_tune_is_refused():
    with pytest.raises(ConfigError, match="after the fine-tune ends"):
        plan_schedule(PruneConfig(sparsity=0.5, begin=3), steps_per_epoch=5)


def test_polynomial_end_beyond_the_fine_tune_is_refused():
    cfg = PruneConfig(method=POLYNOMIAL, sparsity=0.5, end=3)
    with pytest.raises(ConfigError, match="the target would never be reached"):
        plan_schedule(cfg, steps_per_epoch=5)


def test_polynomial_end_off_the_update_grid_is_refused():
    cfg = PruneConfig(method=POLYNOMIAL, sparsity=0.5, end=9, unit="steps", frequency=4)
    with pytest.raises(ConfigError, match="the final sparsity would be missed"):
        plan_schedule(cfg, steps_per_epoch=5)


def test_polynomial_default_end_is_the_last_update_step():
    cfg = PruneConfig(method=POLYNOMIAL, sparsity=0.5, frequency=3)
    s = plan_schedule(cfg, steps_per_epoch=5)
    assert s.end_step == 9 and s.update_steps()[-1] == 9


# --- pruning tiny models ---------------------------------------------------------------------

TRAIN = TrainConfig(epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained tiny CNN saved as a baseline file, and its data."""
    train, val = bright_squares(64, 48)
    seed_everything(0)
    model = build_model(
        ConvNetConfig(name="tiny", filters=[8], kernel_size=3, dense_units=[16]), (12, 12, 1), 2
    )
    train_model(model, train, val, TRAIN, 0)
    path = save_model(model, tmp_path_factory.mktemp("baseline") / "model.keras")
    return path, train, val


def _prune(tiny, tmp_path, **kwargs):
    path, train, val = tiny
    cfg = PruneConfig(fine_tune_epochs=1, **kwargs)
    schedule = plan_schedule(cfg, steps_per_epoch=6)
    return prune_and_fine_tune(path, train, val, cfg, schedule, TRAIN, 0, tmp_path / "p.keras")


def _zeros(model, name):
    return float((model.get_layer(name).kernel.numpy() == 0).mean())


def test_scope_dense_prunes_dense_kernels_and_leaves_conv_dense(tiny, tmp_path):
    result = _prune(tiny, tmp_path, sparsity=0.5, scope="dense")
    assert [layer.layer for layer in result.layers] == ["dense1", "output"]
    assert _zeros(result.model, "dense1") == pytest.approx(0.5, abs=0.01)
    assert _zeros(result.model, "conv1") == 0.0


@pytest.mark.slow
def test_scope_conv_and_name_pattern(tiny, tmp_path):
    conv = _prune(tiny, tmp_path, sparsity=0.7, scope="conv").model
    assert _zeros(conv, "conv1") == pytest.approx(0.7, abs=0.02)  # 72 weights: 1/72 steps
    assert _zeros(conv, "dense1") == 0.0
    only = _prune(tiny, tmp_path, sparsity=0.6, scope="dense1").model
    assert _zeros(only, "dense1") == pytest.approx(0.6, abs=0.01)
    assert _zeros(only, "output") == 0.0


def test_polynomial_reaches_its_final_sparsity(tiny, tmp_path):
    result = _prune(tiny, tmp_path, method=POLYNOMIAL, initial_sparsity=0.1, sparsity=0.6)
    assert all(abs(layer.sparsity - 0.6) <= 0.01 for layer in result.layers)


@pytest.mark.slow
def test_structured_2_of_4(tiny, tmp_path):
    result = _prune(tiny, tmp_path, sparsity=0.5, m_by_n=[2, 4], scope="dense1")
    kernel = result.model.get_layer("dense1").kernel.numpy()  # (288 inputs, 16 units)
    groups = kernel.T.reshape(16, -1, 4)
    assert (np.count_nonzero(groups, axis=-1) <= 2).all()


def test_m_by_n_over_the_image_channels_is_refused_before_any_run(
    compose_cfg, tmp_path, tracking_uri
):
    """tfmot pads conv1's 3 input channels to 4 and misses 2:4 (a third sparse, not half)."""
    from mlflow.tracking import MlflowClient

    from fallopt.config import validate
    from fallopt.identity import config_hash
    from fallopt.task import run_experiment

    from .conftest import TINY

    cfg = validate(
        compose_cfg(
            *TINY,
            "prune.scope=conv",
            "prune.m_by_n=[2,4]",
            "prune.sparsity=0.5",
            f"tracking.uri={tracking_uri}",
        )  # fmt: skip
    )
    with pytest.raises(ConfigError, match=r"layer conv1 has 3 inputs, not a multiple of 4.*conv2"):
        run_experiment(cfg, config_hash(cfg), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    assert client.search_runs([client.get_experiment_by_name("fallopt").experiment_id]) == []


def test_zero_sparsity_fine_tunes_without_pruning(tiny, tmp_path):
    result = _prune(tiny, tmp_path, sparsity=0.0)
    assert all(layer.zeros == 0 for layer in result.layers)
    assert len(result.history["loss"]) == 1


def test_stripped_file_loads_and_predicts_like_the_returned_model(tiny, tmp_path):
    from fallopt.backend import keras

    result = _prune(tiny, tmp_path, sparsity=0.5)
    _, _, val = tiny
    loaded = keras().models.load_model(tmp_path / "p.keras", compile=False)
    x = val.x.astype(np.float32) / 255
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), result.model.predict(x, verbose=0))
    assert not any("prune_low_magnitude" in layer.name for layer in loaded.layers)


def test_the_baseline_is_not_pruned_by_pruning_it(tiny, tmp_path):
    """tfmot wraps the layers it is given; the baseline on disk must stay untouched."""
    from fallopt.backend import keras

    path, _, val = tiny
    before = path.read_bytes()
    baseline = keras().models.load_model(path, compile=False)
    x = val.x.astype(np.float32) / 255
    expected = baseline.predict(x, verbose=0)
    _prune(tiny, tmp_path, sparsity=0.8)
    assert path.read_bytes() == before
    again = keras().models.load_model(path, compile=False)
    np.testing.assert_array_equal(again.predict(x, verbose=0), expected)
    assert _zeros(again, "dense1") == 0.0


def test_a_missed_target_fails_loudly():
    layers = [LayerSparsity("dense1", (100, 10), 1000, 300, 0.5)]
    with pytest.raises(PruningError, match=r"dense1 0\.300"):
        check_sparsity(layers)
    # On target up to rounding: 26 of 32 weights is the closest to 0.8.
    check_sparsity([LayerSparsity("output", (16, 2), 32, 26, 0.8)])


def test_a_scope_matching_nothing_names_the_layers(tiny):
    from fallopt.backend import keras

    model = keras().models.load_model(tiny[0], compile=False)
    with pytest.raises(ConfigError, match=r"\['conv1', 'dense1', 'output'\]"):
        select_layers(model, "lstm.*")


def test_sizes_measure_real_gzip_of_the_file(tiny, tmp_path):
    import gzip

    result = _prune(tiny, tmp_path, sparsity=0.8)
    pruned, base = file_size(tmp_path / "p.keras"), file_size(tiny[0])
    assert pruned.gzip_bytes == len(gzip.compress((tmp_path / "p.keras").read_bytes(), 9, mtime=0))
    assert pruned.gzip_bytes < base.gzip_bytes  # the zeros compress
    total = sum(w.size for w in result.model.get_weights())
    assert nonzero_params(result.model) < total


# --- the stage cache -------------------------------------------------------------------------


def test_cache_builds_once_and_rebuilds_a_corrupt_entry(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def build(out):
        calls.append(1)
        (out / "model.keras").write_bytes(b"weights")
        return {"history": {}}

    key = stage_key("baseline", {"a": 1})
    first, reused = cache.get_or_build("baseline", key, build)
    assert not reused and (first.path / "model.keras").read_bytes() == b"weights"
    _, reused = cache.get_or_build("baseline", key, build)
    assert reused and len(calls) == 1
    (first.path / "model.keras").write_bytes(b"weig")  # truncated by a crash
    _, reused = cache.get_or_build("baseline", key, build)
    assert not reused and len(calls) == 2
    assert stage_key("baseline", {"a": 2}) != key


def test_concurrent_builders_wait_for_the_first(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def slow_build(out):
        calls.append(1)
        time.sleep(0.5)
        (out / "model.keras").write_bytes(b"w")
        return {}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_build("b", "k", slow_build)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(reused for _, reused in results) == [False, True]


def test_processes_sharing_a_cache_build_once(tmp_path):
    """Jobs of one sweep in other processes wait on the lock and reuse the entry."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from fallopt.cache import StageCache\n"
        "def build(out):\n"
        "    time.sleep(1); (out / 'model.keras').write_bytes(b'w'); return {}\n"
        "_, reused = StageCache(Path(sys.argv[1])).get_or_build('baseline', 'k', build)\n"
        "print('reused' if reused else 'trained')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = sorted(p.communicate(timeout=60)[0].decode().strip() for p in procs)
    assert outputs == ["reused", "trained"]
