"""Peak memory on lab-sized data: the lab's notebook flow against fallopt's, side by side.

Generates CAUCA-sized pickles (`data_train_96_96_3.pickle`, 16,000 x 96 x 96 x 3 uint8, and
a test pickle), then in a fresh process per flow: imports TensorFlow and builds the lab's
CAUCA CNN and trains it one step on a dummy batch, resets the peak-RSS counter, and loads,
splits and trains a few steps.
The figure is the growth of peak resident memory over the raw size of the arrays loaded:

  lab      pickle.load, float32 / 255 copies, train_test_split, model.fit on the arrays
  fallopt  load_dataset (uint8, checked, split) and the tf.data pipeline its training uses

python scripts/bench_memory.py [--images 16000] [--test-images 2000] [--steps 10]
Prints `name: value` lines last.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 2**20


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS now, VmHWM the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_pickles(folder: Path, n_train: int, n_test: int, size: int = 96) -> int:
    """The lab's two pickles, random pixels, alternating labels; returns their pixel bytes."""
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        payload = {
            "data": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "labels": [i % 2 for i in range(n)],  # a list, as the lab's files hold
            "width": size,
            "height": size,
            "channels": 3,
        }
        with (folder / f"data_{name}_{size}_{size}_3.pickle").open("wb") as f:
            pickle.dump(payload, f)
        del payload
    return (n_train + n_test) * size * size * 3


def lab_data_flow(folder: Path, steps: int, model) -> None:
    """The notebook: unpickle, float32 / 255, split with scikit-learn, fit on the arrays."""
    from sklearn.model_selection import train_test_split

    with (folder / "data_train_96_96_3.pickle").open("rb") as f:
        train = pickle.load(f)
    with (folder / "data_test_96_96_3.pickle").open("rb") as f:
        test = pickle.load(f)
    x = np.array(train["data"]).astype("float32") / 255.0
    y = np.array(train["labels"])
    x_test = np.array(test["data"]).astype("float32") / 255.0  # noqa: F841 (kept, as the lab)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=0)
    model.fit(
        x_train, y_train, batch_size=32, epochs=1, steps_per_epoch=steps,
        validation_data=(x_val, y_val), validation_steps=2, verbose=0,
    )  # fmt: skip


def fallopt_data_flow(folder: Path, steps: int, model) -> None:
    """fallopt: the cauca loader and splits, then the pipeline `train.fit` feeds Keras."""
    from fallopt.data import load_dataset
    from fallopt.data.cauca import CaucaConfig
    from fallopt.train import batches

    cfg = CaucaConfig(
        train_path=str(folder / "data_train_96_96_3.pickle"),
        test_path=str(folder / "data_test_96_96_3.pickle"),
    )
    data = load_dataset(cfg, val_split=0.2, seed=0)
    model.fit(
        batches(data.train, 32, shuffle=True).take(steps),
        validation_data=batches(data.val, 32).take(2),
        epochs=1,
        verbose=0,
    )


def _lab_warm_up(model) -> None:
    x, y = np.zeros((64, 96, 96, 3), np.float32), np.zeros(64, np.int64)
    model.fit(x, y, batch_size=32, epochs=1, validation_data=(x, y), verbose=0)


def _fallopt_warm_up(model) -> None:
    from fallopt.data import Split
    from fallopt.train import batches

    blank = Split(np.zeros((64, 96, 96, 3), np.uint8), np.zeros(64, np.int64))
    model.fit(batches(blank, 32, shuffle=True), validation_data=batches(blank, 32), verbose=0)


WARM_UP = {"lab": _lab_warm_up, "fallopt": _fallopt_warm_up}


def child(flow: str, folder: Path, steps: int) -> None:
    """One flow in this process; prints its peak growth as JSON."""
    import lab_flow

    model = lab_flow.cauca_cnn((96, 96, 3))
    # TensorFlow's start-up and each flow's own training path on 64 blank images come first
    # (graphs, activations, gradients, optimizer state): the figure is what the data costs.
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    WARM_UP[flow](model)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    {"lab": lab_data_flow, "fallopt": fallopt_data_flow}[flow](folder, steps, model)
    print(json.dumps({"before": before, "peak": _status("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", choices=["lab", "fallopt"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.steps)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = write_pickles(folder, args.images, args.test_images)
        print(f"{args.images:,} + {args.test_images:,} images 96x96x3 uint8: {raw / MIB:,.0f} MiB")
        ratios = {}
        for flow in ("lab", "fallopt"):
            command = [sys.executable, __file__, "--child", flow, "--dir", tmp]
            proc = subprocess.run(
                [*command, "--steps", str(args.steps)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"the {flow} flow failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            grown = result["peak"] - result["before"]
            ratios[flow] = grown / raw
            print(
                f"{flow:8s} peak RSS {result['peak'] / MIB:7,.0f} MiB, "
                f"{grown / MIB:7,.0f} MiB above its start ({ratios[flow]:.2f}x the raw arrays)"
            )
    print(f"memory_peak_over_raw_lab: {ratios['lab']:.2f}")
    print(f"memory_peak_over_raw_fallopt: {ratios['fallopt']:.2f}")


if __name__ == "__main__":
    main()
