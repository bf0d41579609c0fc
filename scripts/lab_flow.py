"""The lab's notebook flow, reproduced for the side-by-side benchmarks in scripts/.

What students ran by hand for every combination: float32 copies of the images, Keras `fit`
on arrays, tfmot pruning of a reloaded baseline, the TFLite converter, and an evaluation
with `tf.lite.Interpreter`, one image per invoke.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import fallopt  # noqa: F401  (Keras 2 for tfmot, as in the lab)


def cauca_cnn(input_shape: tuple[int, int, int], num_classes: int = 2):
    """The lab's CAUCA CNN, built from fallopt/conf/model/cauca_cnn.yaml as fallopt builds it."""
    from hydra import compose, initialize_config_dir

    from fallopt.config import validate
    from fallopt.models import build_model
    from fallopt.run import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = validate(compose("config", overrides=["model=cauca_cnn"]))
    return build_model(cfg.model, input_shape, num_classes)


def per_image_predictions(content: bytes, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The lab's evaluation: tf.lite.Interpreter, one image per invoke. Returns (classes, s)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    start = time.perf_counter()
    predicted = []
    for image in images:
        x = image[None].astype(np.float32) / 255.0
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        predicted.append(interpreter.get_tensor(out["index"])[0].argmax())
    return np.array(predicted), time.perf_counter() - start


def convert(model, mode: str, representative: np.ndarray | None = None) -> bytes:
    """The TFLite converter as the lab set it up for none, dynamic, float16 and int8."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        converter.representative_dataset = lambda: (
            [image[None].astype(np.float32) / 255.0] for image in representative
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def fit(model, x: np.ndarray, y: np.ndarray, val: tuple, epochs: int, callbacks=()) -> None:
    """Compile with Adam and fit on float32 arrays, batch 32, as the notebook did."""
    from fallopt.backend import keras

    model.compile(keras().optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(
        x, y, batch_size=32, epochs=epochs, validation_data=val, callbacks=list(callbacks),
        verbose=0,
    )  # fmt: skip


def prune_and_fine_tune(baseline: Path, sparsity: float, x, y, val, epochs: int):
    """Reload the saved baseline, prune the whole model, fine-tune, strip the wrappers."""
    import tensorflow_model_optimization as tfmot

    from fallopt.backend import keras

    model = keras().models.load_model(baseline)
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    fit(pruned, x, y, val, epochs, [tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned)
