"""Channel pruning, weight clustering, per-layer maps and sensitivity, as a user runs them.

Each test reads back what MLflow logged (the model files, the tables, the metrics) and checks
it against an independent computation from those files.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fallopt.backend import keras
from fallopt.config import validate
from fallopt.errors import ConfigError
from fallopt.identity import config_hash
from fallopt.task import run_experiment

from .conftest import REPO, TINY, fallopt_cli, multirun

# The lab CNN on a few default-data images: shapes are the lab's, training is one epoch.
LAB = [
    "model=cauca_cnn",
    "dataset.n_train=60",
    "dataset.n_test=20",
    "train.epochs=1",
    "train.batch_size=16",
    "prune.fine_tune_epochs=1",
    "target.tflm_samples=0",
    "quant.latency_repeats=5",
]


def _run(compose_cfg, tmp_path: Path, tracking_uri: str, *overrides: str):
    typed = validate(compose_cfg(*overrides, f"tracking.uri={tracking_uri}"))
    run_experiment(typed, config_hash(typed), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(typed.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    return client, run


def _download(client: MlflowClient, run, path: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run.info.run_id, path, str(into)))


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _keras_macs(model) -> int:
    """Multiply-accumulates of the Conv2D and Dense layers, counted from their shapes."""
    layers, total = keras().layers, 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output_shape
            kh, kw, c_in, _ = layer.kernel.shape
            total += h * w * kh * kw * c_in * c_out
        elif isinstance(layer, layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def _tflite_kernels(content: bytes) -> list[np.ndarray]:
    """Every constant weight tensor of rank 2 or 4 in a .tflite file (kernels, TFLite layout)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    found = []
    for detail in interpreter.get_tensor_details():
        if len(detail["shape"]) in (2, 4) and detail["shape"][0] > 0:
            try:
                found.append(interpreter.get_tensor(detail["index"]))
            except ValueError:  # an activation, not a constant
                continue
    return found


def _tflite_layout(kernel: np.ndarray) -> np.ndarray:
    """A Keras kernel as TFLite stores it: conv [out, kh, kw, in], dense [units, in]."""
    return kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T


def _most_per_channel(tensor: np.ndarray) -> int:
    return max(len(np.unique(row)) for row in tensor.reshape(tensor.shape[0], -1))


def _in_file(content: bytes, kernel: np.ndarray) -> np.ndarray:
    """The file's tensor holding `kernel` (the only constant of its TFLite shape)."""
    shape = _tflite_layout(kernel).shape
    (tensor,) = [t for t in _tflite_kernels(content) if t.shape == shape]
    return tensor


@pytest.mark.slow
def test_channel_pruning_halves_the_lab_cnn_and_logs_what_changed(
    compose_cfg, tmp_path, tracking_uri
):
    client, run = _run(compose_cfg, tmp_path, tracking_uri, *LAB, "prune=channels",
                       "prune.sparsity=0.5", "prune.scope=all")  # fmt: skip
    m = run.data.metrics
    model = keras().models.load_model(_download(client, run, "model/model.keras", tmp_path / "d"))
    named = [x for x in model.layers if x.name.startswith(("conv", "dense", "output"))]
    widths = {x.name: x.get_config().get("filters", x.get_config().get("units")) for x in named}
    assert widths == {"conv1": 16, "conv2": 16, "conv3": 32, "dense1": 32, "output": 2}
    assert m["baseline_params_total"] == 342_178
    assert m["params_total"] == model.count_params() <= 342_178 / 2
    assert m["params_ratio_to_baseline"] == pytest.approx(model.count_params() / 342_178)
    assert m["macs"] == _keras_macs(model) < m["baseline_macs"] == 80_531_072
    assert m["tflite_latency_ms"] > 0 and m["tflite_size_bytes"] < m["baseline_keras_size_bytes"]
    rows = _table(_download(client, run, "channels_per_layer.csv", tmp_path / "d"))
    assert {r["layer"]: int(r["channels_after"]) for r in rows} == {
        k: v for k, v in widths.items() if k != "output"
    }
    assert all(m[f"channels_{r['layer']}"] == int(r["channels_after"]) for r in rows)
    removed = sum(int(r["channels_before"]) - int(r["channels_after"]) for r in rows)
    total = sum(int(r["channels_before"]) for r in rows)
    assert m["channels_removed_fraction"] == pytest.approx(removed / total) == 0.5
    assert {r["layer"]: int(r["channels_before"]) for r in rows} == {
        "conv1": 32, "conv2": 32, "conv3": 64, "dense1": 64
    }  # fmt: skip
    assert run.data.tags["fallopt.stage.prune"] == "trained"


