"""fallopt's TFLite evaluation against the lab's loop, side by side in one run.

The lab evaluated with `tf.lite.Interpreter`, one image per invoke. fallopt runs LiteRT on
batches with two threads. Same model (the lab's CAUCA CNN at 96x96x3), same 2,000
synthetic_falls images, for float32, dynamic-range and int8 files; predictions must agree.

python scripts/bench_tflite_eval.py [--images 2000] [--threads 2]
Prints `name: value` lines last: the speed ratio (lab time / fallopt time) per mode.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fallopt.compress.quantize import convert, representative_images
from fallopt.config import ModelConfig, QuantMode, SyntheticFallsConfig
from fallopt.data import load_dataset, to_float
from fallopt.litert import TFLiteModel, host_cpu
from fallopt.models import build_model


def lab_loop(content: bytes, images: np.ndarray) -> tuple[np.ndarray, float]:
    """The lab's evaluation: tf.lite.Interpreter, one image per invoke."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    start = time.perf_counter()
    predicted = []
    for image in images:
        x = to_float(image[None])
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        predicted.append(interpreter.get_tensor(out["index"])[0].argmax())
    return np.array(predicted), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    data = load_dataset(SyntheticFallsConfig(n_train=args.images, n_test=args.images), 0.2, 0)
    images = data.test.x[: args.images]
    model = build_model(
        ModelConfig(name="cauca_cnn", filters=[32, 32, 64], kernel_size=5, dense_units=[64]),
        data.input_shape,
        2,
    )
    representative = representative_images(data.train, 100, seed=0)
    results = {}
    for mode in (QuantMode.none, QuantMode.dynamic, QuantMode.int8):
        content = convert(model, mode, representative)
        lab_pred, lab_s = lab_loop(content, images)
        ours = TFLiteModel(content, threads=args.threads)
        ours.predict(images[:256])  # warm-up, as the lab loop's first invokes
        start = time.perf_counter()
        our_pred = ours.predict(images).argmax(axis=1)
        our_s = time.perf_counter() - start
        agree = float(np.mean(lab_pred == our_pred))
        print(
            f"{mode.value:8s} lab loop {lab_s:6.2f} s, fallopt {our_s:6.2f} s, "
            f"{len(images) / our_s:7.0f} images/s, predictions agree on {agree:.1%}"
        )
        results[mode.value] = lab_s / our_s
    print(f"host: {host_cpu()}, {args.threads} threads, {len(images)} images 96x96x3")
    for mode, ratio in results.items():
        print(f"tflite_eval_speedup_{mode}: {ratio:.2f}")


if __name__ == "__main__":
    main()
