"""The lab's own model, brought to fallopt: `best_CNN.keras` trained on raw 0..255 pixels by a
plain script (scripts/lab_model.py, Keras 3 or tf_keras), then pruned and quantized as a
`model=keras_file` baseline. Every figure is checked against an independent computation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fallopt.config import validate
from fallopt.identity import config_hash

from .conftest import REPO, cauca_dict, multirun, write_pickle

# The lab's CNN needs 48 px: three 5x5 convolutions, each pooled by 2.
SIZE = 48


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """CAUCA-format pickles and the lab's model trained on them, as the script reports it."""
    tmp = tmp_path_factory.mktemp("lab")
    train = write_pickle(tmp / "data_train.pickle", cauca_dict(n=64, size=SIZE, seed=1))
    test = write_pickle(tmp / "data_test.pickle", cauca_dict(n=24, size=SIZE, seed=2))

    def trained(keras_version: str, name: str) -> tuple[Path, dict[str, float]]:
        out = tmp / name
        proc = subprocess.run(
            [sys.executable, "scripts/lab_model.py", "--train", str(train), "--test", str(test),
             "--keras", keras_version, "--out", str(out), "--epochs", "2"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = dict(re.findall(r"^(params|test_accuracy) (\S+)$", proc.stdout, re.M))
        return out, {k: float(v) for k, v in found.items()}

    return train, test, trained


def _args(model_file: Path, train: Path, test: Path) -> list[str]:
    return [
        "model=keras_file", f"model.path={model_file}", "model.input_range=[0,255]",
        "dataset=cauca", f"dataset.train_path={train}", f"dataset.test_path={test}",
        "prune.fine_tune_epochs=1", "train.batch_size=16", "quant.representative_samples=20",
    ]  # fmt: skip


def _lab_int8_accuracy(content: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """The lab's loop over a .tflite: raw float pixels, quantized with the input's own scale."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero = inp["quantization"]
    predicted = []
    for image in x.astype(np.float32):  # no division by 255: the lab's rule
        interpreter.set_tensor(inp["index"], np.clip(np.round(image / scale + zero), -128, 127)
                               .astype(np.int8)[None])  # fmt: skip
        interpreter.invoke()
        predicted.append(int(interpreter.get_tensor(out["index"])[0].argmax()))
    return float(np.mean(np.array(predicted) == y))


@pytest.mark.slow  # trains the lab's model in a subprocess, then prunes and converts it: ~70 s
def test_the_labs_keras3_model_is_the_baseline_pruned_and_quantized(
    lab, compose_cfg, tmp_path, tracking_uri
):
    from fallopt.data.cauca import load_file
    from fallopt.task import run_experiment

    train, test, trained = lab
    model_file, script = trained("3", "best_CNN.keras")
    overrides = [*_args(model_file, train, test), "prune.sparsity=0.5", "quant=int8"]
    typed = validate(compose_cfg(*overrides, f"tracking.uri={tracking_uri}"))
    assert typed.train.epochs == 0  # a file is taken as it is
    run_experiment(typed, config_hash(typed), tmp_path / "out")

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fallopt").experiment_id])
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fallopt.stage.baseline"] == "loaded"  # not retrained
    assert m["baseline_test_accuracy"] == pytest.approx(script["test_accuracy"], abs=1e-9)
    assert m["params_total"] == script["params"]
    assert m["source_file_bytes"] == model_file.stat().st_size
    assert "re-saved without optimizer state" in tags["fallopt.baseline_file"]
    assert m["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert run.data.params["model.input_range"] == "[0.0, 255.0]"

    art = Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(tmp_path / "dl"), tracking_uri=tracking_uri
    ))  # fmt: skip
    content = (art / "model.tflite").read_bytes()
    held_out = load_file(test)
    assert m["tflite_test_accuracy"] == pytest.approx(
        _lab_int8_accuracy(content, held_out.x, held_out.y), abs=1e-9
    )
    matrix = json.loads((art / "tflite_confusion_matrix.json").read_text())
    assert sum(map(sum, matrix)) == len(held_out.y)

    # The file's content is its identity: moved, the same run; replaced, a new one.
    moved = tmp_path / "moved.keras"
    moved.write_bytes(model_file.read_bytes())
    same = validate(compose_cfg(*_args(moved, train, test), "prune.sparsity=0.5", "quant=int8",
                                f"tracking.uri={tracking_uri}"))  # fmt: skip
    assert config_hash(same) == config_hash(typed)
    other, _ = trained("2", "constant_pruning.h5")
    moved.write_bytes(other.read_bytes())
    assert config_hash(validate(compose_cfg(*_args(moved, train, test)))) != config_hash(same)


@pytest.mark.slow  # two subprocess sweeps of 4 runs each
@pytest.mark.parametrize(("keras_version", "name"), [("3", "best_CNN.keras"), ("2", "lab.h5")])
def test_the_labs_sweep_over_its_own_model(lab, tmp_path, keras_version, name):
    train, test, trained = lab
    model_file, script = trained(keras_version, name)
    sweep = multirun(
        tmp_path, *_args(model_file, train, test), "prune.sparsity=0.0,0.5", "quant=none,int8",
        tiny=False,
    )  # fmt: skip
    runs = sweep.runs("FINISHED")
    assert len(runs) == 4
    for run in runs:
        m = run.data.metrics
        assert m["baseline_test_accuracy"] == pytest.approx(script["test_accuracy"], abs=1e-9)
        assert m["params_total"] == script["params"]
        assert run.data.tags["fallopt.stage.baseline"] in ("loaded", "reused")
        target = float(run.data.params["prune.sparsity"])
        assert m["sparsity_achieved"] == pytest.approx(target, abs=0.01)


@pytest.mark.slow  # needs the lab's trained model (the module fixture): ~40 s
def test_a_model_file_that_does_not_fit_the_data_is_refused_before_any_run(
    lab, compose_cfg, tmp_path, tracking_uri
):
    from fallopt.errors import ConfigError
    from fallopt.task import run_experiment

    train, test, trained = lab
    model_file, _ = trained("3", "best_CNN.keras")
    small = write_pickle(tmp_path / "small.pickle", cauca_dict(n=40, size=24, seed=3))
    from fallopt.backend import keras

    three = tmp_path / "three_classes.h5"
    layers = keras().layers
    keras().Sequential(
        [layers.Input((SIZE, SIZE, 3)), layers.Flatten(), layers.Dense(3, activation="softmax")]
    ).save(three)
    cases = {
        "takes 48x48x3 images but the data set's are 24x24x3": _args(model_file, small, small),
        "outputs 3 classes but the data set has 2": _args(three, train, test),
        "no such file": _args(tmp_path / "missing.keras", train, test),
    }
    for message, overrides in cases.items():
        cfg = validate(compose_cfg(*overrides, f"tracking.uri={tracking_uri}"))
        with pytest.raises(ConfigError, match=message):
            run_experiment(cfg, config_hash(cfg), tmp_path / "out")
    client = MlflowClient(tracking_uri)
    assert client.search_runs([client.get_experiment_by_name("fallopt").experiment_id]) == []


def test_a_users_builder_function_is_a_model_source(compose_cfg, tmp_path, monkeypatch):
    from fallopt.errors import ConfigError
    from fallopt.models import build_model

    (tmp_path / "my_models.py").write_text(
        "import tf_keras as keras\n"
        "def small_cnn(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.layers.Input(input_shape),\n"
        "        keras.layers.Conv2D(4, 3, name='conv'), keras.layers.Flatten(name='flatten'),\n"
        "        keras.layers.Dense(num_classes, activation='softmax', name='output')])\n"
        "def keras3(input_shape, num_classes):\n"
        "    import keras as k3\n"
        "    return k3.Sequential([k3.layers.Input(input_shape), k3.layers.Flatten(),\n"
        "        k3.layers.Dense(num_classes)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate(compose_cfg("model=python", "model.target=my_models:small_cnn"))
    model = build_model(cfg.model, (12, 12, 3), 2)
    assert [layer.name for layer in model.layers] == ["conv", "flatten", "output"]
    before = config_hash(cfg)
    with (tmp_path / "my_models.py").open("a") as f:
        f.write("# edited\n")
    assert config_hash(cfg) != before  # an edited function is a new run

    for target, message in [
        ("my_models:keras3", "not a tf_keras model: build it with `import tf_keras as keras`"),
        ("my_models:nothing", "has no function nothing"),
        ("no_such_module:f", "cannot import no_such_module"),
    ]:
        bad = validate(compose_cfg("model=python", f"model.target={target}"))
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_model(bad.model, (12, 12, 3), 2)
    with pytest.raises(ConfigError, match="model.target='nope' is invalid"):
        validate(compose_cfg("model=python", "model.target=nope"))