@pytest.mark.slow
def test_kmeans_leaves_at_most_k_values_in_the_keras_and_tflite_files(
    compose_cfg, tmp_path, tracking_uri
):
    client, run = _run(compose_cfg, tmp_path, tracking_uri, *TINY, "model.dense_units=[16]",
                       "cluster=kmeans", "cluster.clusters=16", "quant=float16")  # fmt: skip
    m, tags = run.data.metrics, run.data.tags
    model = keras().models.load_model(_download(client, run, "model/model.keras", tmp_path / "d"))
    content = _download(client, run, "model.tflite", tmp_path / "d").read_bytes()
    rows = _table(_download(client, run, "cluster_per_layer.csv", tmp_path / "d"))
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "dense1", "output"]
    for name in (r["layer"] for r in rows):
        kernel = model.get_layer(name).kernel.numpy()
        assert len(np.unique(kernel)) == m[f"clusters_{name}"] <= 16, name
        # float16 rounding can merge values, never split them
        assert _most_per_channel(_in_file(content, kernel)) == m[f"tflite_clusters_{name}"] <= 16
    assert m["clusters_achieved"] == max(m[f"clusters_{r['layer']}"] for r in rows)
    assert tags["fallopt.stage.cluster"] == "trained"


@pytest.mark.slow
def test_pcqat_keeps_the_pruned_zeros_and_the_clusters_in_its_int8_file(
    compose_cfg, tmp_path, tracking_uri
):
    client, run = _run(
        compose_cfg, tmp_path, tracking_uri, *TINY, "model=cauca_cnn_qat",
        "model.dense_units=[16]", "prune.sparsity=0.5", "prune.scope=all", "cluster=kmeans",
        "cluster.clusters=8", "cluster.preserve_sparsity=true", "quant=pcqat",
    )  # fmt: skip
    model = keras().models.load_model(_download(client, run, "model/model.keras", tmp_path / "d"))
    content = _download(client, run, "model.tflite", tmp_path / "d").read_bytes()
    for name in ("conv1", "conv2", "dense1", "output"):
        kernel = model.get_layer(name).kernel.numpy()
        zeros = _tflite_layout(kernel) == 0
        assert zeros.mean() == pytest.approx(0.5, abs=0.02), name  # pruned, then kept
        stored = _in_file(content, kernel)
        assert stored.dtype == np.int8
        assert (stored[zeros] == 0).all(), name
        assert _most_per_channel(stored) <= 8, name
    assert run.data.metrics["tflite_clusters_achieved"] <= 8


@pytest.mark.parametrize("method", ["constant", pytest.param("polynomial", marks=pytest.mark.slow)])
def test_a_per_layer_map_prunes_each_layer_to_its_own_sparsity(
    compose_cfg, tmp_path, tracking_uri, method
):
    client, run = _run(compose_cfg, tmp_path, tracking_uri, *TINY, f"prune={method}",
                       "prune.per_layer={conv2: 0.5, dense1: 0.9}")  # fmt: skip
    m = run.data.metrics
    model = keras().models.load_model(_download(client, run, "model/model.keras", tmp_path / "d"))
    for name, target in (("conv2", 0.5), ("dense1", 0.9)):
        kernel = model.get_layer(name).kernel.numpy()
        assert m[f"sparsity_{name}"] == pytest.approx((kernel == 0).mean())
        assert (kernel == 0).mean() == pytest.approx(target, abs=0.01)
    assert (model.get_layer("conv1").kernel.numpy() == 0).mean() < 0.05  # not in the map
    assert "sparsity_output" not in m


@pytest.mark.slow
def test_float_layers_stay_float32_in_the_int8_file_the_run_evaluates(
    compose_cfg, tmp_path, tracking_uri
):
    from fallopt.tflite_graph import Graph

    float_dense1 = ["quant=int8", "quant.representative_samples=20", "quant.float_layers=[dense1]"]
    client, run = _run(compose_cfg, tmp_path, tracking_uri, *TINY, *float_dense1)
    content = _download(client, run, "model.tflite", tmp_path / "d").read_bytes()
    graph = Graph.from_bytes(content)
    types = {
        graph.tensors[op.outputs[0]].name: graph.tensors[op.outputs[0]].dtype
        for op in graph.ops
        if op.name == "FULLY_CONNECTED"
    }
    float_ops = [name for name, dtype in types.items() if "dense1" in name]
    assert float_ops and all(types[name] == "FLOAT32" for name in float_ops), types
    assert all(dtype == "INT8" for name, dtype in types.items() if "output" in name), types
    assert run.data.tags["fallopt.float_ops"] == "dense1"
    assert graph.input.dtype == graph.output.dtype == "INT8"
    m = run.data.metrics
    assert m["tflm_agreement"] >= 0.9 and m["tflite_test_accuracy"] > 0  # TFLM runs it too


