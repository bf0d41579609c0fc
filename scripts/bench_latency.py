""".tflite files' single-image latency, side by side in one process, as ratios to the first.

A run's `tflite_latency_ms` is measured alone, so two runs made minutes apart differ by the
host's drift (tens of percent here). This times the files in turns instead: each round
invokes every file `--invokes` times, in a new random order, and keeps the median; the
figure per file is the median over `--rounds` rounds. Kernels are the ones a run uses
(fallopt.litert): XNNPACK for float files, LiteRT's built-in kernels for full-integer ones.

python scripts/bench_latency.py baseline=a.tflite thin=b.tflite [--rounds 15] [--invokes 20]
Prints one line per file: median ms, and its ratio to the first file.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np

from fallopt.litert import TFLiteModel, _allocate, _interpreter, host_cpu


def _invoker(content: bytes):  # noqa: ANN202
    """A one-thread interpreter with a random image set: call it to time one invoke."""
    full_integer = TFLiteModel(content, 1).input["dtype"] == np.int8  # as task.py decides
    model = TFLiteModel(content, 1, xnnpack=not full_integer)
    interpreter = _interpreter(content, 1, not full_integer)
    _allocate(interpreter)
    shape = model.input["shape"][1:]
    image = np.random.default_rng(0).integers(0, 256, (1, *shape), dtype=np.uint8)
    interpreter.set_tensor(model.input["index"], model.model_input(image))

    def invoke() -> float:
        start = time.perf_counter()
        interpreter.invoke()
        return time.perf_counter() - start

    return invoke


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="name=path.tflite; the first is the reference")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--invokes", type=int, default=20)
    args = parser.parse_args()
    named = dict(f.split("=", 1) for f in args.files)
    invokers = {name: _invoker(Path(path).read_bytes()) for name, path in named.items()}
    for invoke in invokers.values():  # warm-up
        for _ in range(5):
            invoke()
    rounds: dict[str, list[float]] = {name: [] for name in invokers}
    order = list(invokers)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            rounds[name].append(statistics.median(invokers[name]() for _ in range(args.invokes)))
    print(f"host: {host_cpu()}; {args.rounds} rounds x {args.invokes} invokes, 1 thread")
    reference = statistics.median(rounds[next(iter(rounds))])
    for name, times in rounds.items():
        ms = 1000 * statistics.median(times)
        print(f"{name}: {ms:.2f} ms, {statistics.median(times) / reference:.2f}x")


if __name__ == "__main__":
    main()
