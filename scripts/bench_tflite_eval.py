"""fallopt's TFLite evaluation against the lab's loop and against the bare interpreter.

Same model (the lab's CAUCA CNN at 96x96x3), same 2,000 synthetic_falls images, for
float32, dynamic-range and int8 files, side by side in one run:

  lab      tf.lite.Interpreter, one image per invoke (scripts/lab_flow.py)
  fallopt  TFLiteModel.predict: LiteRT on batches of 256 with two threads, uint8 images in,
           probabilities out (input scaling or quantization and output dequantization included)
  raw      the same interpreter and batches fed inputs prepared beforehand: only set_tensor,
           invoke and get_tensor are timed. fallopt over raw is the cost of its own work.

python scripts/bench_tflite_eval.py [--images 2000] [--threads 2] [--repeats 2]
Prints `name: value` lines last; each time is the best of --repeats.
"""

from __future__ import annotations

import argparse
import time

import lab_flow
import numpy as np

from fallopt.compress.quantize import convert, representative_images
from fallopt.config import QuantMode
from fallopt.data import load_dataset
from fallopt.data.synthetic_falls import SyntheticFallsConfig
from fallopt.litert import TFLiteModel, host_cpu

BATCH = 256


def raw_invoke_seconds(model: TFLiteModel, images: np.ndarray) -> float:
    """set_tensor + invoke + get_tensor over the batches `predict` uses, inputs ready."""
    interpreter, inp, out = model.interpreter, model.input["index"], model.output["index"]
    ready = [model.model_input(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    start = time.perf_counter()
    for batch in ready:
        if batch.shape[0] != model._batch:  # noqa: SLF001 (resize as predict does)
            interpreter.resize_tensor_input(inp, batch.shape)
            interpreter.allocate_tensors()
            model._batch = batch.shape[0]  # noqa: SLF001
        interpreter.set_tensor(inp, batch)
        interpreter.invoke()
        interpreter.get_tensor(out)
    return time.perf_counter() - start


def best(repeats: int, measure) -> float:
    return min(measure() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    data = load_dataset(SyntheticFallsConfig(n_train=400, n_test=args.images), 0.2, 0)
    images = data.test.x[: args.images]
    model = lab_flow.cauca_cnn(data.input_shape)
    representative = representative_images(data.train, 100, seed=0)
    speedup, floor = {}, {}
    for mode in (QuantMode.none, QuantMode.dynamic, QuantMode.int8):
        content = convert(model, mode, representative)
        lab_pred, _ = lab_flow.per_image_predictions(content, images[:64])  # warm-up
        lab_s = best(args.repeats, lambda c=content: lab_flow.per_image_predictions(c, images)[1])
        lab_pred, _ = lab_flow.per_image_predictions(content, images)
        ours = TFLiteModel(content, threads=args.threads)
        our_pred = ours.predict(images, BATCH).argmax(axis=1)  # warm-up, and the predictions

        def predict(m: TFLiteModel = ours) -> float:
            start = time.perf_counter()
            m.predict(images, BATCH)
            return time.perf_counter() - start

        our_s = best(args.repeats, predict)
        raw_s = best(args.repeats, lambda m=ours: raw_invoke_seconds(m, images))
        agree = float(np.mean(lab_pred == our_pred))
        print(
            f"{mode.value:8s} lab loop {lab_s:6.2f} s, fallopt {our_s:6.2f} s "
            f"({len(images) / our_s:5.0f} images/s), raw invoke {raw_s:6.2f} s; "
            f"predictions agree on {agree:.1%}"
        )
        speedup[mode.value], floor[mode.value] = lab_s / our_s, our_s / raw_s
    print(f"host: {host_cpu()}, {args.threads} threads, {len(images)} images 96x96x3")
    for mode in speedup:
        print(f"tflite_eval_speedup_over_lab_{mode}: {speedup[mode]:.2f}")
    for mode in floor:
        print(f"tflite_eval_time_over_raw_invoke_{mode}: {floor[mode]:.2f}")


if __name__ == "__main__":
    main()