def _keras_file_with(layer: str, path: Path) -> Path:
    k = keras()
    extra = {"rescaling": k.layers.Rescaling(1 / 255.0, name="rescaling"),
             "reshape": k.layers.Reshape((24, 24, 3), name="reshape")}[layer]  # fmt: skip
    model = k.Sequential(
        [k.Input((24, 24, 3)), extra, k.layers.Conv2D(4, 3, name="conv1"),
         k.layers.Flatten(name="flatten"), k.layers.Dense(2, "softmax", name="output")]
    )  # fmt: skip
    model.save(path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune.per_layer={conv9: 0.5}"], "prune.per_layer names conv9, which model"),
        (["cluster=kmeans", "cluster.clusters=64"], "output"),
        (["quant=int8", "quant.float_layers=[conv9]"], "quant.float_layers names conv9"),
    ],
)
def test_bad_compression_input_is_refused_before_training(
    compose_cfg, tmp_path, tracking_uri, monkeypatch, args, message
):
    monkeypatch.setenv("FALLOPT_CACHE", str(tmp_path / "cache"))
    typed = validate(compose_cfg(*TINY, *args, f"tracking.uri={tracking_uri}"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_experiment(typed, config_hash(typed), tmp_path / "out")
    experiment = MlflowClient(tracking_uri).get_experiment_by_name("fallopt")
    assert experiment is None or not MlflowClient(tracking_uri).search_runs(
        [experiment.experiment_id]
    )
    assert not list((tmp_path / "cache").rglob("model.keras"))  # nothing trained


@pytest.mark.slow
def test_channel_pruning_refuses_a_users_model_it_cannot_rebuild_naming_the_layer(tmp_path):
    path = _keras_file_with("rescaling", tmp_path / "user.keras")
    proc = fallopt_cli(
        "dataset.image_size=24", "dataset.n_train=60", "dataset.n_test=20", "model=keras_file",
        f"model.path={path}", "prune=channels", "prune.scope=all",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"hydra.run.dir={tmp_path}/o",
        env={"FALLOPT_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "rescaling (Rescaling)" in out and "Traceback" not in out


def _sensitivity(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fallopt.sensitivity", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip


@pytest.mark.slow
def test_sensitivity_proposes_a_map_that_a_sweep_accepts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = _sensitivity(tmp_path, *TINY, "--max-drop", "0.1",
                        "sensitivity.sparsities=[0.3,0.6,0.9]", f"tracking.uri={uri}",
                        f"hydra.run.dir={tmp_path}/o")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fallopt")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fallopt.kind"] == "sensitivity"
    assert run.data.params["sensitivity.max_drop"] == "0.1"
    rows = _table(_download(client, run, "sensitivity.csv", tmp_path / "d"))
    assert _download(client, run, "sensitivity.png", tmp_path / "d").stat().st_size > 1000
    errors = _table(_download(client, run, "quant_error.csv", tmp_path / "d"))
    assert {"conv1", "conv2", "dense1", "output"} <= {e["layer"] for e in errors}
    for layer in ("conv1", "conv2", "dense1", "output"):  # each weight layer's worst op
        worst = max(float(e["rmse_over_scale"]) for e in errors if e["layer"] == layer)
        assert run.data.metrics[f"quant_error_{layer}"] == pytest.approx(worst)
    # the map, recomputed from the logged table: the highest sparsity whose drop, and every
    # lower one's, is within 0.1
    expected = {}
    for layer in dict.fromkeys(r["layer"] for r in rows):
        ok = sorted((float(r["sparsity"]), float(r["drop"]) <= 0.1) for r in rows
                    if r["layer"] == layer)  # fmt: skip
        passing = [s for i, (s, _) in enumerate(ok) if all(good for _, good in ok[: i + 1])]
        if passing:
            expected[layer] = passing[-1]
    proposed = {k.removeprefix("proposed_sparsity_"): v for k, v in run.data.metrics.items()
                if k.startswith("proposed_sparsity_")}  # fmt: skip
    assert proposed == expected and proposed, rows
    overrides = _download(client, run, "proposal.txt", tmp_path / "d").read_text().split("\n")
    per_layer = next(o for o in overrides if o.startswith("prune.per_layer="))
    sweep = multirun(tmp_path, per_layer, uri=f"sqlite:///{tmp_path}/s/mlflow.db")
    assert len(sweep.runs("FINISHED")) == 1
    assert sweep.runs()[0].data.tags["fallopt.stage.baseline"] == "reused"  # the analysed one
    params = {r["layer"]: int(r["params"]) for r in rows}
    for child in sweep.runs("FINISHED"):
        for layer, target in proposed.items():  # a kernel of n weights: within one weight
            tolerance = max(0.01, 1 / params[layer])
            assert child.data.metrics[f"sparsity_{layer}"] == pytest.approx(target, abs=tolerance)


def test_the_report_labels_maps_channels_and_clusters():
    from fallopt.report.runs import label

    flat_params = {"model.name": "cauca_cnn", "prune.method": "constant", "quant.mode": "int8",
                   "prune.per_layer.conv1": "0.3", "prune.per_layer.dense1": "0.95",
                   "cluster.method": "kmeans", "cluster.clusters": "16"}  # fmt: skip
    expected = "cauca_cnn · constant {conv1: 0.3, dense1: 0.95} · kmeans 16 · int8"
    assert label(flat_params) == expected
    channels = {"model.name": "m", "prune.method": "channels", "prune.sparsity": "0.5",
                "prune.scope": "all", "cluster.method": "none", "quant.mode": "none"}  # fmt: skip
    assert label(channels) == "m · channels 0.5 all · none"
